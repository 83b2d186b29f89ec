"""MCU export: generated C is bit-exact with TFLite Micro on every reference model, or on the
stand-ins built in their place (host build, ASan/UBSan build, Cortex-M7 under QEMU), instruction
counts are exact and repeatable, faults and hangs become clear errors, boards reject what does
not fit."""
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mcu
from mcu import build, codegen
from models import tflite_import, tflm, zoo

REPO = pathlib.Path(__file__).resolve().parents[2]
MODELS = zoo.suite_models()
KWS = "mlperf_tiny_kws01_dscnn_int8"
VWW = "mlperf_tiny_vww01_mobilenetv1_0.25_96_int8"
IC = "mlperf_tiny_ic01_resnet8_cifar10_int8"
AD = "mlperf_tiny_ad01_fc_autoencoder_int8"
SWW = "mlperf_tiny_sww01_streaming_wakeword_int8"
TINYENGINE_VWW = "tinyengine_mcunet_vww_80_int8_floatio"
DETECTION = "tinyengine_mcunet_detection_fpn_128x160_int8_floatio"
QEMU_DEFAULT = zoo.available(KWS, "mlperf_tiny_ad01_fc_autoencoder_int8_floatio")
SAMPLES = 20

needs_arm = pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
    reason=f"needs the Cortex-M toolchain and QEMU ({build.APT_HINT})",
)


def _graph(path):
    return tflite_import.load(str(path))


def _assert_matches_tflm(path, graph, raw_outputs, inputs):
    ours = mcu.unpack_outputs(graph, raw_outputs)
    ref = tflm.run(path, *inputs)
    for j, (x, y) in enumerate(zip(ours, ref, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y, err_msg=f"{path.name}: output {j} differs from TFLite Micro")


@pytest.mark.parametrize("name", MODELS)
def test_host_build_matches_tflm(name, model_path, tmp_path):
    path = model_path(name)
    graph = _graph(path)
    mcu.export(graph, tmp_path)
    inputs = mcu.random_inputs(graph, SAMPLES, seed=1)
    run = build.run_host(build.build_host(tmp_path), mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)


@pytest.mark.parametrize("name", zoo.available(KWS, TINYENGINE_VWW))
def test_sanitized_host_build_matches_tflm(name, model_path, tmp_path):
    """ASan/UBSan: no out-of-bounds access or undefined behaviour, in-place overlaps included."""
    path = model_path(name)
    graph = _graph(path)
    mcu.export(graph, tmp_path)
    inputs = mcu.random_inputs(graph, 3, seed=2)
    run = build.run_host(build.build_host(tmp_path, sanitize=True), mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)


@pytest.mark.parametrize("variant", codegen.CONV_VARIANTS)
def test_conv_variants_and_no_in_place_match_tflm(variant, model_path, tmp_path):
    path = model_path(VWW)
    graph = _graph(path)
    mcu.export(graph, tmp_path, codegen.Config(in_place=False, conv1x1=variant))
    inputs = mcu.random_inputs(graph, 2, seed=3)
    run = build.run_host(build.build_host(tmp_path), mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)


PATCHED = [
    (VWW, 3, 8),
    (IC, 7, 4),  # residual ADDs read row windows
    (TINYENGINE_VWW, 20, 3),  # float QUANTIZE, PADs, ADDs in the segment
    (DETECTION, 12, 4),
    ("standin_resnet8_ic_int8", 7, 4),
    ("standin_mobilenet_v2_vww_int8_floatio", 6, 4),  # float QUANTIZE and residual ADDs in the segment
]


@pytest.mark.parametrize("name, split, grid", [case for case in PATCHED if case[0] in MODELS])
def test_patch_based_inference_matches_tflm(name, split, grid, model_path, tmp_path):
    path = model_path(name)
    graph = _graph(path)
    mcu.export(graph, tmp_path, codegen.Config(patch_split=split, patch_grid=grid))
    inputs = mcu.random_inputs(graph, 4, seed=8)
    sanitize = name.startswith(("mlperf_tiny_ic01", "tinyengine_mcunet_vww", "standin_resnet8"))
    run = build.run_host(build.build_host(tmp_path, sanitize=sanitize), mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)


def _qemu_check(path, tmp_path, board="stm32f746", samples=SAMPLES, config=None):
    graph = _graph(path)
    mcu.export(graph, tmp_path, config)
    b = mcu.board(board)
    elf = build.build_target(tmp_path, b)
    inputs = mcu.random_inputs(graph, samples, seed=4)
    run = build.run_qemu(elf, b, mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)
    assert len(run.instructions) == samples and min(run.instructions) > 0
    return run


@needs_arm
@pytest.mark.parametrize("name", QEMU_DEFAULT)
def test_cortex_m7_qemu_matches_tflm(name, model_path, tmp_path):
    _qemu_check(model_path(name), tmp_path)


@needs_arm
@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MODELS if m not in QEMU_DEFAULT])
def test_cortex_m7_qemu_matches_tflm_all(name, model_path, tmp_path):
    _qemu_check(model_path(name), tmp_path, board="stm32h743", samples=SAMPLES)


@pytest.mark.parametrize("name", zoo.available(KWS, VWW))
def test_channel_in_place_depthwise_matches_tflm(name, model_path, tmp_path):
    path = model_path(name)
    graph = _graph(path)
    lowered = mcu.export(graph, tmp_path, codegen.Config(depthwise="channel_in_place"))
    assert len(lowered.plan.channel_in_place) == graph.op_kinds()["DEPTHWISE_CONV_2D"]
    inputs = mcu.random_inputs(graph, 3, seed=12)
    run = build.run_host(build.build_host(tmp_path, sanitize=name.startswith(("mlperf_tiny_kws", "standin_ds_cnn"))),
                         mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)


@needs_arm
def test_channel_in_place_depthwise_on_cortex_m7(model_path, tmp_path):
    _qemu_check(model_path(KWS), tmp_path, samples=2,
                config=codegen.Config(depthwise="channel_in_place"))


@needs_arm
def test_patched_cortex_m7_qemu_matches_tflm(model_path, tmp_path):
    _qemu_check(model_path(IC), tmp_path, samples=2,
                config=codegen.Config(patch_split=7, patch_grid=4))


@needs_arm
def test_cortex_m4_qemu_matches_tflm(model_path, tmp_path):
    _qemu_check(model_path(SWW), tmp_path, board="stm32l4r5", samples=3)


@needs_arm
def test_instruction_count_is_exact_and_repeatable(model_path, tmp_path):
    graph = _graph(model_path(AD))
    mcu.export(graph, tmp_path)
    b = mcu.board("stm32f746")
    elf = build.build_target(tmp_path, b)
    x = mcu.pack_inputs(graph, mcu.random_inputs(graph, 1, seed=5))
    first = build.run_qemu(elf, b, np.concatenate([x, x, x])).instructions
    again = build.run_qemu(elf, b, x).instructions
    assert first[0] == first[1] == first[2] == again[0]
    # ten FC layers: at least one multiply-accumulate instruction per two MACs (SMLAD)
    assert first[0] > 264_192 // 2


def _custom_program(path, tmp_path, body):
    graph = _graph(path)
    mcu.export(graph, tmp_path)
    model_c = tmp_path / "model.c"
    model_c.write_text(model_c.read_text().replace("int32_t model_invoke(const model_input_t *input, model_output_t *output) {",
                                                   "int32_t model_invoke(const model_input_t *input, model_output_t *output) {\n  " + body))
    return graph


@needs_arm
def test_fault_becomes_clear_error(model_path, tmp_path):
    graph = _custom_program(model_path(AD), tmp_path, "*(volatile int32_t *)0xFFFFFFF0u = 1;")
    b = mcu.board("stm32f746")
    elf = build.build_target(tmp_path, b)
    with pytest.raises(RuntimeError, match="faulted"):
        build.run_qemu(elf, b, mcu.pack_inputs(graph, mcu.random_inputs(graph, 1)), count_instructions=False)


@needs_arm
def test_hang_becomes_clear_error(model_path, tmp_path):
    graph = _custom_program(model_path(AD), tmp_path, "for (;;) { __asm__ volatile(\"\"); }")
    b = mcu.board("stm32f746")
    elf = build.build_target(tmp_path, b)
    with pytest.raises(RuntimeError, match="hangs"):
        build.run_qemu(elf, b, mcu.pack_inputs(graph, mcu.random_inputs(graph, 1)), count_instructions=False, timeout=5)


@needs_arm
def test_linker_rejects_model_over_board_sram(model_path, tmp_path):
    graph = _graph(model_path(DETECTION))
    lowered = mcu.export(graph, tmp_path)
    small = mcu.board("stm32f446")
    problems = small.check_fit(lowered.peak_sram_bytes, lowered.flash_bytes)
    assert len(problems) == 1 and problems[0].startswith("SRAM") and "over by" in problems[0]
    with pytest.raises(RuntimeError, match="overflow"):
        build.build_target(tmp_path, small)


def test_cli_export_writes_sources_and_memory_map(model_path, tmp_path):
    model = model_path(SWW)
    proc = subprocess.run([sys.executable, "-m", "mcu", "export", str(model), "--board", "stm32f746", "--backend",
                           "portable", "-o", str(tmp_path)], cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for f in ("model.c", "model.h", "tp_kernels.c", "tp_kernels.h", "README.md"):
        assert (tmp_path / f).is_file()
    assert "model_invoke" in (tmp_path / "model.h").read_text()
    assert "Arena (SRAM)" in (tmp_path / "README.md").read_text()


def test_cli_reports_over_budget_and_bad_backend(model_path, tmp_path):
    model = model_path(DETECTION)
    proc = subprocess.run([sys.executable, "-m", "mcu", "export", str(model), "--board", "stm32f446", "-o",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 1 and "SRAM" in proc.stderr and "over by" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mcu", "export", str(model), "--backend", "nope", "-o",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 2 and "backend 'nope'" in proc.stderr


def test_bad_inputs_give_clear_errors(model_path):
    with pytest.raises(ValueError, match="unknown board"):
        mcu.board("esp32")
    with pytest.raises(ValueError, match="conv variant"):
        codegen.Config(conv1x1="winograd")
    graph = _graph(model_path(KWS))
    graph.ops[0].kind = "LSTM"
    with pytest.raises(ValueError, match=r"op 0 \(LSTM .*unknown op kind"):
        codegen.lower(graph)


needs_cmsis = pytest.mark.skipif(
    not os.environ.get("CMSIS_NN_ROOT"),
    reason="cmsis-nn backend: set CMSIS_NN_ROOT to a CMSIS-NN checkout (github.com/ARM-software/CMSIS-NN) to test it",
)


@needs_cmsis
@pytest.mark.parametrize("name", MODELS)
def test_cmsis_nn_host_build_matches_tflm(name, model_path, tmp_path):
    path = model_path(name)
    graph = _graph(path)
    mcu.export(graph, tmp_path, codegen.Config(backend="cmsis-nn"))
    inputs = mcu.random_inputs(graph, SAMPLES, seed=6)
    run = build.run_host(build.build_host(tmp_path), mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)


@needs_cmsis
@needs_arm
@pytest.mark.parametrize("name", zoo.available(KWS))
def test_cmsis_nn_cortex_m7_matches_tflm_and_is_faster(name, model_path, tmp_path):
    path = model_path(name)
    graph = _graph(path)
    b = mcu.board("stm32f746")
    inputs = mcu.random_inputs(graph, 3, seed=7)
    counts = {}
    for backend in ("portable", "cmsis-nn"):
        d = tmp_path / backend
        mcu.export(graph, d, codegen.Config(backend=backend))
        run = build.run_qemu(build.build_target(d, b), b, mcu.pack_inputs(graph, inputs))
        _assert_matches_tflm(path, graph, run.outputs, inputs)
        counts[backend] = run.instructions[0]
    assert counts["cmsis-nn"] < counts["portable"]


def test_cmsis_nn_without_root_is_a_clear_error(model_path, monkeypatch):
    monkeypatch.delenv("CMSIS_NN_ROOT", raising=False)
    with pytest.raises(ValueError, match="CMSIS_NN_ROOT"):
        codegen.lower(_graph(model_path(KWS)), codegen.Config(backend="cmsis-nn"))


def test_export_uses_the_tuned_schedule(model_path, tmp_path):
    from mcu import tune
    from tuning import tuned

    model = model_path(IC)
    params = {"in_place": True, "conv1x1": "1x1", "patch_split": 7, "patch_grid": 4}
    # keyed by content: a copy of the model elsewhere finds the same schedule
    copy = tmp_path / model.name
    copy.write_bytes(model.read_bytes())
    tuned.store("mcu", tune.problem_key(str(copy), "stm32f746"), params)
    cmd = [sys.executable, "-m", "mcu", "export", str(model), "--board", "stm32f746", "-o", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "patch_split=7, patch_grid=4" in proc.stdout and "conv1x1='1x1'" in proc.stdout
    proc = subprocess.run([*cmd, "--untuned"], cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert "patch_split=-1" in proc.stdout


def test_search_space_measures_instructions_and_rejects_over_budget(model_path, monkeypatch):
    import dataclasses

    from mcu import boards, tune

    model = str(model_path(SWW))
    space = tune.search_space({"model": model, "target": "stm32f746"})
    assert [o.name for o in space.objectives] == ["instructions", "peak_sram_bytes"]
    assert {"in_place", "conv1x1", "patch_split", "patch_grid"} <= {k.name for k in space.knobs}
    assert space.violations(space.default) == []
    # the default trial is the specialized backend's default schedule, with per-layer knobs
    assert space.default["backend"] == "specialized" and any(k.name.startswith("kernel") for k in space.knobs)
    if shutil.which("qemu-system-arm"):
        config = space.to_config(space.default)
        m = space.measure(config)
        assert m["instructions"] > 0 and m["macs_per_instruction"] > 0
        assert m["peak_sram_bytes"] == codegen.lower(_graph(model),
                                                     tune.for_board(config, mcu.board("stm32f746"))).peak_sram_bytes
    # a board whose SRAM is 1 KiB short of the default schedule's arena: the default is over budget
    peak = codegen.lower(_graph(model), space.to_config(space.default)).peak_sram_bytes
    small = boards.BOARDS["stm32f746"]
    small = dataclasses.replace(small, name="small", sram_bytes=small.stack_bytes + peak - 1024)
    monkeypatch.setitem(boards.BOARDS, "small", small)
    tight = tune.search_space({"model": model, "target": "small"})
    assert any("over by 1024 B" in v for v in tight.violations(tight.default))
    with pytest.raises(ValueError, match="not found"):
        tune.search_space({"model": "nope.tflite", "target": "stm32f746"})


@needs_arm
def test_per_layer_instruction_profile_adds_up(model_path, tmp_path):
    graph = _graph(model_path(KWS))
    lowered = mcu.export(graph, tmp_path)
    b = mcu.board("stm32f746")
    x = mcu.pack_inputs(graph, mcu.random_inputs(graph, 2, seed=9))
    plain = build.run_qemu(build.build_target(tmp_path, b), b, x)
    profiled = build.run_qemu(build.build_target(tmp_path, b, profile_layers=True), b, x)
    layers = profiled.layer_instructions
    assert len(layers) == len(lowered.markers) == len(graph.ops)
    assert sum(layers) == profiled.instructions[0]
    # the markers cost a call and a return per layer, nothing else changes
    assert 0 < profiled.instructions[0] - plain.instructions[0] <= 4 * len(layers)
    np.testing.assert_array_equal(profiled.outputs, plain.outputs)
    convs = [n for n, op in zip(layers, graph.ops) if op.kind == "CONV_2D"]
    assert min(convs) > 100 * max(n for n, op in zip(layers, graph.ops) if op.kind == "RESHAPE")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_sanitized_host_build_matches_tflm_all(name, model_path, tmp_path):
    path = model_path(name)
    graph = _graph(path)
    mcu.export(graph, tmp_path)
    inputs = mcu.random_inputs(graph, SAMPLES, seed=10)
    run = build.run_host(build.build_host(tmp_path, sanitize=True), mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)


@needs_cmsis
@needs_arm
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_cmsis_nn_cortex_m7_matches_tflm_all(name, model_path, tmp_path):
    path = model_path(name)
    graph = _graph(path)
    mcu.export(graph, tmp_path, codegen.Config(backend="cmsis-nn"))
    b = mcu.board("stm32h743")
    inputs = mcu.random_inputs(graph, SAMPLES, seed=11)
    run = build.run_qemu(build.build_target(tmp_path, b), b, mcu.pack_inputs(graph, inputs))
    _assert_matches_tflm(path, graph, run.outputs, inputs)
