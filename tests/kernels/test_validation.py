"""Every public kernel op on degenerate and mismatched inputs: a zero-size dimension gives the
empty result (what jnp.dot / lax.conv give, computed here without our code) or a ValueError that
names the dimension; a bias whose dtype the accumulator cannot hold exactly is refused, never
silently truncated. No Pallas tile runs on an empty problem, so these tests take seconds."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import conv, int8
from kernels import matmul as mm
from kernels.conv import depthwise
from kernels.llm import decode_attention, flash_attention, rmsnorm, rope, swiglu, w4a16

inverted_residual = importlib.import_module("kernels.conv.inverted_residual")
FAST = settings(max_examples=6, deadline=None)


def _shape_with_a_zero(draw, n: int, high: int = 5) -> tuple[int, ...]:
    sizes = [draw(st.integers(1, high)) for _ in range(n)]
    for i in draw(st.sets(st.integers(0, n - 1), min_size=1)):
        sizes[i] = 0
    return tuple(sizes)


def _random(key: int, shape, dtype=jnp.float32):
    if jnp.dtype(dtype) == jnp.int8:
        return jax.random.randint(jax.random.key(key), shape, -128, 128).astype(jnp.int8)
    return jax.random.normal(jax.random.key(key), shape, dtype)


# --------------------------------------------------------------------------------------------
# matmul (and the Mosaic GPU matmul behind it), int8 GEMM
# --------------------------------------------------------------------------------------------

@FAST
@given(st.data(), st.sampled_from(["float32", "bfloat16", "int8"]), st.booleans(), st.sampled_from([None, "relu"]))
def test_matmul_with_a_zero_dimension_is_jnp_dot(data, dtype, with_bias, activation):
    m, k, n = _shape_with_a_zero(data.draw, 3)
    a, b = _random(0, (m, k), dtype), _random(1, (k, n), dtype)
    acc = jnp.int32 if dtype == "int8" else jnp.float32
    bias = jnp.arange(n).astype(acc) if with_bias else None
    got = mm.matmul(a, b, bias=bias, activation=activation)
    want = jnp.dot(a, b, preferred_element_type=acc) + (0 if bias is None else bias)
    want = (jnp.maximum(want, 0) if activation else want).astype(jnp.int32 if dtype == "int8" else dtype)
    assert got.shape == (m, n) and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_matmul_mosaic_config_on_an_empty_problem_gives_the_empty_result():
    got = mm.matmul(jnp.ones((0, 64)), jnp.ones((64, 64)), config=mm.Config(backend="mosaic"))
    assert got.shape == (0, 64)


@pytest.mark.parametrize("bias, kind", [(np.full(16, 0.7, np.float32), "float32"), (np.ones(16, np.uint32), "uint32")])
def test_int8_matmul_refuses_a_bias_the_int32_accumulator_cannot_hold(bias, kind):
    a = jnp.ones((16, 16), jnp.int8)
    with pytest.raises(ValueError, match=rf"bias is {kind} but the kernel accumulates in int32; pass bias as int32"):
        mm.matmul(a, a, bias=bias)


def test_float_matmul_refuses_an_integer_bias():
    a = jnp.ones((16, 16))
    with pytest.raises(ValueError, match="bias is int32 but the kernel accumulates in float32"):
        mm.matmul(a, a, bias=jnp.arange(16))


def test_int8_matmul_takes_a_narrower_integer_bias_exactly():
    a = _random(2, (16, 16), jnp.int8)
    bias = np.arange(-8, 8, dtype=np.int16)
    got = mm.matmul(a, a, bias=bias, config=mm.Config(block_m=16, block_n=16, block_k=16))
    np.testing.assert_array_equal(got, jnp.dot(a, a, preferred_element_type=jnp.int32) + bias.astype(np.int32))


def _requant_operands(n: int):
    return (jnp.arange(n, dtype=jnp.int32), jnp.full((n,), 1 << 30, jnp.int32), jnp.zeros((n,), jnp.int32))


@FAST
@given(st.data(), st.booleans())
def test_int8_gemm_with_a_zero_dimension_is_the_integer_dot(data, pallas):
    m, k, n = _shape_with_a_zero(data.draw, 3)
    a, b = _random(3, (m, k), jnp.int8), _random(4, (k, n), jnp.int8)
    bias, mult, shift = _requant_operands(n)
    got = int8.gemm_requant(a, b, bias, mult, shift, output_offset=-3, act_min=-128, act_max=127, pallas=pallas)
    assert got.shape == (m, n) and got.dtype == jnp.int8
    # K = 0: the accumulator is the bias alone, halved (multiplier 2**30 is 0.5) and offset
    want = np.clip(np.floor(np.arange(n) / 2 + 0.5) - 3, -128, 127) if k == 0 else np.zeros((m, n))
    np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(want, (m, n)))


@pytest.mark.parametrize("name", ["bias", "multiplier", "shift"])
def test_int8_gemm_refuses_float_requantization_operands(name):
    operands = dict(zip(("bias", "multiplier", "shift"), _requant_operands(8)))
    operands[name] = operands[name].astype(jnp.float32) + 0.7
    a = jnp.ones((4, 8), jnp.int8)
    with pytest.raises(ValueError, match=rf"{name} is float32 but the kernel accumulates in int32"):
        int8.gemm_requant(a, jnp.ones((8, 8), jnp.int8), operands["bias"], operands["multiplier"],
                          operands["shift"], output_offset=0, act_min=-128, act_max=127)


def test_int8_gemm_names_mismatched_operands():
    ones = jnp.ones((4, 8), jnp.int8)
    bias, mult, shift = _requant_operands(8)
    with pytest.raises(ValueError, match=r"expects a \(M, K\) and b \(K, N\)"):
        int8.gemm_requant(ones, ones, bias, mult, shift, output_offset=0, act_min=-128, act_max=127)
    with pytest.raises(ValueError, match="multiplies int8 by int8"):
        int8.gemm_requant(ones.astype(jnp.float32), ones.T, bias[:4], mult[:4], shift[:4], output_offset=0,
                          act_min=-128, act_max=127)
    with pytest.raises(ValueError, match=r"multiplier must have shape \(4,\)"):
        int8.gemm_requant(ones, ones.T, bias[:4], mult, shift[:4], output_offset=0, act_min=-128, act_max=127)


def _int8_layer_args(out_channels: int):
    return {"stride": (1, 1), "dilation": (1, 1), "padding": ((1, 1), (1, 1)), "out_hw": (5, 5), "input_offset": 3,
            "output_offset": -1, "multiplier": np.full(out_channels, 1 << 30, np.int32),
            "shift": np.zeros(out_channels, np.int32), "act_min": -128, "act_max": 127}


def test_int8_layers_on_an_empty_batch_give_empty_outputs():
    x = jnp.zeros((0, 5, 5, 4), jnp.int8)
    y = int8.conv2d(x, np.ones((2, 3, 3, 4), np.int8), np.zeros(2, np.int32), **_int8_layer_args(2))
    assert y.shape == (0, 5, 5, 2) and y.dtype == jnp.int8
    y = int8.depthwise_conv2d(x, np.ones((1, 3, 3, 4), np.int8), np.zeros(4, np.int32), depth_multiplier=1,
                              **_int8_layer_args(4))
    assert y.shape == (0, 5, 5, 4) and y.dtype == jnp.int8
    fc = _int8_layer_args(6)
    y = int8.fully_connected(jnp.zeros((0, 10), jnp.int8), np.ones((6, 10), np.int8), np.zeros(6, np.int32),
                             input_offset=3, output_offset=-1, multiplier=fc["multiplier"], shift=fc["shift"],
                             act_min=-128, act_max=127)
    assert y.shape == (0, 6)


def test_int8_layers_refuse_a_float_bias():
    x = jnp.zeros((1, 5, 5, 4), jnp.int8)
    with pytest.raises(ValueError, match="bias is float32 but int8 kernels accumulate in int32"):
        int8.conv2d(x, np.ones((2, 3, 3, 4), np.int8), np.full(2, 0.7, np.float32), **_int8_layer_args(2))
    with pytest.raises(ValueError, match="bias is float64 but int8 kernels accumulate in int32"):
        int8.depthwise_conv2d(x, np.ones((1, 3, 3, 4), np.int8), np.full(4, 0.7), depth_multiplier=1,
                              **_int8_layer_args(4))
    with pytest.raises(ValueError, match="needs at least one tap"):
        int8.depthwise_conv2d(x, np.ones((1, 0, 3, 4), np.int8), np.zeros(4, np.int32), depth_multiplier=1,
                              **_int8_layer_args(4))


# --------------------------------------------------------------------------------------------
# Convolutions: every algorithm, the fused BN block, the inverted residual, in-place depthwise
# --------------------------------------------------------------------------------------------

def _lax_conv(x, w, groups, bias, activation):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups, preferred_element_type=jnp.float32)
    y = y + (0 if bias is None else bias)
    return jnp.minimum(jnp.maximum(y, 0), 6) if activation == "relu6" else y


ALGORITHM_CASES = {"im2col": (3, 1), "implicit_gemm": (3, 1), "winograd": (3, 1), "pointwise": (1, 1),
                   "depthwise": (3, None)}


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(sorted(ALGORITHM_CASES)), st.integers(1, 3), st.integers(1, 6), st.booleans(),
       st.sampled_from([None, "relu6"]))
def test_conv_on_an_empty_batch_is_lax_conv(algorithm, c, hw, with_bias, activation):
    kernel, groups = ALGORITHM_CASES[algorithm]
    groups = groups or c  # depthwise
    k = c if algorithm == "depthwise" else 4
    x, w = _random(5, (0, hw, hw, c)), _random(6, (kernel, kernel, c // groups, k))
    bias = jnp.arange(k, dtype=jnp.float32) if with_bias else None
    got = conv.conv2d(x, w, groups=groups, bias=bias, activation=activation, algorithm=algorithm)
    assert got.shape == (0, hw, hw, k) and got.dtype == x.dtype


@pytest.mark.parametrize("c, k", [(0, 4), (3, 0)])
def test_conv_without_channels_is_lax_conv(c, k):
    x, w = _random(7, (2, 5, 5, c)), _random(8, (3, 3, c, k))
    bias = jnp.linspace(-1, 1, k)
    got = conv.conv2d(x, w, bias=bias, activation="relu6")
    np.testing.assert_allclose(got, _lax_conv(x, w, 1, bias, "relu6"), atol=1e-6)
    assert got.shape == (2, 5, 5, k)


def test_conv_names_a_kernel_without_taps_and_refuses_an_integer_bias():
    x = jnp.ones((1, 5, 5, 4))
    with pytest.raises(ValueError, match="has a 0x3 kernel; it needs at least one tap"):
        conv.conv2d(x, jnp.ones((0, 3, 4, 8)))
    with pytest.raises(ValueError, match="conv2d: bias is int32 but the kernel accumulates in float32"):
        conv.conv2d(x, jnp.ones((3, 3, 4, 8)), bias=jnp.arange(8))


def test_conv_bn_act_on_an_empty_batch():
    ones = jnp.ones((8,))
    got = conv.conv2d_bn_act(jnp.zeros((0, 6, 6, 4)), jnp.ones((3, 3, 4, 8)), ones, ones, ones, ones)
    assert got.shape == (0, 6, 6, 8)


def _block_weights(cin=8, ce=16, cout=8):
    return (_random(9, (cin, ce)), jnp.zeros(ce), _random(10, (3, 3, 1, ce)), jnp.zeros(ce), _random(11, (ce, cout)),
            jnp.zeros(cout))


@pytest.mark.parametrize("x_shape, stride", [((0, 8, 8, 8), 1), ((0, 8, 8, 8), 2), ((1, 0, 8, 8), 1)])
def test_inverted_residual_with_a_zero_dimension_is_the_xla_block(x_shape, stride):
    x = jnp.zeros(x_shape)
    weights = _block_weights()
    got = inverted_residual.inverted_residual(x, *weights, stride=stride)
    want = inverted_residual.inverted_residual_reference(x, *weights, stride=stride)
    assert got.shape == want.shape and got.dtype == want.dtype


def test_inverted_residual_refuses_integer_biases_and_non_nhwc_input():
    w_e, b_e, w_d, b_d, w_p, b_p = _block_weights()
    with pytest.raises(ValueError, match="b_dw is int32 but the kernel accumulates in float32"):
        inverted_residual.inverted_residual(jnp.ones((1, 8, 8, 8)), w_e, b_e, w_d, b_d.astype(jnp.int32), w_p, b_p)
    with pytest.raises(ValueError, match=r"x must be NHWC \(4-D\)"):
        inverted_residual.inverted_residual(jnp.ones((8, 8, 8)), w_e, b_e, w_d, b_d, w_p, b_p)


def test_in_place_depthwise_on_an_empty_batch_and_an_integer_bias():
    buf = depthwise.halo_buffer(jnp.zeros((0, 4, 4, 16)), 3)
    out = depthwise.depthwise_conv_inplace(buf, jnp.ones((3, 3, 1, 16)), jnp.zeros(16), height=4, width=4)
    assert out.shape == buf.shape
    buf = depthwise.halo_buffer(jnp.zeros((1, 4, 4, 16)), 3)
    with pytest.raises(ValueError, match=r"bias must be a float \(16,\) array"):
        depthwise.depthwise_conv_inplace(buf, jnp.ones((3, 3, 1, 16)), jnp.zeros(16, jnp.int32), height=4, width=4)


# --------------------------------------------------------------------------------------------
# LLM kernels: empty batches, sequences and heads
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_of_no_rows_is_empty_and_of_no_features_is_refused(residual):
    x = jnp.zeros((2, 0, 64))
    y, h = rmsnorm.rmsnorm(x, jnp.ones(64), eps=1e-6, residual=x if residual else None)
    assert y.shape == h.shape == x.shape
    with pytest.raises(ValueError, match=r"empty last axis \(dim=0\)"):
        rmsnorm.rmsnorm(jnp.zeros((2, 0)), jnp.ones(0), eps=1e-6)


@pytest.mark.parametrize("shape", [(0, 3, 2, 16), (1, 0, 2, 16), (1, 3, 0, 16)])
def test_rope_of_an_empty_axis_is_empty(shape):
    x = jnp.zeros(shape)
    got = rope.rope(x, jnp.zeros(shape[:2], jnp.int32), theta=1e4)
    assert got.shape == shape


def test_rope_refuses_float_positions():
    with pytest.raises(ValueError, match="positions are float32; pass integer token positions"):
        rope.rope(jnp.ones((1, 2, 1, 16)), jnp.array([[0.0, 1.7]]), theta=1e4)


def _weights(kind: str, k: int, n: int):
    w = _random(12, (k, n))
    return w4a16.quantize(w, bits=4, group=32) if kind == "q4" else w


@pytest.mark.parametrize("kind, lead, n", [("dense", (0,), 32), ("q4", (2, 0), 32), ("dense", (3,), 0)])
def test_quantized_matmul_and_swiglu_of_no_rows_or_columns_are_empty(kind, lead, n):
    x = jnp.zeros((*lead, 64))
    w = _weights(kind, 64, n)
    assert w4a16.quantized_matmul(x, w).shape == (*lead, n)
    assert swiglu.swiglu(x, w, w).shape == (*lead, n)


def test_quantized_matmul_and_swiglu_name_k_zero():
    x, w = jnp.zeros((2, 0)), jnp.zeros((0, 32))
    with pytest.raises(ValueError, match="K=0 input features; quantized_matmul needs K >= 1"):
        w4a16.quantized_matmul(x, w)
    with pytest.raises(ValueError, match="K=0 input features; swiglu needs K >= 1"):
        swiglu.swiglu(x, w, w)


@pytest.mark.parametrize("b, t, hq", [(0, 16, 4), (1, 0, 4), (2, 0, 4)])
def test_flash_attention_of_an_empty_batch_or_sequence_is_empty(b, t, hq):
    q, kv = jnp.zeros((b, t, hq, 16)), jnp.zeros((b, t, 2, 16))
    got = flash_attention.flash_attention(q, kv, kv)
    want = flash_attention.reference(q, kv, kv)
    assert got.shape == want.shape == q.shape and got.dtype == want.dtype


def test_flash_attention_names_zero_kv_heads():
    with pytest.raises(ValueError, match=r"key/value heads 0 \(at least one\)"):
        flash_attention.flash_attention(jnp.zeros((1, 16, 4, 16)), jnp.zeros((1, 16, 0, 16)), jnp.zeros((1, 16, 0, 16)))


def test_decode_attention_of_an_empty_batch_is_empty_and_empty_caches_are_named():
    cache = jnp.zeros((0, 2, 256, 16))
    got = decode_attention.decode_attention(jnp.zeros((0, 4, 16)), cache, cache, jnp.zeros((0,), jnp.int32))
    assert got.shape == (0, 4, 16)
    q, empty = jnp.zeros((1, 4, 16)), jnp.zeros((1, 2, 0, 16))
    with pytest.raises(ValueError, match="KV cache has length S=0"):
        decode_attention.decode_attention(q, empty, empty, jnp.ones((1,), jnp.int32))
    cache = jnp.zeros((1, 2, 256, 16))
    with pytest.raises(ValueError, match=r"lengths must be integers of shape \(1,\), got float32"):
        decode_attention.decode_attention(q, cache, cache, jnp.ones((1,), jnp.float32))
    no_heads = jnp.zeros((1, 0, 256, 16))
    with pytest.raises(ValueError, match="key/value heads must be >= 1"):
        decode_attention.decode_attention(q, no_heads, no_heads, jnp.ones((1,), jnp.int32))
