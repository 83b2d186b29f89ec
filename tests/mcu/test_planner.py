"""Memory planner: no two buffers alive together overlap except where the kernel walk order
makes it safe; peak SRAM against TFLite Micro's arena and TinyEngine's PEAK_MEM."""
import numpy as np
import pytest

from mcu import codegen, planner
from models import quantization, tflite_import, tflm, zoo

MODELS = zoo.suite_models()
KWS = "mlperf_tiny_kws01_dscnn_int8"  # or its stand-in, which has the same layer shapes
IC = "mlperf_tiny_ic01_resnet8_cifar10_int8"


def _plan(path, in_place=True):
    g = tflite_import.load(str(path))
    params = [quantization.op_params(g, op) for op in g.ops]
    scratch = {i: codegen.scratch_bytes(g, op) for i, op in enumerate(g.ops)}
    return g, planner.plan_memory(g, params, scratch, in_place=in_place)


@pytest.mark.parametrize("name", MODELS)
def test_plan_has_no_unsafe_overlap(name, model_path):
    _, plan = _plan(model_path(name))
    bufs = list(plan.buffers.values())
    for i, a in enumerate(bufs):
        oa = plan.offsets[a.name]
        assert oa % planner.ALIGN == 0
        for b in bufs[i + 1 :]:
            ob = plan.offsets[b.name]
            if a.last < b.first or b.last < a.first or oa + a.size <= ob or ob + b.size <= oa:
                continue
            pair = (a.name, b.name) if (a.name, b.name) in plan.overlaps else (b.name, a.name)
            assert pair in plan.overlaps, f"{a.name} and {b.name} are alive together and overlap"
            src, dst = pair
            assert plan.offsets[dst] - plan.offsets[src] <= plan.overlaps[pair]


@pytest.mark.parametrize("name", MODELS)
def test_in_place_never_raises_the_peak(name, model_path):
    path = model_path(name)
    assert _plan(path, True)[1].peak_bytes <= _plan(path, False)[1].peak_bytes


def test_depthwise_in_place_limit_matches_walk_order(model_path):
    """3x3/s1 SAME depthwise on 5x5x4: output pixel p may start one input row plus one pixel
    below the first input byte still needed, i.e. delta = -(W + 1) * C (row above, pixel left)."""
    g = tflite_import.load(str(model_path(KWS)))
    op = next(op for op in g.ops if op.kind == "DEPTHWISE_CONV_2D")
    limit = planner.overlap_limit(g, op, 0, quantization.op_params(g, op))
    _, _, w, c = g.tensors[op.inputs[0]].shape
    # pixel (y, x) first reads (y-1, x-1): delta <= ((y-1)W + x-1)C - (yW + x + 1)C = -(W + 2)C
    assert limit == -(w + 2) * c


def test_channel_in_place_depthwise_saves_memory_on_dscnn(model_path):
    """TinyEngine's in-place depthwise needs one channel (25x5 B) instead of a second tensor."""
    g = tflite_import.load(str(model_path(KWS)))
    overlap = codegen.plan_schedule(g, codegen.Config())[1].peak_bytes
    channel = codegen.plan_schedule(g, codegen.Config(depthwise="channel_in_place"))[1]
    assert len(channel.channel_in_place) == 4 and channel.peak_bytes < overlap
    assert channel.peak_bytes < 8000 + 490 + 25 * 5 + 64  # one 25x5x64 tensor, the input, a channel, slack


def test_tinyengine_vww_below_tinyengine_peak_mem(reference_model):
    _, plan = _plan(reference_model("tinyengine_mcunet_vww_80_int8_floatio"))
    assert plan.peak_bytes < 93_992  # TinyEngine code_generator PEAK_MEM (shared/tflite/README.md)


@pytest.mark.parametrize(
    "name, patches",
    [("mlperf_tiny_kws01_dscnn_int8", False), ("mlperf_tiny_ad01_fc_autoencoder_int8", False),
     ("mlperf_tiny_ad01_fc_autoencoder_int8_floatio", False),
     ("mlperf_tiny_sww01_streaming_wakeword_int8", False), ("tinyengine_mcunet_vww_80_int8_floatio", False),
     ("mlperf_tiny_ic01_resnet8_cifar10_int8", True), ("mlperf_tiny_ic_resnet_large_cifar10_int8", True),
     ("mlperf_tiny_vww01_mobilenetv1_0.25_96_int8", True)],
)
def test_peak_sram_at_most_half_of_tflm_arena(name, patches, reference_model):
    """Goal <= 0.5x of TFLM's arena total. Not met by the detection model: its float32 input
    alone (245,760 B) is 0.64x of TFLM's total, and both runtimes hold it in SRAM."""
    path = reference_model(name)
    g = tflite_import.load(str(path))
    config = codegen.min_sram_config(g) if patches else codegen.Config()
    peak = codegen.plan_schedule(g, config)[1].peak_bytes
    total = tflm.arena_bytes(str(path))["total"]
    assert peak <= 0.5 * total, f"{peak} B vs TFLM {total} B"


def test_patches_cut_resnet_peak_and_reject_bad_splits(model_path):
    g = tflite_import.load(str(model_path(IC)))
    whole = codegen.plan_schedule(g, codegen.Config())[1].peak_bytes
    patched = codegen.plan_schedule(g, codegen.Config(patch_split=7, patch_grid=4))[1].peak_bytes
    assert patched < 0.75 * whole
    with pytest.raises(ValueError, match="used after it"):
        codegen.plan_schedule(g, codegen.Config(patch_split=5, patch_grid=4))
    with pytest.raises(ValueError, match="cannot run patch by patch"):
        codegen.plan_schedule(g, codegen.Config(patch_split=14, patch_grid=2))


@pytest.mark.parametrize("name", MODELS)
def test_peak_sram_below_tflm_activation_head(name, model_path):
    path = model_path(name)
    _, plan = _plan(path)
    head = tflm.arena_bytes(str(path))["head"]
    assert plan.peak_bytes <= head
    assert np.isfinite(plan.peak_bytes)
