"""The specialized MCU backend (C generated per layer, Cortex-M DSP SIMD): its requantization
shortcut equals TFLite's arithmetic, every kernel variant is bit-exact with TFLite Micro on the
host (ASan/UBSan included) and on Cortex-M7 under QEMU, and its default schedule fits the SRAM
of the portable default."""
import pathlib
import shutil

import numpy as np
import pytest

import mcu
from kernels import quant
from mcu import build, codegen, specialized
from models import builders, ptq, tflite_export, tflite_import, tflm

REPO = pathlib.Path(__file__).resolve().parents[2]
MODELS_DIR = REPO.parent / "shared" / "tflite"
MODELS = sorted(p.name for p in MODELS_DIR.glob("*.tflite"))

needs_arm = pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
    reason=f"needs the Cortex-M toolchain and QEMU ({build.APT_HINT})",
)


def _smmlar_form(acc, multiplier, right, offset):
    """tp_sp_requantize's TP_SP_RQ_FAST in int64 numpy: (SMMLAR(2 acc, M, rounding - [acc < 0])) >> right."""
    rounding = (1 << (right - 1)) + (offset << right)
    h = rounding + (acc >> 31)
    return (h * 2**32 + 2 * acc * multiplier + 2**31) >> 32 >> right


def test_fast_requantization_equals_tflite_double_rounding():
    rng = np.random.default_rng(0)
    n = 200_000
    acc = rng.integers(-(2**30) + 1, 2**30, n, dtype=np.int64)
    acc[: n // 4] = rng.integers(-5000, 5000, n // 4)  # small accumulators: the rounding ties matter
    multiplier = rng.integers(2**30, 2**31, n, dtype=np.int64)
    right = rng.integers(1, 20, n, dtype=np.int64)
    offset = rng.integers(-128, 128, n, dtype=np.int64)
    want = np.asarray(quant.multiply_by_quantized_multiplier(acc.astype(np.int32), multiplier.astype(np.int32),
                                                              (-right).astype(np.int32)), np.int64) + offset
    np.testing.assert_array_equal(_smmlar_form(acc, multiplier, right, offset), want)


def test_requantization_records_fall_back_where_the_shortcut_is_not_proven():
    req = specialized.requantization(np.array([5, -7]), [2**30, 2**30 + 5], [-3, -1], -4, np.array([100, 200]), True)
    assert req.mode == specialized.RQ_FAST and req.doubled
    np.testing.assert_array_equal(req.records[:, 0], [10, -14])  # the bias in the doubled accumulator's scale
    np.testing.assert_array_equal(req.records[:, 2], [4 + (-4 << 3), 1 + (-4 << 1)])
    big = specialized.requantization(np.array([0]), [2**30], [-3], 0, np.array([2**30]), True)
    assert big.mode == specialized.RQ_EXACT and not big.doubled
    left = specialized.requantization(np.array([0]), [2**30], [1], 0, np.array([10]), True)
    assert left.mode == specialized.RQ_EXACT


def _ptq(graph, seed=0):
    rng = np.random.default_rng(seed)
    shape = graph.tensors[graph.inputs[0]].shape[1:]
    q = ptq.quantize(graph, [rng.normal(size=(16,) + shape).astype(np.float32)])
    data = tflite_export.to_bytes(q)
    return tflite_import.from_bytes(data), data


def _host_matches_tflm(graph, model, tmp_path, config, samples=3, sanitize=False, seed=1):
    lowered = mcu.export(graph, tmp_path, config)
    inputs = mcu.random_inputs(graph, samples, seed=seed)
    run = build.run_host(build.build_host(tmp_path, sanitize=sanitize), mcu.pack_inputs(graph, inputs))
    for j, (got, want) in enumerate(zip(mcu.unpack_outputs(graph, run.outputs), tflm.run(model, *inputs), strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"output {j} differs from TFLite Micro")
    return lowered


def _variants(graph, **knobs):
    ops = [i for i, op in enumerate(graph.ops) if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    return codegen.Config(backend="specialized", layer_options=tuple((i, k, v) for i in ops for k, v in knobs.items()))


@pytest.mark.parametrize("knobs", [{"weights": "s16", "unroll": "2", "rows": "4"},
                                   {"kernel": "direct", "weights": "s8", "unroll": "1", "rows": "2", "strip": "2"},
                                   pytest.param({"weights": "s8", "kernel": "portable"}, marks=pytest.mark.slow)],
                         ids=lambda k: "-".join(k.values()))
def test_specialized_variants_match_tflm(knobs, tmp_path):
    """ResNet-8 (residual ADDs, 3-channel input: a padded int8 column) and an MCUNet-style net
    (5x5/7x7 depthwise, stride 2, 1x1 with odd channel counts) under every kernel variant."""
    for k, build_graph in enumerate((lambda: builders.resnet8(resolution=16, width=8),
                                     lambda: builders.mcunet(resolution=32))):
        graph, model = _ptq(build_graph())
        lowered = _host_matches_tflm(graph, model, tmp_path / str(k), _variants(graph, **knobs))
        kernels = {layer["kernel"].split()[0] for layer in lowered.layers}
        expected = {"portable": "tp_conv_s8", "direct": "tp_sp_conv_direct"}.get(knobs.get("kernel"), "tp_sp_conv")
        assert expected in kernels or (expected == "tp_conv_s8" and "tp_conv1x1_unroll4_s8" in kernels)


@pytest.mark.slow
def test_specialized_depthwise_in_place_and_folded_pads_under_sanitizers(tmp_path):
    graph, model = _ptq(builders.ds_cnn(input_shape=(25, 10, 1), filters=16))
    lowered = _host_matches_tflm(graph, model, tmp_path, codegen.Config(backend="specialized"), sanitize=True)
    dw = [i for i, op in enumerate(graph.ops) if op.kind == "DEPTHWISE_CONV_2D"]
    plan = lowered.plan
    # written over the input (overlap at delta 0) wherever the input dies there
    assert all(plan.offset(graph.ops[i].outputs[0]) == plan.offset(graph.ops[i].inputs[0]) for i in dw)


def test_fold_pads_keeps_indices_and_moves_the_padding_into_the_conv():
    graph = builders.mcunet(resolution=32)
    graph, _ = _ptq(graph)
    from models import quantization

    params = [quantization.op_params(graph, op) for op in graph.ops]
    folded_graph, folded_params, folded = codegen.fold_pads(graph, params)
    assert len(folded_graph.ops) == len(graph.ops)
    for i, j in folded.items():
        pads = graph.ops[i].options["paddings"]
        assert folded_graph.ops[j].inputs[0] == graph.ops[i].inputs[0]
        assert folded_params[j]["padding"][0][0] == params[j]["padding"][0][0] + pads[1][0]


def test_planner_overlap_limit_override():
    graph, _ = _ptq(builders.ds_cnn(input_shape=(25, 10, 1), filters=16))
    from models import quantization

    params = [quantization.op_params(graph, op) for op in graph.ops]
    dw = next(i for i, op in enumerate(graph.ops) if op.kind == "DEPTHWISE_CONV_2D")
    free = mcu.plan_memory(graph, params)
    none = mcu.plan_memory(graph, params, overlap_limits={dw: None})
    assert not any(graph.ops[dw].outputs[0] in pair for pair in none.overlaps)
    assert none.peak_bytes >= free.peak_bytes


def test_specialized_config_keeps_sram_at_the_portable_default_and_weights_in_flash():
    graph, _ = _ptq(builders.resnet8(resolution=32, width=16))
    portable = codegen.plan_schedule(graph, codegen.Config())[1].peak_bytes
    config = codegen.specialized_config(graph, flash_bytes=mcu.board("stm32f746").flash_bytes)
    assert codegen.plan_schedule(graph, config)[1].peak_bytes <= portable
    tight = codegen.weight_formats(graph, codegen.Config(backend="specialized", flash_budget=1))
    assert set(tight.values()) == {"s8"}
    assert set(codegen.weight_formats(graph, codegen.Config(backend="specialized")).values()) == {"s16"}


def test_bad_layer_option_is_a_clear_error():
    with pytest.raises(ValueError, match="layer option"):
        codegen.Config(backend="specialized", layer_options=((0, "kernel", "winograd"),))


@needs_arm
def test_specialized_cortex_m7_qemu_matches_tflm(tmp_path):
    graph, model = _ptq(builders.mcunet(resolution=32))
    mcu.export(graph, tmp_path, codegen.Config(backend="specialized"))
    board = mcu.board("stm32f746")
    inputs = mcu.random_inputs(graph, 3, seed=2)
    run = build.run_qemu(build.build_target(tmp_path, board), board, mcu.pack_inputs(graph, inputs))
    for got, want in zip(mcu.unpack_outputs(graph, run.outputs), tflm.run(model, *inputs), strict=True):
        np.testing.assert_array_equal(got, want)
    assert min(run.instructions) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_specialized_reference_models_match_tflm_on_host_and_cortex_m7(name, tmp_path):
    graph = tflite_import.load(str(MODELS_DIR / name))
    board = mcu.board("stm32f746")
    config = codegen.specialized_config(graph, flash_bytes=board.flash_bytes)
    lowered = _host_matches_tflm(graph, MODELS_DIR / name, tmp_path, config, samples=10, seed=3)
    assert lowered.peak_sram_bytes <= codegen.plan_schedule(graph, codegen.Config())[1].peak_bytes
    if shutil.which("qemu-system-arm"):
        inputs = mcu.random_inputs(graph, 3, seed=4)
        run = build.run_qemu(build.build_target(tmp_path, board), board, mcu.pack_inputs(graph, inputs), timeout=1800)
        for got, want in zip(mcu.unpack_outputs(graph, run.outputs), tflm.run(MODELS_DIR / name, *inputs), strict=True):
            np.testing.assert_array_equal(got, want)


def _fusion_net():
    """1x1 convs with input channels that are not a multiple of 4 (3, 10: a partial group) feeding
    depthwise ops of 10 and 6 channels (a last pass with fewer planes), 3x3/s1 and 5x5/s2 VALID."""
    gb = builders.GraphBuilder("fusion", (11, 9, 3))
    x = gb.depthwise(gb.conv(gb.input, 10, 1), 3)
    x = gb.depthwise(gb.conv(x, 6, 1, activation="NONE"), 5, stride=2, padding="VALID")
    return gb.build(gb.softmax(gb.dense(gb.flatten(gb.average_pool(x)), 3)))


@pytest.mark.parametrize("planes,strip", [("1", "all"), ("4", "2")])
def test_fused_pointwise_depthwise_matches_tflm_and_stores_no_conv_output(planes, strip, tmp_path):
    graph, model = _ptq(_fusion_net())
    dws = [i for i, op in enumerate(graph.ops) if op.kind == "DEPTHWISE_CONV_2D"]
    options = tuple((i, k, v) for i in dws for k, v in (("fuse", "pointwise"), ("planes", planes), ("strip", strip)))
    lowered = _host_matches_tflm(graph, model, tmp_path, codegen.Config(backend="specialized", layer_options=options),
                                 sanitize=True)
    assert all("fused 1x1" in lowered.layers[i]["kernel"] for i in dws)
    plan = lowered.plan
    for i in dws:
        source, out = plan.tensor_buffer[graph.ops[i - 1].inputs[0]], plan.tensor_buffer[graph.ops[i].outputs[0]]
        # the conv output aliases the conv input (no bytes of its own), which the depthwise reads for
        # every channel: its output may not overlap it
        assert plan.tensor_buffer[graph.ops[i].inputs[0]] == source
        a, b = plan.offsets[source], plan.offsets[out]
        assert a + plan.buffers[source].size <= b or b + plan.buffers[out].size <= a


def test_default_schedule_fuses_narrow_pointwise_convs():
    graph, _ = _ptq(builders.mcunet(resolution=32))
    config = codegen.specialized_config(graph)
    fused = {i for i, knob, v in config.layer_options if knob == "fuse" and v == "pointwise"}
    assert fused and all(graph.tensors[graph.ops[i - 1].inputs[0]].shape[3] <= codegen.FUSE_MAX_INPUT_CHANNELS
                         for i in fused)
    assert codegen.plan_schedule(graph, config)[1].peak_bytes <= codegen.plan_schedule(graph, codegen.Config())[1].peak_bytes
