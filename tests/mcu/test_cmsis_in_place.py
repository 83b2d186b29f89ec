"""The cmsis-nn backend's in-place plan: outputs overlap dying inputs wherever the CMSIS-NN
kernel walks pixel by pixel (not its 1x1 fast path), proven by bit-exact runs against TFLite Micro."""
import os
import shutil

import numpy as np
import pytest

import mcu
from mcu import build, codegen
from models import builders, ptq, tflite_export, tflite_import, tflm, zoo

needs_cmsis = pytest.mark.skipif(
    not os.environ.get("CMSIS_NN_ROOT"),
    reason="cmsis-nn backend: set CMSIS_NN_ROOT to a CMSIS-NN checkout (github.com/ARM-software/CMSIS-NN) to test it",
)


def _ptq(graph, seed=0):
    rng = np.random.default_rng(seed)
    shape = graph.tensors[graph.inputs[0]].shape[1:]
    data = tflite_export.to_bytes(ptq.quantize(graph, [rng.normal(size=(16,) + shape).astype(np.float32)]))
    return tflite_import.from_bytes(data), data


def test_cmsis_plan_overlaps_except_its_1x1_convs():
    graph, _ = _ptq(builders.ds_cnn(input_shape=(25, 10, 1), filters=16))
    from models import quantization

    params = [quantization.op_params(graph, op) for op in graph.ops]
    pointwise = codegen.cmsis_no_overlap(graph, params, codegen.Config(backend="cmsis-nn"))
    assert pointwise == {i for i, op in enumerate(graph.ops) if op.kind == "CONV_2D" and
                         graph.tensors[op.inputs[1]].shape[1:3] == (1, 1)}
    general = codegen.Config(backend="cmsis-nn", layer_options=tuple((i, "kernel", "general") for i in pointwise))
    assert codegen.cmsis_no_overlap(graph, params, general) == set()


@needs_cmsis
@pytest.mark.parametrize("general", [pytest.param(False, marks=pytest.mark.slow), True], ids=["wrapper", "general-1x1"])
def test_cmsis_in_place_plan_matches_tflm(general, tmp_path):
    graph, model = _ptq(builders.ds_cnn(input_shape=(25, 10, 1), filters=16))
    config = codegen.Config(backend="cmsis-nn")
    if general:
        config = codegen.min_sram_config(graph, config)
        assert any(v == "general" for _, _, v in config.layer_options)
    lowered = mcu.export(graph, tmp_path, config)
    assert lowered.plan.overlaps  # in place somewhere
    inputs = mcu.random_inputs(graph, 3, seed=5)
    run = build.run_host(build.build_host(tmp_path, sanitize=True), mcu.pack_inputs(graph, inputs))
    for got, want in zip(mcu.unpack_outputs(graph, run.outputs), tflm.run(model, *inputs), strict=True):
        np.testing.assert_array_equal(got, want)
    if shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc"):
        board = mcu.board("stm32f746")
        run = build.run_qemu(build.build_target(tmp_path, board), board, mcu.pack_inputs(graph, inputs))
        for got, want in zip(mcu.unpack_outputs(graph, run.outputs), tflm.run(model, *inputs), strict=True):
            np.testing.assert_array_equal(got, want)


@needs_cmsis
def test_cmsis_patches_match_tflm_below_the_whole_tensor_plan(tmp_path):
    """ResNet-8's first block (the block input and the first conv's output held whole) run patch by
    patch on CMSIS-NN kernels: a lower peak, and only CMSIS-NN kernels in the patches."""
    graph, model = _ptq(builders.resnet8(resolution=16, width=8))
    whole = codegen.fit_sram(graph, codegen.Config(backend="cmsis-nn"), 0)
    config = codegen.min_sram_config(graph, codegen.Config(backend="cmsis-nn"))
    assert config.patch_split >= 3  # the segment takes the whole first block
    lowered = mcu.export(graph, tmp_path, config)
    assert lowered.peak_sram_bytes < codegen.plan_schedule(graph, whole)[1].peak_bytes
    text = lowered.model_c
    segment = text[text.index("/* patch 0:"): text.index("tp_paste(")]
    assert "arm_convolve_wrapper_s8(" in segment and "tp_conv" not in segment
    inputs = mcu.random_inputs(graph, 3, seed=6)
    run = build.run_host(build.build_host(tmp_path, sanitize=True), mcu.pack_inputs(graph, inputs))
    for got, want in zip(mcu.unpack_outputs(graph, run.outputs), tflm.run(model, *inputs), strict=True):
        np.testing.assert_array_equal(got, want)


@needs_cmsis
@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.suite_models())
def test_cmsis_min_sram_reference_models_fit_0_6_of_tflm_and_match_it(name, reference_model, tmp_path):
    """The cmsis-nn backend's min-SRAM schedule (in place, patches on CMSIS-NN kernels, the input
    read where the caller holds it) needs at most 0.6x TFLite Micro's arena on every reference
    model, bit-exact on the host and on Cortex-M7 under QEMU."""
    path = reference_model(name)
    graph = tflite_import.load(str(path))
    lowered = mcu.export(graph, tmp_path, codegen.min_sram_config(graph, codegen.Config(backend="cmsis-nn")))
    assert lowered.peak_sram_bytes <= 0.6 * tflm.arena_bytes(str(path))["total"]
    inputs = mcu.random_inputs(graph, 3, seed=12)
    runs = [build.run_host(build.build_host(tmp_path), mcu.pack_inputs(graph, inputs))]
    if shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc"):
        board = mcu.board("stm32f746")
        runs.append(build.run_qemu(build.build_target(tmp_path, board), board, mcu.pack_inputs(graph, inputs),
                                   timeout=1800))
    for run in runs:
        for got, want in zip(mcu.unpack_outputs(graph, run.outputs), tflm.run(path, *inputs), strict=True):
            np.testing.assert_array_equal(got, want)
