"""The fused LLM kernels against their jnp/lax references (Pallas interpreted on the CPU: tiny shapes).

Tolerances: f32 everywhere on the CPU; the kernels reorder sums (per-group partial sums, online
softmax), so we allow 1e-4 absolute on O(1) outputs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.llm import (
    decode_attention,
    flash_attention,
    qkv_projection,
    rmsnorm,
    rope,
    swiglu,
    w4a16,
)

TOL = {"atol": 1e-4, "rtol": 1e-4}


def _keys(n):
    return jax.random.split(jax.random.key(7), n)


@pytest.mark.parametrize("dim, residual", [(64, True), (48, True), (64, False)])
def test_rmsnorm_with_residual_matches_reference(dim, residual):
    kx, kr, kw = _keys(3)
    x = jax.random.normal(kx, (2, 3, dim))
    r = jax.random.normal(kr, (2, 3, dim)) if residual else None
    w = jax.random.normal(kw, (dim,))
    want = rmsnorm.reference(x, w, eps=1e-5, residual=r)
    got = rmsnorm.rmsnorm(x, w, eps=1e-5, residual=r, config=rmsnorm.Config(block_rows=2))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, **TOL)


def test_rmsnorm_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match="weight has shape"):
        rmsnorm.rmsnorm(jnp.ones((2, 8)), jnp.ones((4,)), eps=1e-5)


def test_rope_matches_reference_with_offsets_and_scaling():
    x = jax.random.normal(_keys(1)[0], (2, 3, 3, 32))
    pos = jnp.array([[0, 1, 2], [100, 101, 102]])
    want = rope.reference(x, pos, theta=1e5, scaling=2.0)
    np.testing.assert_allclose(rope.rope(x, pos, theta=1e5, scaling=2.0), want, **TOL)
    # the rotation preserves the norm of every (x1_i, x2_i) pair
    np.testing.assert_allclose(jnp.linalg.norm(want, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (4, 64, True), (4, 128, False), (8, 32, False)])
def test_quantize_roundtrip_error_is_within_half_a_step(bits, group, symmetric):
    """Round to nearest: half a step; Q4_0-style symmetric clips the side opposite the extreme
    (+8 steps does not exist), so there up to one step."""
    w = jax.random.normal(_keys(1)[0], (256, 48)) * 0.05
    q = w4a16.quantize(w, bits=bits, group=group, symmetric=symmetric)
    assert q.shape == (256, 48)
    err = jnp.abs(w4a16.dequantize(q) - w).reshape(256 // group, group, 48).max(axis=1)
    step = jnp.abs(q.scales.astype(jnp.float32))
    bound = (1.0 if symmetric else 0.5) * step * 1.01 + 1e-7
    assert bool(jnp.all(err <= bound)), "rounding error above the bound"


@pytest.mark.parametrize("bits, group, m", [(4, 32, 1), (4, 64, 3), (4, 128, 16), (8, 32, 2), (8, 32, 16), (16, 0, 2)])
def test_quantized_matmul_matches_dequantized_reference(bits, group, m):
    kx, kw = _keys(2)
    x = jax.random.normal(kx, (m, 256))
    w = jax.random.normal(kw, (256, 64)) * 0.05
    weight = w if bits == 16 else w4a16.quantize(w, bits=bits, group=group)
    want = w4a16.reference(x, weight)
    np.testing.assert_allclose(w4a16.quantized_matmul(x, weight), want, **TOL)
    np.testing.assert_allclose(w4a16.xla_matmul(x, weight), want, **TOL)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 5), n_tiles=st.integers(1, 3), k_groups=st.sampled_from([1, 2, 4]),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 100))
def test_quantized_matmul_shapes_property(m, n_tiles, k_groups, bits, seed):
    """Any M (padded to the row block), N a multiple of 16, K a multiple of the group."""
    kx, kw = jax.random.split(jax.random.key(seed))
    k, n = 32 * k_groups, 16 * n_tiles
    x = jax.random.normal(kx, (m, k))
    w = w4a16.quantize(jax.random.normal(kw, (k, n)) * 0.1, bits=bits, group=32)
    np.testing.assert_allclose(w4a16.quantized_matmul(x, w), w4a16.reference(x, w), **TOL)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fused_linear_norm_prologue_and_residual_epilogue_match_reference(bits):
    """RMSNorm in the prologue, the residual add (and the split-K partial sums, added atomically into
    the residual) in the epilogue; the same contract as the unfused reference."""
    kx, kw, kr, kn = _keys(4)
    x = jax.random.normal(kx, (3, 256))
    w = jax.random.normal(kw, (256, 48)) * 0.05
    weight = w if bits == 16 else w4a16.quantize(w, bits=bits, group=32)
    residual = jax.random.normal(kr, (3, 48))
    norm = 1.0 + 0.1 * jax.random.normal(kn, (256,))
    for kwargs in ({"norm_weight": norm}, {"residual": residual}, {"norm_weight": norm, "residual": residual}):
        want = w4a16.reference(x, weight, **kwargs)
        np.testing.assert_allclose(w4a16.quantized_matmul(x, weight, **kwargs), want, **TOL, err_msg=str(list(kwargs)))
    split = w4a16.Config(block_m=1, block_n=16, block_groups=1, split_k=4)
    np.testing.assert_allclose(w4a16.quantized_matmul(x, weight, residual=residual, config=split),
                               w4a16.reference(x, weight, residual=residual), **TOL)
    with pytest.raises(ValueError, match="split_k=4 needs a residual"):
        w4a16.quantized_matmul(x, weight, config=split)
    with pytest.raises(ValueError, match="norm needs the whole row"):
        w4a16.quantized_matmul(x, weight, norm_weight=norm, residual=residual, config=split)


def test_unpack_exact_bit_trick_equals_integer_conversion():
    """Every byte value: the OR-into-2^23 trick gives exactly the integer the nibble or int8 holds."""
    byte = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8)
    lo, hi = w4a16.unpack_exact(byte, 4)
    np.testing.assert_array_equal(lo, (np.arange(256) & 15).astype(np.float32))
    np.testing.assert_array_equal(hi, (np.arange(256) >> 4).astype(np.float32))
    (signed,) = w4a16.unpack_exact(jax.lax.bitcast_convert_type(byte, jnp.int8), 8)
    np.testing.assert_array_equal(signed, np.arange(256).astype(np.uint8).view(np.int8).astype(np.float32))


def test_quantized_matmul_bad_config_names_the_problem():
    w = w4a16.quantize(jnp.ones((64, 48)), bits=4, group=32)
    with pytest.raises(ValueError, match="block_n=32 must divide N=48"):
        w4a16.quantized_matmul(jnp.ones((1, 64)), w, config=w4a16.Config(block_m=1, block_n=32, block_groups=1))
    with pytest.raises(ValueError, match="K=32 but the weight has K=64"):
        w4a16.quantized_matmul(jnp.ones((1, 32)), w)


def test_embedding_lookup_dequantizes_only_the_picked_rows():
    w = w4a16.quantize(jax.random.normal(_keys(1)[0], (64, 100)), bits=8, group=32)
    ids = jnp.array([[3, 99], [0, 3]])
    np.testing.assert_allclose(w4a16.embedding_lookup(w, ids), w4a16.dequantize(w).T[ids], atol=1e-6)


@pytest.mark.parametrize("bits, m, norm", [(4, 1, False), (4, 16, True), (8, 2, True), (16, 1, True)])
def test_swiglu_fused_matches_reference(bits, m, norm):
    kx, kg, ku = _keys(3)
    x = jax.random.normal(kx, (m, 64))
    wg, wu = (jax.random.normal(k, (64, 32)) * 0.2 for k in (kg, ku))
    if bits != 16:
        wg, wu = w4a16.quantize(wg, bits=bits), w4a16.quantize(wu, bits=bits)
    norm_weight = 1.0 + 0.1 * jax.random.normal(kx, (64,)) if norm else None
    np.testing.assert_allclose(swiglu.swiglu(x, wg, wu, norm_weight=norm_weight),
                               swiglu.reference(x, wg, wu, norm_weight=norm_weight), **TOL)


@pytest.mark.parametrize("t, hq, hkv", [(40, 4, 2), (32, 2, 2)])
def test_flash_attention_causal_gqa_matches_reference(t, hq, hkv):
    kq, kk, kv = _keys(3)
    q = jax.random.normal(kq, (2, t, hq, 16))
    k = jax.random.normal(kk, (2, t, hkv, 16))
    v = jax.random.normal(kv, (2, t, hkv, 16))
    got = flash_attention.flash_attention(q, k, v, config=flash_attention.Config(block_q=16, block_k=16))
    np.testing.assert_allclose(got, flash_attention.reference(q, k, v), **TOL)


def test_decode_attention_split_k_matches_reference():  # a (B, Hkv, S, D) cache: one layer
    kq, kk, kv = _keys(3)
    q = jax.random.normal(kq, (3, 6, 16))
    kc = jax.random.normal(kk, (3, 2, 128, 16))
    vc = jax.random.normal(kv, (3, 2, 128, 16))
    lengths = jnp.array([1, 37, 128])  # one block, a ragged split, the whole cache
    got = decode_attention.decode_attention(q, kc, vc, lengths, config=decode_attention.Config(block_k=16, num_splits=4))
    np.testing.assert_allclose(got, decode_attention.reference(q, kc, vc, lengths), **TOL)


def test_flash_attention_applies_rope_inside_the_kernel():
    """Un-rotated q, k in; the same output as rotating them with the RoPE reference first."""
    kq, kk, kv = _keys(3)
    q = jax.random.normal(kq, (2, 48, 4, 32))
    k = jax.random.normal(kk, (2, 48, 2, 32))
    v = jax.random.normal(kv, (2, 48, 2, 32))
    rotary = rope.Rotary(theta=500.0, scaling=2.0)
    pos = jnp.broadcast_to(jnp.arange(48), (2, 48))
    rotated = flash_attention.reference(rope.reference(q, pos, theta=500.0, scaling=2.0),
                                        rope.reference(k, pos, theta=500.0, scaling=2.0), v)
    got = flash_attention.flash_attention(q, k, v, rotary=rotary,
                                          config=flash_attention.Config(block_q=32, block_k=16))
    np.testing.assert_allclose(got, rotated, **TOL)
    np.testing.assert_allclose(flash_attention.reference(q, k, v, rotary=rotary), rotated, **TOL)
    assert not np.allclose(got, flash_attention.reference(q, k, v), atol=1e-2), "RoPE made no difference"


def test_decode_attention_applies_rope_to_query_and_cached_keys():
    """The cache holds un-rotated keys: key i is rotated at position i, the query at length - 1."""
    kq, kk, kv = _keys(3)
    q = jax.random.normal(kq, (2, 4, 32))
    kc = jax.random.normal(kk, (2, 2, 128, 32))
    vc = jax.random.normal(kv, (2, 2, 128, 32))
    lengths = jnp.array([5, 100])
    rotary = rope.Rotary(theta=10000.0)
    rotated_k = rope.reference(kc.transpose(0, 2, 1, 3), jnp.broadcast_to(jnp.arange(128), (2, 128)),
                               theta=10000.0).transpose(0, 2, 1, 3)
    rotated_q = rope.reference(q[:, None], (lengths - 1)[:, None], theta=10000.0)[:, 0]
    want = decode_attention.reference(rotated_q, rotated_k, vc, lengths)
    got = decode_attention.decode_attention(q, kc, vc, lengths, rotary=rotary,
                                            config=decode_attention.Config(block_k=16, num_splits=4))
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(decode_attention.reference(q, kc, vc, lengths, rotary=rotary), want, **TOL)


def test_decode_attention_rejects_cache_not_a_multiple_of_block_k():
    q = jnp.ones((1, 2, 16))
    kc = jnp.ones((1, 2, 96, 16))
    with pytest.raises(ValueError, match="multiple of block_k=64"):
        decode_attention.decode_attention(q, kc, kc, jnp.array([5]), config=decode_attention.Config(64, 2))


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_attention_reads_the_stacked_cache_at_the_layer(splits):
    """Stacked (L, B, Hkv, S, D) caches read in place at a traced layer index; the split count need not
    divide anything (chunks are sized from the length at run time), and more splits than key blocks
    leave some programs without work."""
    kq, kk, kv = _keys(3)
    q = jax.random.normal(kq, (3, 4, 16))
    kc = jax.random.normal(kk, (3, 3, 2, 64, 16))
    vc = jax.random.normal(kv, (3, 3, 2, 64, 16))
    lengths = jnp.array([1, 23, 64])
    rotary = rope.Rotary(theta=1000.0)
    cfg = decode_attention.Config(block_k=16, num_splits=splits)
    got = jax.jit(lambda layer: decode_attention.decode_attention(q, kc, vc, lengths, layer=layer, rotary=rotary,
                                                                  config=cfg))(jnp.int32(1))
    want = decode_attention.reference(q, kc[1], vc[1], lengths, rotary=rotary)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("sms, batch, kv_heads, context, want", [
    (132, 1, 32, 4096, 9),     # LLaMA-2-7B: 32 programs per split, 264 wanted
    (132, 1, 8, 4096, 33),     # GQA with 8 kv heads
    (132, 16, 32, 4096, 1),    # batch 16 fills the GPU without splitting
    (132, 1, 32, 200, 4),      # capped by the key blocks of a short context
    (132, 1, 1, 65536, 64),    # capped by MAX_SPLITS
])
def test_decode_splits_cover_the_sms(sms, batch, kv_heads, context, want):
    assert decode_attention.decode_splits(sms, batch, kv_heads, context, 64) == want


@settings(max_examples=50, deadline=None)
@given(sms=st.integers(1, 200), batch=st.integers(1, 64), kv_heads=st.integers(1, 64),
       context=st.integers(1, 1 << 17), block_k=st.sampled_from([16, 32, 64, 128]))
def test_decode_splits_property(sms, batch, kv_heads, context, block_k):
    """The grid covers every SM twice unless the context has fewer key blocks or the cap binds; never
    a split without a key block at the full context; never more splits than needed."""
    splits = decode_attention.decode_splits(sms, batch, kv_heads, context, block_k)
    blocks = -(-context // block_k)
    assert 1 <= splits <= min(blocks, decode_attention.MAX_SPLITS)
    if splits < min(blocks, decode_attention.MAX_SPLITS):
        assert batch * kv_heads * splits >= 2 * sms
    if splits > 1:
        assert batch * kv_heads * (splits - 1) < 2 * sms


@pytest.mark.parametrize("bits, batch", [(4, 1), (8, 2), (16, 2)])
def test_qkv_projection_writes_the_new_rows_into_the_stacked_cache(bits, batch):
    """RMSNorm prologue + q/k/v GEMV; q comes out, k and v land at [layer, b, :, positions[b]] and
    nothing else of the cache changes."""
    ks = _keys(5)
    hq, hkv, d, dim = 4, 2, 16, 64
    h = jax.random.normal(ks[0], (batch, dim))
    norm = 1.0 + 0.1 * jax.random.normal(ks[1], (dim,))
    w = jax.random.normal(ks[2], (dim, (hq + 2 * hkv) * d)) * 0.1
    wqkv = w if bits == 16 else w4a16.quantize(w, bits=bits, group=32)
    kc = jax.random.normal(ks[3], (3, batch, hkv, 32, d))
    vc = jax.random.normal(ks[4], (3, batch, hkv, 32, d))
    positions = jnp.array([5, 31][:batch])
    want = qkv_projection.reference(h, norm, wqkv, kc, vc, 2, positions, n_heads=hq, n_kv_heads=hkv, eps=1e-5)
    got = qkv_projection.qkv_projection(h, norm, wqkv, kc, vc, 2, positions, n_heads=hq, n_kv_heads=hkv, eps=1e-5,
                                        config=qkv_projection.Config(block_m=1, block_n=16, block_groups=1))
    for a, b, name in zip(got, want, ("q", "k cache", "v cache")):
        np.testing.assert_allclose(a, b, **TOL, err_msg=name)
    changed = np.argwhere(np.asarray(got[1] != kc).any(axis=-1))
    assert sorted(map(tuple, changed)) == [(2, b, hh, int(positions[b])) for b in range(batch) for hh in range(hkv)]


def test_qkv_projection_bad_config_names_the_problem():
    w = w4a16.quantize(jnp.ones((64, 128)), bits=4, group=32)
    kc = jnp.zeros((1, 1, 2, 32, 16))
    with pytest.raises(ValueError, match="must divide head_dim=16"):
        qkv_projection.qkv_projection(jnp.ones((1, 64)), jnp.ones((64,)), w, kc, kc, 0, jnp.array([3]), n_heads=4,
                                      n_kv_heads=2, eps=1e-5, config=qkv_projection.Config(block_n=32))


@pytest.mark.parametrize("module", [w4a16, swiglu, rmsnorm, rope, flash_attention, decode_attention])
def test_search_space_default_is_legal(module):
    space = module.search_space(module.DEFAULT_PROBLEMS[0])
    assert space.violations(space.default) == []
    assert space.to_config(space.default) is not None
    assert {k.name for k in space.knobs} <= set(space.default)


@pytest.mark.gpu
def test_kernels_compile_on_gpu_at_llama_7b_shapes():
    kx, kw = _keys(2)
    x = jax.random.normal(kx, (1, 4096), jnp.bfloat16)
    w = w4a16.quantize(jax.random.normal(kw, (4096, 11008)) * 0.02, bits=4, group=32)
    want = w4a16.reference(x, w).astype(jnp.float32)
    np.testing.assert_allclose(w4a16.quantized_matmul(x, w).astype(jnp.float32), want, atol=0.05, rtol=0.02)
    q = jax.random.normal(kx, (1, 32, 128), jnp.bfloat16)
    kc = jax.random.normal(kw, (1, 8, 1024, 128), jnp.bfloat16)
    rotary = rope.Rotary(theta=10000.0)
    got = decode_attention.decode_attention(q, kc, kc, jnp.array([700]), rotary=rotary)
    want = decode_attention.reference(q, kc, kc, jnp.array([700]), rotary=rotary)
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=0.03)
    qp = jax.random.normal(kx, (1, 200, 32, 128), jnp.bfloat16)
    kp = jax.random.normal(kw, (1, 200, 8, 128), jnp.bfloat16)
    np.testing.assert_allclose(flash_attention.flash_attention(qp, kp, kp, rotary=rotary).astype(jnp.float32),
                               flash_attention.reference(qp, kp, kp, rotary=rotary).astype(jnp.float32), atol=0.03)
