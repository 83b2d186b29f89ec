"""kernels.matmul against XLA (``reference``), with stated tolerances.

Tolerances: both sides accumulate in f32 (int32 for int8), so they differ only by summation order:
f32 outputs within 1e-5 relative (+ 1e-5 * sqrt(K) absolute); bf16 and f16 outputs within one unit
in the last place of the output type (2^-7 and 2^-10 relative); int8 -> int32 exactly.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import matmul as mm
from tuning import tuned

TOL = {"float32": 1e-5, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def operands(m, n, k, dtype, seed=0):
    ka, kb, kc = jax.random.split(jax.random.key(seed), 3)
    if dtype == "int8":
        a = jax.random.randint(ka, (m, k), -128, 128, jnp.int8)
        b = jax.random.randint(kb, (k, n), -128, 128, jnp.int8)
        bias = jax.random.randint(kc, (n,), -1000, 1000, jnp.int32)
    else:
        a = jax.random.normal(ka, (m, k), dtype)
        b = jax.random.normal(kb, (k, n), dtype)
        bias = jax.random.normal(kc, (n,), dtype)
    return a, b, bias


def assert_close(out, ref, dtype, k):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    out, ref = np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
    assert np.all(np.isfinite(out))
    if dtype == "int8":
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype] * np.sqrt(k))


configs = st.builds(
    mm.Config,
    block_m=st.sampled_from([16, 32, 64]),
    block_n=st.sampled_from([16, 32, 64]),
    block_k=st.sampled_from([16, 32, 64]),
    order=st.sampled_from(mm.ORDERS),
    group_m=st.integers(1, 4),
    unroll_k=st.integers(1, 3),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 150), n=st.integers(1, 150), k=st.integers(1, 150),
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
    with_bias=st.booleans(),
    activation=st.sampled_from([None, "relu"]),
    config=st.none() | configs,
)
def test_matches_reference_on_any_shape(m, n, k, dtype, with_bias, activation, config):
    a, b, bias = operands(m, n, k, dtype)
    bias = bias if with_bias else None
    out = mm.matmul(a, b, bias=bias, activation=activation, config=config)
    assert_close(out, mm.reference(a, b, bias=bias, activation=activation), dtype, k)


@pytest.mark.parametrize("activation", ["relu6", "gelu", "silu"])
def test_float_activations(activation):
    a, b, bias = operands(40, 48, 72, "float32", seed=3)
    out = mm.matmul(a, b, bias=bias, activation=activation)
    assert_close(out, mm.reference(a, b, bias=bias, activation=activation), "float32", 72)


def test_epilogue_hook_int8_requantize_shape():
    """The epilogue sees the int32 accumulator tile and (1, block_n) tiles of per-column operands."""
    a, b, _ = operands(37, 50, 90, "int8", seed=5)
    scale = jnp.linspace(0.001, 0.01, 50, dtype=jnp.float32)
    zero_point = jnp.arange(50, dtype=jnp.int32) - 25

    def requantize(acc, scale, zero_point):
        q = jnp.round(acc.astype(jnp.float32) * scale).astype(jnp.int32) + zero_point
        return jnp.clip(q, -128, 127)

    out = mm.matmul(a, b, epilogue=requantize, epilogue_operands=(scale, zero_point), out_dtype=jnp.int8,
                    config=mm.Config(block_m=16, block_n=16, block_k=32))
    ref = mm.reference(a, b, epilogue=requantize, epilogue_operands=(scale, zero_point), out_dtype=jnp.int8)
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert len(np.unique(np.asarray(out))) > 20  # the epilogue really ran (not all clipped)


def test_f32_uses_full_precision():
    # Values whose products need more than tf32's 10 mantissa bits.
    a = jnp.full((16, 16), 1.0 + 2.0**-20, jnp.float32)
    b = jnp.full((16, 16), 1.0 + 2.0**-20, jnp.float32)
    out = mm.matmul(a, b)
    np.testing.assert_allclose(np.asarray(out), 16 * (1.0 + 2.0**-20) ** 2, rtol=1e-7)


@pytest.mark.parametrize("order", mm.ORDERS)
@pytest.mark.parametrize("num_m,num_n,group_m", [(5, 3, 2), (4, 4, 8), (1, 7, 3), (6, 1, 4)])
def test_tile_orders_visit_every_tile_once(order, num_m, num_n, group_m):
    seen = [tuple(int(v) for v in mm.tile_coordinates(jnp.int32(pid), num_m=num_m, num_n=num_n,
                                                         order=order, group_m=group_m))
            for pid in range(num_m * num_n)]
    assert sorted(seen) == [(i, j) for i in range(num_m) for j in range(num_n)]


def test_forced_tiles_that_do_not_divide_are_refused_with_legal_ones():
    a, b, _ = operands(96, 64, 80, "float32")
    with pytest.raises(ValueError, match=r"block_k=64 does not divide K=80; legal block_k: \[16\]"):
        mm.matmul(a, b, config=mm.Config(block_m=32, block_n=32, block_k=64), pad=False)
    out = mm.matmul(a, b, config=mm.Config(block_m=32, block_n=32, block_k=16), pad=False)
    assert_close(out, mm.reference(a, b), "float32", 80)


@pytest.mark.parametrize(
    "a_shape,b_shape,kwargs,message",
    [
        ((4, 5), (6, 7), {}, "inner dimensions differ"),
        ((4, 5, 1), (5, 7), {}, "2-D operands"),
        ((4, 5), (5, 7), {"bias": np.zeros(3, np.float32)}, r"bias must have shape \(7,\)"),
        ((4, 5), (5, 7), {"activation": "tanh"}, "activation='tanh' is not supported"),
        ((4, 5), (5, 7), {"config": mm.Config(block_m=24)}, "block_m=24 must be a power of 2"),
        ((4, 5), (5, 7), {"config": mm.Config(backend="mosaic")}, "needs a Hopper GPU"),
        ((4, 5), (5, 7), {"epilogue_operands": (np.zeros(7),)}, "without an epilogue"),
    ],
)
def test_bad_input_is_named(a_shape, b_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mm.matmul(np.ones(a_shape, np.float32), np.ones(b_shape, np.float32), **kwargs)


def test_mixed_dtypes_refused():
    with pytest.raises(ValueError, match="a is float32 but b is bfloat16"):
        mm.matmul(jnp.ones((4, 4), jnp.float32), jnp.ones((4, 4), jnp.bfloat16))


def test_shared_memory_overflow_is_a_constraint_on_gpu():
    cfg = mm.Config(block_m=256, block_n=256, block_k=256, num_stages=5)
    problems = mm.config_violations(cfg, 4096, 4096, 4096, "bfloat16", backend="gpu")
    assert any("shared memory" in p and "lower num_stages or block_k" in p for p in problems)
    assert mm.config_violations(mm.Config(), 4096, 4096, 4096, "bfloat16", backend="gpu") == []
    # measured on an H100: Triton asked for 262144 B for this f32 config, over the 232448 B limit
    f32 = mm.Config(block_m=128, block_n=128, block_k=64, num_stages=3)
    assert mm.config_violations(f32, 512, 512, 512, "float32", backend="gpu")


def test_config_resolution_prefers_explicit_then_tuned_cache_then_heuristic():
    problem = mm.problem_key(48, 40, 24, "float32")
    heuristic = mm.heuristic_config(48, 40, 24, "float32")

    def resolve(config=None):
        return tuned.resolve("matmul", problem, config, config_type=mm.Config, heuristic=lambda: heuristic)

    assert resolve() == heuristic
    chosen = mm.Config(block_m=16, block_n=32, block_k=16, order="n_major", unroll_k=2)
    tuned.store("matmul", problem, chosen.params(), seconds=1.0)
    assert resolve() == chosen and resolve(heuristic) == heuristic
    # the public op takes the cached config: an illegal cached tile is what it complains about
    tuned.store("matmul", problem, dict(chosen.params(), block_m=24), seconds=1.0)
    with pytest.raises(ValueError, match="block_m=24"):
        mm.matmul(jnp.ones((48, 24)), jnp.ones((24, 40)))
    # the cache is keyed by device and jax version: another device's entry is not used
    entries = tuned.load()
    key = next(iter(entries))
    other = json.loads(key)
    other["device"] = "some other accelerator"
    tuned.save_all({json.dumps(other, sort_keys=True): entries[key]})
    assert resolve() == heuristic


def test_corrupt_cache_is_named(tmp_path, monkeypatch):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    monkeypatch.setenv("TINYPALLAS_CACHE", str(path))
    with pytest.raises(ValueError, match="not valid JSON.*delete the file"):
        mm.matmul(jnp.ones((4, 4)), jnp.ones((4, 4)))


def test_search_space_default_is_legal_and_runs():
    space = mm.search_space(mm.problem_key(40, 24, 72, "float32"))
    assert space.violations(space.default) == []
    knob_names = {k.name for k in space.knobs}
    assert {"block_m", "block_n", "block_k", "order", "unroll_k"} <= knob_names
    out = space.run(space.to_config(space.default))
    assert out.shape == (40, 24)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_triton_lowering_on_gpu(dtype):
    a, b, bias = operands(300, 260, 520, dtype, seed=11)
    for cfg in (mm.Config(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3),
                mm.Config(block_m=128, block_n=128, block_k=64, order="n_major", unroll_k=2, num_warps=8,
                          num_stages=2)):
        out = mm.matmul(a, b, bias=bias, activation="relu", config=cfg, interpret=False)
        assert_close(out, mm.reference(a, b, bias=bias, activation="relu"), dtype, 520)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mosaic_gpu_body_on_hopper(dtype):
    from tuning import platform

    if not platform.is_hopper():
        pytest.skip("Mosaic GPU wgmma body needs a Hopper GPU")
    a, b, _ = operands(512, 384, 320, dtype, seed=12)
    for cfg in (mm.Config(block_m=128, block_n=128, block_k=64, num_stages=4, backend="mosaic"),
                mm.Config(block_m=64, block_n=256, block_k=64, order="m_major", num_stages=3, backend="mosaic"),
                mm.Config(block_m=128, block_n=128, block_k=64, num_stages=3, backend="mosaic", warpgroups=2),
                mm.Config(block_m=64, block_n=256, block_k=64, order="n_major", num_stages=3, backend="mosaic",
                          warpgroups=2)):
        out = mm.matmul(a, b, activation="relu", config=cfg)
        assert_close(out, mm.reference(a, b, activation="relu"), dtype, 320)
