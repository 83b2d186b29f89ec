"""The Hopper Mosaic GPU GEMV: its re-layout and arithmetic on the CPU (bit-exact where the kernel is
exact), the kernel itself on an H100/H200 only (``-m gpu``; it has not run yet)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.llm import gemv_mgpu, w4a16


def test_bf16_pair_dequantization_is_exact_for_every_byte():
    """0x4300 | q is the bf16 128 + q; minus 128 gives exactly the nibble, for all 256 bytes."""
    byte = np.arange(256, dtype=np.uint8)
    lo, hi = gemv_mgpu.dequant_bf16_pairs(jnp.asarray(byte))
    assert lo.dtype == hi.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(lo, np.float32), (byte & 15).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(hi, np.float32), (byte >> 4).astype(np.float32))


@pytest.mark.parametrize("group, symmetric", [(64, False), (128, False), (128, True)])
def test_relayout_dequantizes_bit_exactly_to_the_plain_dequantization(group, symmetric):
    w = jax.random.normal(jax.random.key(0), (512, 192)) * 0.05
    q = w4a16.quantize(w, bits=4, group=group, symmetric=symmetric)
    laid = gemv_mgpu.relayout(q)
    assert laid.packed_t.shape == (192, 256) and laid.shape == (512, 192)
    np.testing.assert_array_equal(gemv_mgpu.dequantize_layout(laid), w4a16.dequantize(q))
    dense = w.astype(jnp.bfloat16)
    np.testing.assert_array_equal(gemv_mgpu.dequantize_layout(gemv_mgpu.relayout(dense)), dense.astype(jnp.float32))


@pytest.mark.parametrize("m, bits", [(1, 4), (5, 4), (8, 4), (3, 16)])
def test_kernel_arithmetic_matches_the_dequantized_product(m, bits):
    """Per-group exact partial sums x . q of bf16 activations, then * scale + min * sum(x), + residual:
    equal to the dequantized product up to f32 summation order (and bf16 rounding of x, made on both
    sides)."""
    kx, kw, kr = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (m, 512)).astype(jnp.bfloat16).astype(jnp.float32)
    w = jax.random.normal(kw, (512, 128)) * 0.05
    weight = w4a16.quantize(w, bits=4, group=128) if bits == 4 else w.astype(jnp.bfloat16)
    residual = jax.random.normal(kr, (m, 128))
    got = gemv_mgpu.reference_from_layout(x, gemv_mgpu.relayout(weight), residual)
    dense = w4a16.dequantize(weight) if bits == 4 else weight.astype(jnp.float32)
    want = residual + jnp.dot(x, dense, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n_tiles, k_steps, sms, want", [
    (64, 32, 132, 2),    # 4096 x 4096 at g128: 128 units of 16 steps on 132 SMs
    (192, 32, 132, 2),   # the fused q/k/v (N = 12288): 3 waves of 16 steps beat 2 of 32
    (64, 86, 132, 2),    # K = 11008 at g128: 86 = 2 x 43 steps
    (1, 8, 4, 4),        # one tile: spread over every SM
])
def test_balanced_split_minimises_the_busiest_sm(n_tiles, k_steps, sms, want):
    split = gemv_mgpu.balanced_split(n_tiles, k_steps, sms)
    assert split == want and k_steps % split == 0


def test_relayout_and_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="4-bit weight with mins"):
        gemv_mgpu.relayout(w4a16.quantize(jnp.ones((64, 64)), bits=8, group=32))
    bad = gemv_mgpu.violations(gemv_mgpu.Config(stages=1), 16, 100, 4096, 4, 32)
    assert any("at most 8 rows" in b for b in bad) and any("multiple of 64" in b for b in bad)
    assert any("groups of 64 or 128" in b for b in bad) and any("at least 2" in b for b in bad)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("n, k", gemv_mgpu.SWEEP_SHAPES)
def test_mosaic_gemv_matches_its_reference_at_llama_7b_shapes(bits, n, k):
    if not gemv_mgpu.supported_on_this_device():
        pytest.skip("needs a Hopper GPU with the Mosaic GPU bindings")
    kx, kw, kr = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (1, k), jnp.bfloat16)
    w = jax.random.normal(kw, (k, n)) * 0.02
    laid = gemv_mgpu.relayout(w4a16.quantize(w, bits=4, group=128) if bits == 4 else w.astype(jnp.bfloat16))
    residual = jax.random.normal(kr, (1, n))
    got = gemv_mgpu.gemv(x, laid, residual)
    want = gemv_mgpu.reference_from_layout(x, laid, residual)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3, rtol=2e-3)
