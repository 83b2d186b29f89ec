"""TFLite-exact integer quantization math, the one source of truth for every int8 runtime.

The multiplier/shift decomposition of real scales runs in numpy (float64, as TFLite's
``QuantizeMultiplier``); the integer primitives (gemmlowp's saturating rounding doubling high
multiply, rounding divide by a power of two, TFLite's ``MultiplyByQuantizedMultiplier`` with
double rounding, as TFLite Micro builds it by default) work on numpy arrays and on jnp arrays,
also inside Pallas kernel bodies: they use only 32-bit integer ops (no int64, which JAX lacks
without x64 and Triton handles poorly), so the same function serves the CPU reference, the
jitted graph executor and the kernel epilogues.
"""
from __future__ import annotations

import functools
import math

import numpy as np

try:  # jax is optional for the numpy half (the C generator needs only numpy)
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover
    jax = None
    jnp = None

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def _wrapping(fn):
    """int32/uint32 arithmetic here wraps on purpose (as the C++ does); silence numpy's scalar
    overflow warnings for it."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with np.errstate(over="ignore"):
            return fn(*args, **kwargs)

    return wrapped


def _xp(x):
    """numpy for numpy inputs (and Python ints), jax.numpy for jax arrays and tracers."""
    if jax is not None and isinstance(x, jax.Array | jax.core.Tracer):
        return jnp
    return np


# ----------------------------------------------------------------------------------------
# Real scale -> (multiplier, shift): TFLite's QuantizeMultiplier, in numpy.
# ----------------------------------------------------------------------------------------


def tflite_round(x: float) -> float:
    """C ``std::round``: half away from zero (``np.round`` rounds half to even)."""
    return math.copysign(math.floor(abs(x) + 0.5), x) if abs(x) < 2**52 else x


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier``: ``real ~= multiplier * 2**(shift - 31)``.

    ``multiplier`` is a Q0.31 int32 in [2**30, 2**31) (0 for a zero or tiny real value),
    ``shift`` is the power-of-two exponent (positive = left shift). Uses ``frexp`` on a
    float64 as TFLite does when built with floating point (the default).
    """
    real_multiplier = float(real_multiplier)
    if real_multiplier == 0.0:
        return 0, 0
    if not math.isfinite(real_multiplier):
        raise ValueError(f"cannot quantize a non-finite multiplier {real_multiplier}; check the tensor scales")
    fraction, shift = math.frexp(real_multiplier)
    q_fixed = int(tflite_round(fraction * (1 << 31)))
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if q_fixed > INT32_MAX:
        raise ValueError(f"multiplier {real_multiplier} does not fit in int32 fixed point")
    return q_fixed, shift


def quantize_multipliers(real_multipliers) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_multiplier`` over an array: int32 multipliers and int32 shifts."""
    pairs = [quantize_multiplier(float(r)) for r in np.asarray(real_multipliers, dtype=np.float64).ravel()]
    mult = np.array([p[0] for p in pairs], dtype=np.int32)
    shift = np.array([p[1] for p in pairs], dtype=np.int32)
    return mult, shift


def activation_range(activation: str, scale: float, zero_point: int, dtype: str = "int8") -> tuple[int, int]:
    """TFLite ``CalculateActivationRangeQuantized``: the clamp bounds of a fused activation."""
    info = np.iinfo(dtype)
    qmin, qmax = int(info.min), int(info.max)

    def quantize(real: float) -> int:
        # float32 division then round, as TFLite's Quantize() helper.
        return int(zero_point) + int(tflite_round(float(np.float32(real) / np.float32(scale))))

    if activation == "NONE":
        return qmin, qmax
    if activation == "RELU":
        return max(qmin, quantize(0.0)), qmax
    if activation == "RELU6":
        return max(qmin, quantize(0.0)), min(qmax, quantize(6.0))
    if activation == "RELU_N1_TO_1":
        return max(qmin, quantize(-1.0)), min(qmax, quantize(1.0))
    raise ValueError(f"unknown fused activation {activation!r}; expected NONE, RELU, RELU6 or RELU_N1_TO_1")


# ----------------------------------------------------------------------------------------
# Integer primitives (numpy or jnp, int32 in, int32 out).
# ----------------------------------------------------------------------------------------


def _u32(xp, x):
    return x.astype(xp.uint32) if hasattr(x, "astype") else xp.uint32(x)


@_wrapping
def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2**31)``, int32.

    Rounds half away from zero; the one overflow case (``a == b == INT32_MIN``) saturates to
    INT32_MAX. Computed on 16-bit limbs of ``|a|`` and ``|b|`` so no 64-bit integer is needed.
    """
    xp = _xp(a) if _xp(a) is not np else _xp(b)
    a = xp.asarray(a, dtype=xp.int32)
    b = xp.asarray(b, dtype=xp.int32)
    negative = (a < 0) != (b < 0)
    # |x| as uint32 (|INT32_MIN| = 2**31 fits).
    abs_a = xp.where(a < 0, -_u32(xp, a), _u32(xp, a))
    abs_b = xp.where(b < 0, -_u32(xp, b), _u32(xp, b))
    mask16 = xp.uint32(0xFFFF)
    a_hi, a_lo = abs_a >> 16, abs_a & mask16
    b_hi, b_lo = abs_b >> 16, abs_b & mask16
    # |a*b| = hh * 2**32 + mid * 2**16 + ll, each partial product < 2**32.
    hh = a_hi * b_hi
    mid = a_hi * b_lo + a_lo * b_hi  # a_hi <= 2**15, so the sum is < 2**32
    ll = a_lo * b_lo
    lo = ll + (mid << 16)
    hi = hh + (mid >> 16) + (lo < ll).astype(xp.uint32)
    # Nudge: +2**30 for a non-negative product, +(2**30 - 1) on the magnitude of a negative one
    # (C++ divides ab + (1 - 2**30) by 2**31 truncating toward zero).
    nudge = xp.where(negative, xp.uint32((1 << 30) - 1), xp.uint32(1 << 30))
    lo2 = lo + nudge
    hi = hi + (lo2 < lo).astype(xp.uint32)
    magnitude = (hi << 1) | (lo2 >> 31)  # floor((|ab| + nudge) / 2**31) < 2**31 but for the overflow case
    result = xp.where(negative, -magnitude, magnitude).astype(xp.int32)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return xp.where(overflow, xp.int32(INT32_MAX), result)


@_wrapping
def rounding_divide_by_pot(x, exponent):
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded half away from zero.

    ``exponent`` in [0, 31], a scalar or an array broadcasting against ``x`` (per channel).
    """
    xp = _xp(x) if _xp(x) is not np else _xp(exponent)
    x = xp.asarray(x, dtype=xp.int32)
    exponent = xp.asarray(exponent, dtype=xp.int32)
    mask = ((xp.uint32(1) << exponent.astype(xp.uint32)) - xp.uint32(1)).astype(xp.int32)
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(xp.int32)
    return (x >> exponent) + (remainder > threshold).astype(xp.int32)


@_wrapping
def multiply_by_quantized_multiplier(x, multiplier, shift):
    """TFLite ``MultiplyByQuantizedMultiplier`` (double rounding): ``x * multiplier * 2**(shift-31)``.

    ``multiplier``/``shift`` scalars or arrays broadcasting against ``x`` (per channel on the
    last axis). A positive shift multiplies ``x`` first (wrapping, as int32 C++ does).
    """
    xp = _xp(x)
    for other in (multiplier, shift):
        if xp is np:
            xp = _xp(other)
    x = xp.asarray(x, dtype=xp.int32)
    shift = xp.asarray(shift, dtype=xp.int32)
    left = xp.maximum(shift, 0)
    right = xp.maximum(-shift, 0)
    scaled = (_u32(xp, x) << left.astype(xp.uint32)).astype(xp.int32)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(scaled, multiplier), right)


def requantize(acc, multiplier, shift, output_zero_point, act_min, act_max, out_dtype="int8"):
    """The int8 epilogue: ``clamp(MBQM(acc, multiplier, shift) + zero_point, act_min, act_max)``.

    ``acc`` is the int32 accumulator with bias already added; ``multiplier``/``shift`` per
    output channel (last axis) or scalars.
    """
    xp = _xp(acc)
    y = multiply_by_quantized_multiplier(acc, multiplier, shift) + xp.int32(output_zero_point)
    return xp.clip(y, act_min, act_max).astype(out_dtype)


def round_half_away(x):
    """Float ``std::round`` elementwise (np/jnp), exact for all float32 values."""
    xp = _xp(x)
    t = xp.trunc(x)
    return xp.where(xp.abs(x - t) >= 0.5, t + xp.sign(x), t)


def affine_quantize(x, scale: float, zero_point: int, dtype: str = "int8"):
    """TFLite ``AffineQuantize``: float32 ``round(x / scale) + zero_point``, clamped."""
    xp = _xp(x)
    x = xp.asarray(x, dtype=xp.float32)
    divisor = xp.float32(scale)
    if xp is not np:
        # XLA rewrites division by a (broadcast) scalar as multiplication by its float32
        # reciprocal, which rounds differently: -3.7434509 / 0.03919844 is -95.5 (-> -96) but
        # * 25.511219 gives -95.49999 (-> -95). Behind the barrier the divisor is a full array
        # of unknown values, so the division stays a division.
        divisor = jax.lax.optimization_barrier(jnp.full(x.shape, divisor, jnp.float32))
    q = round_half_away(x / divisor)
    info = np.iinfo(dtype)
    q = xp.clip(q, float(INT32_MIN) + 128, float(INT32_MAX) - 128).astype(xp.int32) + xp.int32(zero_point)
    return xp.clip(q, int(info.min), int(info.max)).astype(dtype)


def dequantize(q, scale: float, zero_point: int):
    """TFLite ``Dequantize``: ``scale * (q - zero_point)`` as float32 (exact for int8 inputs)."""
    xp = _xp(q)
    return xp.float32(scale) * (xp.asarray(q).astype(xp.int32) - xp.int32(zero_point)).astype(xp.float32)


# ----------------------------------------------------------------------------------------
# gemmlowp fixed-point helpers used by TFLite's int8 softmax (raw int32 values).
# A FixedPoint<int32, I> holds real = raw * 2**(I - 31).
# ----------------------------------------------------------------------------------------


@_wrapping
def saturating_rounding_multiply_by_pot(x, exponent: int):
    """gemmlowp ``SaturatingRoundingMultiplyByPOT<exponent>`` (static exponent)."""
    xp = _xp(x)
    x = xp.asarray(x, dtype=xp.int32)
    if exponent == 0:
        return x
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    threshold = (1 << (31 - exponent)) - 1
    shifted = (_u32(xp, x) << xp.uint32(exponent)).astype(xp.int32)
    return xp.where(x > threshold, xp.int32(INT32_MAX), xp.where(x < -threshold, xp.int32(INT32_MIN), shifted))


def _fixed_mul(a, b):
    return saturating_rounding_doubling_high_mul(a, b)


def exp_on_interval_between_negative_one_quarter_and_0_excl(a):
    """gemmlowp: exp(a) for a in [-1/4, 0), Q0.31 in and out (Taylor series around -1/8)."""
    xp = _xp(a)
    constant_term = xp.int32(1895147668)  # exp(-1/8)
    constant_1_over_3 = xp.int32(715827883)
    x = a + xp.int32(1 << 28)  # a + 1/8
    x2 = _fixed_mul(x, x)
    x3 = _fixed_mul(x2, x)
    x4 = _fixed_mul(x2, x2)
    x4_over_4 = saturating_rounding_multiply_by_pot(x4, -2)
    poly = saturating_rounding_multiply_by_pot(_fixed_mul(x4_over_4 + x3, constant_1_over_3) + x2, -1)
    return constant_term + _fixed_mul(constant_term, x + poly)


@_wrapping
def exp_on_negative_values(a, integer_bits: int):
    """gemmlowp ``exp_on_negative_values`` of a FixedPoint<int32, integer_bits> (a <= 0); Q0.31 out."""
    xp = _xp(a)
    a = xp.asarray(a, dtype=xp.int32)
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = (a & xp.int32(one_quarter - 1)) - xp.int32(one_quarter)
    result = exp_on_interval_between_negative_one_quarter_and_0_excl(
        saturating_rounding_multiply_by_pot(a_mod_quarter_minus_one_quarter, integer_bits)
    )
    remainder = a_mod_quarter_minus_one_quarter - a
    # exp(-2**k) for k = -2 .. 4, Q0.31: multiply in each power of two present in the remainder.
    barrel = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401), (4, 242))
    for exponent, multiplier in barrel:
        if integer_bits > exponent:
            bit = xp.int32(1 << (fractional_bits + exponent))
            result = xp.where((remainder & bit) != 0, _fixed_mul(result, xp.int32(multiplier)), result)
    if integer_bits > 5:
        clamp = -(1 << (36 - integer_bits))
        result = xp.where(a < clamp, xp.int32(0), result)
    return xp.where(a == 0, xp.int32(INT32_MAX), result)


@_wrapping
def one_over_one_plus_x_for_x_in_0_1(a):
    """gemmlowp: 1 / (1 + a) for a in [0, 1) (Q0.31 in and out), Newton-Raphson from 48/17 - 32/17 x."""
    xp = _xp(a)
    a = xp.asarray(a, dtype=xp.int32)
    # RoundingHalfSum(a, One) = (a + INT32_MAX + 1) / 2 truncated; for a in [0, 2**31) that is
    # floor(a / 2) + 2**30, computed without overflow.
    half_denominator = (a >> 1) + xp.int32(1 << 30)
    x = xp.int32(1515870810) + _fixed_mul(half_denominator, xp.int32(-1010580540))  # Q2.29
    one_q2 = xp.int32(1 << 29)
    for _ in range(3):
        half_denominator_times_x = _fixed_mul(half_denominator, x)  # Q2.29
        one_minus = one_q2 - half_denominator_times_x
        x = x + saturating_rounding_multiply_by_pot(_fixed_mul(x, one_minus), 2)  # Q4 -> Q2
    return saturating_rounding_multiply_by_pot(x, 1)  # ExactMulByPot<-1> then Rescale<0>


def count_leading_zeros(x):
    """Leading zero bits of a 32-bit value (numpy or jnp)."""
    xp = _xp(x)
    if xp is np:
        u = np.asarray(x).astype(np.uint32).astype(np.uint64)
        bits = np.where(u == 0, 0, np.floor(np.log2(np.maximum(u, 1).astype(np.float64))).astype(np.int64) + 1)
        return (32 - bits).astype(np.int32)
    return jax.lax.clz(xp.asarray(x).astype(xp.uint32)).astype(xp.int32)


@_wrapping
def softmax_int8(x, input_multiplier: int, input_left_shift: int, diff_min: int, axis: int = -1):
    """TFLite reference int8 softmax (output scale 1/256, zero point -128) along ``axis``."""
    xp = _xp(x)
    x = xp.asarray(x).astype(xp.int32)
    diff = x - xp.max(x, axis=axis, keepdims=True)
    valid = diff >= diff_min
    # MultiplyByQuantizedMultiplierGreaterThanOne: left shift, then the doubling high multiply.
    rescaled = saturating_rounding_doubling_high_mul(
        (_u32(xp, diff) << xp.uint32(input_left_shift)).astype(xp.int32), xp.int32(input_multiplier)
    )
    exp_q0 = exp_on_negative_values(rescaled, 5)
    # Sum in Q12.19 (Rescale<12>), only over the elements within diff_min.
    sum_of_exps = xp.sum(xp.where(valid, rounding_divide_by_pot(exp_q0, 12), 0), axis=axis, keepdims=True)
    sum_of_exps = sum_of_exps.astype(xp.int32)
    headroom_plus_one = count_leading_zeros(sum_of_exps)
    num_bits_over_unit = 12 - headroom_plus_one
    shifted_sum_minus_one = ((_u32(xp, sum_of_exps) << headroom_plus_one.astype(xp.uint32)) - xp.uint32(1 << 31)).astype(xp.int32)
    shifted_scale = one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one)
    exponent = num_bits_over_unit + 31 - 8
    unsat = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted_scale, exp_q0), exponent)
    out = xp.clip(unsat - 128, -128, 127)
    return xp.where(valid, out, -128).astype(xp.int8)


# ----------------------------------------------------------------------------------------
# Unary int8 activations. Every function maps int8 values to int8 values with TFLite Micro's
# integer arithmetic; an int8 input has only 256 values, so the runtimes evaluate each once
# per op into a lookup table (``unary_table``) and gather.
# ----------------------------------------------------------------------------------------


def _wrap16(xp, v):
    """int16 wrap-around of an int32 value (C++ conversion of an int to ``int16_t``)."""
    return ((v + 32768) & 0xFFFF) - 32768


def _srdhm16(xp, a, b):
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int16 (values held in int32)."""
    ab = a * b
    nudge = xp.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    q = (ab + nudge) // 32768
    q = xp.where(((ab + nudge) < 0) & ((ab + nudge) % 32768 != 0), q + 1, q)  # C++ division truncates
    return xp.where((a == -32768) & (b == -32768), 32767, _wrap16(xp, q))


def _rdbpot16(xp, x, exponent: int):
    """gemmlowp ``RoundingDivideByPOT`` on int16: the mask is ``(1 << exponent) - 1`` cast to int16."""
    mask = ((1 << exponent) - 1 + 32768) % 65536 - 32768
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(xp.int32)
    return (x >> exponent) + (remainder > threshold).astype(xp.int32)


def downscale_multiplier_to_int16(multiplier: int) -> int:
    """TFLite ``DownScaleInt32ToInt16Multiplier`` (kernels/internal/common.h)."""
    if multiplier >= INT32_MAX - (1 << 15):
        return 32767
    return (int(multiplier) + (1 << 15)) >> 16


@_wrapping
def hard_swish_int8(x, *, input_zero_point: int, output_zero_point: int, reluish_multiplier: int,
                    reluish_exponent: int, output_multiplier: int, output_exponent: int):
    """TFLite ``reference_ops::HardSwish<int8_t>`` (reference/hard_swish.h): int16 fixed point.

    ``*_multiplier`` are the int16 multipliers of ``DownScaleInt32ToInt16Multiplier``; the
    intermediate int16 values wrap and saturate exactly where the C++ does.
    """
    xp = _xp(x)
    v = xp.asarray(x).astype(xp.int32) - input_zero_point
    hires = _wrap16(xp, v * 128)
    preshift = _srdhm16(xp, hires, xp.int32(output_multiplier))
    reluish = hires
    if reluish_exponent > 0:  # SaturatingLeftShift by exponent - 1, then by 1 after the multiply
        # (shifting an int16 by 16 or more saturates every non-zero value: cap it there)
        reluish = xp.clip(reluish * (1 << min(reluish_exponent - 1, 16)), -32768, 32767)
    reluish = _srdhm16(xp, reluish, xp.int32(reluish_multiplier))
    if reluish_exponent > 0:
        reluish = xp.clip(reluish * 2, -32768, 32767)
    if reluish_exponent < 0:
        reluish = _rdbpot16(xp, reluish, -reluish_exponent)
    reluish = _wrap16(xp, (reluish + (1 << 15)) >> 1)
    # SaturatingDoublingHighMul (hard_swish.h): no rounding nudge, C++ truncating division.
    ab = reluish * preshift
    high = xp.where(ab < 0, -((-ab) // 32768), ab // 32768)
    preshift_output = xp.where((reluish == -32768) & (preshift == -32768), 32767, _wrap16(xp, high))
    out = _wrap16(xp, _rdbpot16(xp, preshift_output, -output_exponent) + output_zero_point)
    return xp.clip(out, -128, 127).astype(xp.int8)


@_wrapping
def _rounding_half_sum_with_one(a):
    """gemmlowp ``RoundingHalfSum(a, One)`` for a Q0.31 ``a`` in [0, 2**31): floor(a/2) + 2**30."""
    xp = _xp(a)
    return (a >> 1) + xp.int32(1 << 30)


@_wrapping
def one_minus_x_over_one_plus_x_for_x_in_0_1(a):
    """gemmlowp (fixedpoint.h): (1 - a) / (1 + a) for a in [0, 1), Q0.31 in and out."""
    xp = _xp(a)
    a = xp.asarray(a, dtype=xp.int32)
    half_denominator = _rounding_half_sum_with_one(a)
    x = xp.int32(1515870810) + _fixed_mul(half_denominator, xp.int32(-1010580540))  # Q2.29
    for _ in range(3):
        one_minus = xp.int32(1 << 29) - _fixed_mul(half_denominator, x)
        x = x + saturating_rounding_multiply_by_pot(_fixed_mul(x, one_minus), 2)
    return saturating_rounding_multiply_by_pot(x - xp.int32(1 << 29), 2)  # Rescale<0>(x - F2::One())


@_wrapping
def logistic_q4(a):
    """gemmlowp ``logistic`` of a FixedPoint<int32, 4>; Q0.31 out."""
    xp = _xp(a)
    a = xp.asarray(a, dtype=xp.int32)
    positive = a > 0
    abs_input = xp.where(positive, a, -a)
    result_if_positive = one_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(-abs_input, 4))
    result_if_negative = xp.int32(INT32_MAX) - result_if_positive
    out = xp.where(positive, result_if_positive, result_if_negative)
    return xp.where(a == 0, xp.int32(1 << 30), out)


@_wrapping
def tanh_q4(a):
    """gemmlowp ``tanh`` of a FixedPoint<int32, 4>; Q0.31 out (ExactMulByPot<1> makes it Q5.26)."""
    xp = _xp(a)
    a = xp.asarray(a, dtype=xp.int32)
    negative = a < 0
    n = xp.where(negative, a, -a)
    t = one_minus_x_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(n, 5))
    out = xp.where(negative, -t, t)
    return xp.where(a == 0, xp.int32(0), out)


def input_radius(integer_bits: int, left_shift: int, total_signed_bits: int = 31) -> int:
    """TFLite ``CalculateInputRadius`` (quantization_util.cc)."""
    rescaled = 1.0 * ((1 << integer_bits) - 1) * (1 << (total_signed_bits - integer_bits)) / 2.0**left_shift
    return math.floor(rescaled)


@_wrapping
def logistic_int8(x, *, input_zero_point: int, input_range_radius: int, input_multiplier: int,
                  input_left_shift: int):
    """TFLite ``reference_integer_ops::Logistic`` (integer_ops/logistic.h); output scale 1/256, zp -128."""
    xp = _xp(x)
    v = xp.asarray(x).astype(xp.int32) - input_zero_point
    q4 = multiply_by_quantized_multiplier(v, input_multiplier, input_left_shift)
    out = rounding_divide_by_pot(logistic_q4(q4), 31 - 8) - 128
    out = xp.clip(out, -128, 127)
    out = xp.where(v <= -input_range_radius, -128, xp.where(v >= input_range_radius, 127, out))
    return out.astype(xp.int8)


@_wrapping
def tanh_int8(x, *, input_zero_point: int, input_range_radius: int, input_multiplier: int, input_left_shift: int):
    """TFLite ``reference_integer_ops::Tanh`` (integer_ops/tanh.h); output scale 1/128, zp 0."""
    xp = _xp(x)
    v = xp.asarray(x).astype(xp.int32) - input_zero_point
    q4 = multiply_by_quantized_multiplier(v, input_multiplier, input_left_shift)
    out = xp.clip(rounding_divide_by_pot(tanh_q4(q4), 31 - 7), -128, 127)
    out = xp.where(v <= -input_range_radius, -128, xp.where(v >= input_range_radius, 127, out))
    return out.astype(xp.int8)


@_wrapping
def leaky_relu_int8(x, *, input_zero_point: int, output_zero_point: int, identity_multiplier: int,
                    identity_shift: int, alpha_multiplier: int, alpha_shift: int):
    """TFLite ``reference_ops::QuantizeLeakyRelu`` (reference/leaky_relu.h); a negative alpha
    multiplier is applied as the negation of its magnitude's product, as there."""
    xp = _xp(x)
    v = xp.asarray(x).astype(xp.int32) - input_zero_point
    identity = multiply_by_quantized_multiplier(v, identity_multiplier, identity_shift)
    scaled = multiply_by_quantized_multiplier(v, abs(alpha_multiplier), alpha_shift)
    alpha = -scaled if alpha_multiplier < 0 else scaled
    out = output_zero_point + xp.where(v >= 0, identity, alpha)
    return xp.clip(out, -128, 127).astype(xp.int8)


@_wrapping
def requantize_int8(x, *, input_zero_point: int, output_zero_point: int, multiplier: int, shift: int,
                    act_min: int = -128, act_max: int = 127):
    """TFLite ``reference_ops::Requantize`` (int8 QUANTIZE) and ``ReluQuantized`` (activations.h,
    with the RELU clamp): ``clamp(MBQM(x - zp_in) + zp_out)``."""
    xp = _xp(x)
    v = xp.asarray(x).astype(xp.int32) - input_zero_point
    out = multiply_by_quantized_multiplier(v, multiplier, shift) + output_zero_point
    return xp.clip(out, act_min, act_max).astype(xp.int8)


def unary_table(fn, **params) -> np.ndarray:
    """The int8 -> int8 table of a unary op: entry ``i`` is ``fn(i - 128)`` (int8, 256 entries)."""
    return np.asarray(fn(np.arange(-128, 128, dtype=np.int32), **params), dtype=np.int8)


# ----------------------------------------------------------------------------------------
# Binary int8 ops (numpy-style broadcasting of the two operands).
# ----------------------------------------------------------------------------------------


@_wrapping
def add_int8(a, b, *, input1_offset, input2_offset, output_offset, left_shift, input1_multiplier, input1_shift,
             input2_multiplier, input2_shift, output_multiplier, output_shift, act_min, act_max):
    """TFLite ``reference_integer_ops::Add`` / ``BroadcastAdd4DSlow`` (integer_ops/add.h) and, with
    ``input2_multiplier`` applied as a subtraction by the caller, ``reference_ops::Sub``."""
    xp = _xp(a) if _xp(a) is not np else _xp(b)
    a = (xp.asarray(a).astype(xp.int32) + input1_offset) << left_shift
    b = (xp.asarray(b).astype(xp.int32) + input2_offset) << left_shift
    total = (multiply_by_quantized_multiplier(a, input1_multiplier, input1_shift)
             + multiply_by_quantized_multiplier(b, input2_multiplier, input2_shift))
    return requantize(total, output_multiplier, output_shift, output_offset, act_min, act_max)


@_wrapping
def sub_int8(a, b, *, input1_offset, input2_offset, output_offset, left_shift, input1_multiplier, input1_shift,
             input2_multiplier, input2_shift, output_multiplier, output_shift, act_min, act_max):
    """TFLite ``reference_ops::Sub`` / ``BroadcastQuantSubSlow`` (reference/sub.h): ADD's rescaling
    with the second scaled input subtracted."""
    xp = _xp(a) if _xp(a) is not np else _xp(b)
    a = (xp.asarray(a).astype(xp.int32) + input1_offset) << left_shift
    b = (xp.asarray(b).astype(xp.int32) + input2_offset) << left_shift
    total = (multiply_by_quantized_multiplier(a, input1_multiplier, input1_shift)
             - multiply_by_quantized_multiplier(b, input2_multiplier, input2_shift))
    return requantize(total, output_multiplier, output_shift, output_offset, act_min, act_max)


@_wrapping
def mul_int8(a, b, *, input1_offset, input2_offset, output_offset, output_multiplier, output_shift, act_min, act_max):
    """TFLite ``reference_integer_ops::MulElementwise`` / ``BroadcastMul6DSlow`` (integer_ops/mul.h)."""
    xp = _xp(a) if _xp(a) is not np else _xp(b)
    prod = (xp.asarray(a).astype(xp.int32) + input1_offset) * (xp.asarray(b).astype(xp.int32) + input2_offset)
    return requantize(prod, output_multiplier, output_shift, output_offset, act_min, act_max)


@_wrapping
def prelu_int8(x, alpha, *, input_offset, alpha_offset, output_offset, output_multiplier_1, output_shift_1,
               output_multiplier_2, output_shift_2):
    """TFLite ``reference_ops::BroadcastPrelu4DSlow`` (reference/prelu.h)."""
    xp = _xp(x) if _xp(x) is not np else _xp(alpha)
    v = xp.asarray(x).astype(xp.int32) + input_offset
    a = xp.asarray(alpha).astype(xp.int32) + alpha_offset
    positive = multiply_by_quantized_multiplier(v, output_multiplier_1, output_shift_1)
    negative = multiply_by_quantized_multiplier(v * a, output_multiplier_2, output_shift_2)
    out = xp.where(v >= 0, positive, negative) + output_offset
    return xp.clip(out, -128, 127).astype(xp.int8)
