"""The timing protocol: compile kept apart, validation outside the timed loop, input rotation,
interleaved comparisons with bootstrap intervals, what XLA ran."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels.conv as kc
from autotune import measure
from kernels import int8
from kernels import matmul as mm
from tuning import platform


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("kernel", ["matmul", "int8", "conv2d"])
def test_validation_runs_once_per_compile_not_per_repetition(monkeypatch, kernel):
    # Each public op checks its config with config_violations before dispatching; time it through
    # the protocol with warm-up and several samples, and count the checks.
    if kernel == "matmul":
        space = mm.search_space(mm.problem_key(32, 48, 40, "float32"))
        calls = _counting(monkeypatch, mm, "config_violations")
    elif kernel == "int8":
        space = int8.search_space(int8.problem_key(32, 16, 48))
        calls = _counting(monkeypatch, mm, "config_violations")  # gemm_requant -> matmul's checks
    else:
        space = kc.search_space(kc.parse_shape("1x8x8x16:16:3x3"))
        calls = _counting(monkeypatch, kc, "config_violations")
    timing = measure.time_space(space, space.to_config(space.default), warmup=2, repeats=4)
    assert timing.repeats == 4 and timing.calls_per_sample >= 1
    assert len(calls) == 1, f"validation ran {len(calls)} times for 1 compile + {2 + 4 + 2} calls"


def test_compile_is_kept_apart_and_samples_are_stored():
    w = measure.workload(lambda a, b: a @ b, lambda seed: (jnp.full((32, 32), seed + 1.0), jnp.ones((32, 32))))
    t = measure.time_callable(w, warmup=1, repeats=5)
    assert t.compile_seconds > 0 and t.repeats == 5 and len(t.wall_samples_seconds) == 5
    assert t.timer == "wall" and "GPU" in t.timer_note  # the CPU has no device-side timer
    low, high = t.interval_seconds
    assert low <= t.median_seconds <= high
    d = t.as_dict()
    assert d["samples_seconds"] == list(t.samples_seconds) and d["ci_low_seconds"] == low


def test_inputs_rotate_past_the_last_level_cache():
    def make_inputs(seed):
        return (jnp.full((1024,), float(seed), jnp.float32),)  # 4 KiB per set

    sets = measure.input_sets(make_inputs, cache_bytes=20 * 1024)
    assert sets.bytes_per_set == 4096 and len(sets.sets) == 6  # 5 other sets = 20 KiB >= the cache
    assert [float(s[0][0]) for s in sets.sets] == [0, 1, 2, 3, 4, 5]
    w = measure.workload(lambda x: x * 2, make_inputs, cache_bytes=20 * 1024)
    seen = [float(w()[0]) for _ in range(8)]
    assert seen == [0, 2, 4, 6, 8, 10, 0, 2]  # every call reads the next set
    t = measure.time_callable(w, warmup=0, repeats=2)
    assert t.cold_cache and t.input_sets == 6
    capped = measure.input_sets(make_inputs, cache_bytes=2**40)
    assert len(capped.sets) == measure.MAX_INPUT_SETS
    assert platform.last_level_cache_bytes() > 0


def test_compare_interleaves_rotated_rounds_and_needs_ten():
    order = []
    contenders = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    c = measure.compare(contenders, rounds=10, warmup=0)
    timed = order[-20:]  # after each contender's first call and calibration
    assert timed == ["a", "b", "b", "a"] * 5
    assert c.rounds == 10 and set(c.as_dict()["ratios"]) == {"b"}
    assert len(c.timings["a"].samples_seconds) == 10
    with pytest.raises(ValueError, match="at least 10"):
        measure.compare(contenders, rounds=3)
    with pytest.raises(ValueError, match="baseline 'z'"):
        measure.compare(contenders, baseline="z", rounds=10)


def _timing(samples):
    return measure.Timing(0.0, tuple(samples), tuple(samples), 1)


def test_verdict_is_parity_unless_intervals_do_not_overlap():
    rng = np.random.default_rng(0)
    base = 1.0 + 0.01 * rng.standard_normal(20)
    faster = 0.8 + 0.01 * rng.standard_normal(20)
    same = 1.0 + 0.01 * rng.standard_normal(20)
    slower = 1.3 + 0.01 * rng.standard_normal(20)
    c = measure.Comparison({"xla": _timing(base), "fast": _timing(faster), "same": _timing(same),
                            "slow": _timing(slower)}, "xla", 20)
    assert c.ratio("fast")["verdict"] == "win" and c.ratio("slow")["verdict"] == "loss"
    assert c.ratio("same")["verdict"] == "parity"
    r = c.ratio("fast")
    assert r["ratio_ci_low"] <= r["ratio"] <= r["ratio_ci_high"] and 1.2 < r["ratio"] < 1.3
    # a wide spread makes the same medians parity
    noisy = np.concatenate([faster[:10], 2.0 + faster[10:]])
    assert measure.Comparison({"xla": _timing(base), "n": _timing(noisy)}, "xla", 20).ratio("n")["verdict"] == "parity"


def test_bootstrap_interval_is_deterministic_and_holds_the_median():
    x = np.random.default_rng(1).exponential(size=31)
    low, high = measure.bootstrap_interval(x)
    assert (low, high) == measure.bootstrap_interval(x)
    assert low <= np.median(x) <= high and low < high


def test_xla_kernels_of_a_user_written_baseline():
    w = measure.workload(lambda a, b: jnp.dot(a, b), lambda seed: (jnp.ones((64, 32)), jnp.ones((32, 16))))
    found = w.xla_kernels()
    assert found["custom_calls"] or "dot" in found["entry_ops"] or found["fusions"], found
    # GPU HLO names cuBLAS through a custom call and element-wise work through fusions
    gpu_hlo = """HloModule jit_f, entry_computation_layout={(bf16[8,8]{1,0})->bf16[8,8]{1,0}}

%fused_convert (param_0: f32[8,8]) -> bf16[8,8] {
  %param_0 = f32[8,8]{1,0} parameter(0)
  ROOT %convert.1 = bf16[8,8]{1,0} convert(%param_0)
}

ENTRY %main (a: bf16[8,8], b: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %custom-call.1 = (f32[8,8]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
  %get-tuple-element = f32[8,8]{1,0} get-tuple-element(%custom-call.1), index=0
  ROOT %loop_convert_fusion = bf16[8,8]{1,0} fusion(%get-tuple-element), kind=kLoop, calls=%fused_convert
}
"""
    k = measure.xla_kernels(gpu_hlo)
    assert k["custom_calls"] == ["__cublas$lt$matmul"]
    assert k["fusions"] == [{"name": "loop_convert_fusion", "kind": "kLoop"}]
    assert k["entry_ops"] == ["custom-call", "fusion"]


def test_read_bandwidth_states_measured_and_nominal():
    bw = measure.read_bandwidth(4 * 2**20, repeats=3)
    assert bw["bytes"] == 4 * 2**20 and bw["measured_bytes_per_second"] > 0
    assert "nominal_bytes_per_second" in bw and bw["timer"] in ("wall", "cupti")


def test_device_samples_sum_the_kernels_of_each_call(monkeypatch):
    # The CUPTI session is replaced by one that reports two kernels per call of the workload, so
    # the bookkeeping (per-call sums, per-kernel medians, the fallback) runs on the CPU too.
    w = measure.workload(lambda x: x + 1, lambda seed: (jnp.full((8,), float(seed)),))
    calls = []
    compiled = w.compiled
    w.compiled = lambda *args: calls.append(1) or compiled(*args)
    per_call = [("fusion_add", 3e-3), ("copy", 1e-3)]  # milliseconds, as CUPTI reports them

    def fake_cupti():
        def start():
            calls.clear()

        return start, lambda: per_call * len(calls)

    monkeypatch.setattr(measure, "_cupti", fake_cupti)
    t = measure.time_callable(w, warmup=1, repeats=4, sample_seconds=1e-3)
    assert t.timer == "cupti" and t.timer_note == ""
    assert t.samples_seconds == pytest.approx([4e-6] * 4)
    assert dict(t.kernels) == pytest.approx({"fusion_add": 3e-6, "copy": 1e-6})
    assert len(t.wall_samples_seconds) == 4  # wall time kept beside the device time
    # beside a contender without device time (a peer in another process), every contender is wall time
    c = measure.compare({"peer": lambda: None, "ours": w}, rounds=10, warmup=0)
    assert {t.timer for t in c.timings.values()} == {"wall"} and "no device time for peer" in c.timings["ours"].timer_note
    per_call = []  # a session that records nothing: wall time, and the reason
    t = measure.time_callable(w, warmup=0, repeats=2)
    assert t.timer == "wall" and "no kernel" in t.timer_note


# ---------------------------------------------------------------------------------------------
# On an NVIDIA GPU (H100/H200): device-side time
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_device_time_of_a_1024_cubed_bf16_matmul_is_within_2x_of_flop_bound():
    def make_inputs(seed):
        ka, kb = jax.random.split(jax.random.key(seed))
        return (jax.random.normal(ka, (1024, 1024), jnp.bfloat16), jax.random.normal(kb, (1024, 1024), jnp.bfloat16))

    t = measure.time_callable(measure.workload(lambda a, b: jnp.dot(a, b), make_inputs), repeats=20)
    assert t.timer == "cupti", t.timer_note
    assert t.kernels, "CUPTI recorded no kernel"
    peak = platform.nominal_peak_flops("bfloat16")
    assert peak, f"no nominal peak for {platform.device_kind()}"
    bound = 2 * 1024**3 / peak
    assert t.median_seconds <= 2 * bound, (t.median_seconds, bound, t.kernels)
    assert t.wall_median_seconds >= 0.5 * t.median_seconds  # the host never sees less than the kernels


@pytest.mark.gpu
def test_device_read_stream_is_below_nominal_and_near_it():
    bw = measure.read_bandwidth()
    assert bw["timer"] == "cupti"
    nominal = bw["nominal_bytes_per_second"]
    assert nominal and 0.5 * nominal < bw["measured_bytes_per_second"] <= 1.05 * nominal, bw


@pytest.mark.gpu
def test_compare_pallas_matmul_with_jnp_dot_on_device():
    space = mm.search_space(mm.problem_key(2048, 2048, 2048, "bfloat16"))
    pallas = measure.workload(space.fn(space.to_config(space.default)), space.make_inputs)
    xla = measure.workload(lambda a, b: jnp.dot(a, b), space.make_inputs)
    c = measure.compare({"xla": xla, "pallas": pallas}, rounds=10)
    assert all(t.timer == "cupti" for t in c.timings.values())
    assert c.ratio("pallas")["verdict"] in ("win", "loss", "parity")
    ran = json.dumps(xla.xla_kernels())  # cuBLAS custom call or a Triton GEMM fusion, as XLA chose
    assert "gemm" in ran or "matmul" in ran, ran
