"""TFLite-exact integer math (kernels.quant via models.quantization) against Python-int transcriptions
of gemmlowp/TFLite semantics, on numpy and on jnp (the two paths must agree bit for bit)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import quantization as q

int32s = st.integers(-(2**31), 2**31 - 1)


def srdhm_exact(a: int, b: int) -> int:
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    v = ab + nudge
    return abs(v) // (1 << 31) * (1 if v >= 0 else -1)  # C++ division truncates toward zero


def rdbpot_exact(x: int, e: int) -> int:
    mask = (1 << e) - 1
    return (x >> e) + (1 if (x & mask) > (mask >> 1) + (1 if x < 0 else 0) else 0)


def wrap32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


def mbqm_exact(x: int, m: int, s: int) -> int:
    left, right = max(s, 0), max(-s, 0)
    return rdbpot_exact(srdhm_exact(wrap32(x * (1 << left)), m), right)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(int32s, int32s), min_size=1, max_size=64))
def test_saturating_rounding_doubling_high_mul_matches_gemmlowp(pairs):
    a = np.array([p[0] for p in pairs], np.int32)
    b = np.array([p[1] for p in pairs], np.int32)
    want = np.array([srdhm_exact(int(x), int(y)) for x, y in pairs], np.int64)
    np.testing.assert_array_equal(q.saturating_rounding_doubling_high_mul(a, b), want)
    np.testing.assert_array_equal(np.asarray(q.saturating_rounding_doubling_high_mul(jnp.asarray(a), jnp.asarray(b))), want)


def test_saturating_rounding_doubling_high_mul_edge_cases():
    edges = [-(2**31), -(2**31) + 1, -1, 0, 1, 2**30, 2**31 - 1, -(2**30), 3, -3]
    a, b = np.meshgrid(np.array(edges, np.int32), np.array(edges, np.int32))
    want = np.vectorize(srdhm_exact)(a.astype(np.int64), b.astype(np.int64))
    np.testing.assert_array_equal(q.saturating_rounding_doubling_high_mul(a, b), want)
    np.testing.assert_array_equal(np.asarray(q.saturating_rounding_doubling_high_mul(jnp.asarray(a), jnp.asarray(b))), want)


@settings(max_examples=300, deadline=None)
@given(int32s, st.integers(0, 31))
def test_rounding_divide_by_pot_rounds_half_away_from_zero(x, e):
    assert int(q.rounding_divide_by_pot(np.int32(x), e)) == rdbpot_exact(x, e)
    assert int(q.rounding_divide_by_pot(jnp.int32(x), jnp.int32(e))) == rdbpot_exact(x, e)


@settings(max_examples=300, deadline=None)
@given(int32s, st.floats(1e-9, 60.0))
def test_multiply_by_quantized_multiplier_matches_tflite(x, real):
    m, s = q.quantize_multiplier(real)
    if s > 0:
        x = x >> 8  # TFLite's contract: the left-shifted value must not overflow
    want = mbqm_exact(x, m, s)
    assert int(q.multiply_by_quantized_multiplier(np.int32(x), m, s)) == want
    assert int(q.multiply_by_quantized_multiplier(jnp.int32(x), jnp.int32(m), jnp.int32(s))) == want


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-12, 1e6))
def test_quantize_multiplier_decomposes_real_scale(real):
    m, s = q.quantize_multiplier(real)
    if m == 0:
        assert real < 2.0**-31
        return
    assert 2**30 <= m < 2**31
    assert math.isclose(m * 2.0 ** (s - 31), real, rel_tol=2**-30)


def test_quantize_multiplier_known_values():
    assert q.quantize_multiplier(0.5) == (2**30, 0)
    assert q.quantize_multiplier(1.0) == (2**30, 1)
    assert q.quantize_multiplier(0.0) == (0, 0)
    assert q.quantize_multiplier(2.0**-40) == (0, 0)
    # rounding up to 2**31 renormalises: multiplier halves, shift grows
    assert q.quantize_multiplier(1.0 - 2.0**-40) == (2**30, 1)


def test_activation_range_matches_tflite_rules():
    assert q.activation_range("NONE", 0.1, 3) == (-128, 127)
    assert q.activation_range("RELU", 0.1, -5) == (-5, 127)
    assert q.activation_range("RELU6", 0.05, -128) == (-128, -8)
    assert q.activation_range("RELU6", 0.01, 0) == (0, 127)
    assert q.activation_range("RELU_N1_TO_1", 0.01, 0) == (-100, 100)
    with pytest.raises(ValueError, match="TANH"):
        q.activation_range("TANH", 0.1, 0)


def test_affine_quantize_rounds_half_away_from_zero():
    x = np.array([0.5, -0.5, 1.5, -1.5, 2.4999998, 1000.0, -1000.0], np.float32)
    want = np.array([1, -1, 2, -2, 2, 127, -128], np.int8)
    np.testing.assert_array_equal(q.affine_quantize(x, 1.0, 0), want)
    np.testing.assert_array_equal(np.asarray(q.affine_quantize(jnp.asarray(x), 1.0, 0)), want)


def test_affine_quantize_divides_under_jit_as_tflite_does():
    """TFLite divides by the scale in float32; under jit XLA would multiply by the reciprocal of a
    constant scale instead, which rounds this value to the other side of -95.5."""
    import jax

    x = np.array([0.0, -3.7434509, 1.0], np.float32)
    scale = float(np.float32(0.03919844))
    assert x[1] / np.float32(scale) == -95.5
    want = np.array([-1, -97, 25], np.int8)  # round(-95.5) = -96, plus zero point -1
    np.testing.assert_array_equal(q.affine_quantize(x, scale, -1), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: q.affine_quantize(v, scale, -1))(jnp.asarray(x))), want)


def test_softmax_int8_numpy_and_jnp_agree_and_sum_to_one():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (64, 10)).astype(np.int8)
    p = {"input_multiplier": 1717986918, "input_left_shift": 22, "diff_min": -248}
    y_np = q.softmax_int8(x, **p)
    y_j = np.asarray(q.softmax_int8(jnp.asarray(x), **p))
    np.testing.assert_array_equal(y_np, y_j)
    probs = (y_np.astype(np.float64) + 128) / 256
    assert np.all(np.abs(probs.sum(axis=1) - 1) < 0.05)
