"""The int8 Pallas kernels (GEMM + requantize epilogue, depthwise tap reduction) against their
XLA references, over random shapes; and the autotuning contract of the int8 GEMM."""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import int8, quant


def random_requant(rng, n):
    mult, shift = quant.quantize_multipliers(rng.uniform(1e-4, 2e-2, n))
    return jnp.asarray(mult), jnp.asarray(shift)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 70), st.integers(1, 40), st.integers(1, 90), st.integers(0, 10_000))
def test_int8_gemm_requant_matches_reference(m, n, k, seed):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.integers(-128, 128, (m, k), dtype=np.int8))
    b = jnp.asarray(rng.integers(-127, 128, (k, n), dtype=np.int8))
    bias = jnp.asarray(rng.integers(-20000, 20000, n, dtype=np.int32))
    mult, shift = random_requant(rng, n)
    kw = {"output_offset": int(rng.integers(-20, 20)), "act_min": -128, "act_max": int(rng.integers(0, 128))}
    got = int8.gemm_requant(a, b, bias, mult, shift, **kw)
    want = int8.gemm_requant_reference(a, b, bias, mult, shift, **kw)
    assert got.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(3, 10), st.integers(1, 20), st.sampled_from([1, 3, 5]), st.integers(1, 2),
       st.integers(1, 2), st.integers(0, 10_000))
def test_int8_depthwise_kernel_matches_reference(batch, size, channels, k, stride, mult, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(-128, 128, (batch, size, size, channels), dtype=np.int8))
    w = rng.integers(-127, 128, (1, k, k, channels * mult)).astype(np.int8)
    bias = rng.integers(-5000, 5000, channels * mult).astype(np.int32)
    m, s = random_requant(rng, channels * mult)
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    kw = {"stride": (stride, stride), "dilation": (1, 1), "padding": ((total // 2, total - total // 2),) * 2,
              "out_hw": (out, out), "depth_multiplier": mult, "input_offset": int(rng.integers(-20, 20)), "output_offset": 3,
              "multiplier": m, "shift": s, "act_min": -128, "act_max": 127}
    got = int8.depthwise_conv2d(x, w, bias, **kw)
    want = int8.depthwise_conv2d_reference(x, w, bias, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fold_input_offset_overflow_is_a_clear_error():
    w = np.full((4096, 2), 127, np.int8)
    with pytest.raises(ValueError, match="overflows int32"):
        int8.fold_input_offset(w, np.full(2, 2**31 - 10, np.int64), 128)


@pytest.mark.parametrize("shape, out_shape", [("64x16x144", (64, 16)), ("dw:64x32x9", (1, 8, 8, 32))])
def test_int8_search_space_contract(shape, out_shape):
    problem = int8.parse_shape(shape)
    space = int8.search_space(problem)
    assert space.kernel == "int8" and space.problem == problem
    assert space.violations(space.default) == []
    bad = dict(space.default, block_m=24)
    assert any("power of 2" in v for v in space.violations(bad))
    for block_m in (16, space.default["block_m"]):
        out = space.run(space.to_config(dict(space.default, block_m=block_m)))
        assert out.shape == out_shape and out.dtype == jnp.int8
    assert all(p["dtype"] == "int8" for ps in int8.PRESETS.values() for p in ps)
    assert {p["op"] for p in int8.DEFAULT_PROBLEMS} == {"gemm", "depthwise"}


def test_int8_parse_shape_errors_name_the_syntax():
    with pytest.raises(ValueError, match="MxNxK"):
        int8.parse_shape("64x16")
    with pytest.raises(ValueError, match="dw:1024x32x9"):
        int8.parse_shape("dw:64xAx9")


@pytest.mark.gpu
def test_int8_kernels_compile_through_triton_and_match_reference():
    from tuning import platform

    if platform.backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.integers(-128, 128, (300, 200), dtype=np.int8))
    b = jnp.asarray(rng.integers(-127, 128, (200, 48), dtype=np.int8))
    bias = jnp.asarray(rng.integers(-20000, 20000, 48, dtype=np.int32))
    mult, shift = random_requant(rng, 48)
    kw = {"output_offset": 5, "act_min": -128, "act_max": 100}
    got = int8.gemm_requant(a, b, bias, mult, shift, interpret=False, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(int8.gemm_requant_reference(a, b, bias, mult, shift, **kw)))
    x = jnp.asarray(rng.integers(-128, 128, (4, 12, 12, 40), dtype=np.int8))
    w = rng.integers(-127, 128, (1, 3, 3, 40)).astype(np.int8)
    m, s = random_requant(rng, 40)
    dkw = {"stride": (2, 2), "dilation": (1, 1), "padding": ((0, 1), (0, 1)), "out_hw": (6, 6), "depth_multiplier": 1,
               "input_offset": 7, "output_offset": -3, "multiplier": m, "shift": s, "act_min": -128, "act_max": 127}
    bias_dw = rng.integers(-5000, 5000, 40).astype(np.int32)
    got = int8.depthwise_conv2d(x, w, bias_dw, interpret=False, **dkw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(int8.depthwise_conv2d_reference(x, w, bias_dw, **dkw)))
