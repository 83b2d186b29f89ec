"""The compiled CPU kernels against their jnp references, on every ISA body this machine runs.

The scalar and AVX2 bodies are forced through ``Config.isa`` on a machine that also runs AVX-512,
so each body is checked here, not only the fastest. Tolerances: the quantized matmul's per-block
dot products are exact integers in the kernel and in the reference, so only the f32 sums of scaled
blocks differ in order (1e-5 relative to the output's scale); attention and RMSNorm are f32 with
reordered sums (2e-5 absolute on O(1) values).
"""
import shutil
import subprocess

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.cpu import attention, build, matmul, qmatmul, rmsnorm
from kernels.llm import rope, w4a16

pytestmark = pytest.mark.skipif(build.availability() is not None,
                                reason=f"the CPU kernels do not build here: {build.availability()}")
ISAS = build.supported_isas()


def _close(got, want, rel=1e-5):
    scale = float(jnp.max(jnp.abs(want))) + 1e-6
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=rel * scale, rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", qmatmul.FORMATS)
def test_quantized_matmul_matches_reference_on_every_isa(isa, fmt):
    for m, k, n in ((1, 576, 96), (5, 96, 37)):  # a decode GEMV; tails in M and N
        w = qmatmul.random_weight(k, n, fmt, seed=m)
        x = jax.random.normal(jax.random.key(3), (m, k))
        want = jax.jit(qmatmul.reference)(x, w)
        for cfg in (qmatmul.Config(isa=isa), qmatmul.Config(isa=isa, threads=2, block_m=4, block_n=4, tile_m=4,
                                                               tile_n=8, unroll=2, order="m_outer", prefetch=0)):
            _close(qmatmul.quantized_matmul(x, w, config=cfg), want)
        # what the 8-bit activations cost against the plain f32 product: about 1% here
        dense = qmatmul.dense_reference(x, w)
        assert float(jnp.max(jnp.abs(want - dense))) < 0.03 * float(jnp.max(jnp.abs(dense)))


_AWKWARD = {}  # one odd-sized problem (tails in M, N and K's block count), built once


def _awkward():
    if not _AWKWARD:
        w = qmatmul.random_weight(96, 37, "q4_1")
        x = jax.random.normal(jax.random.key(9), (7, 96))
        _AWKWARD.update(x=x, w=w, want=jax.jit(qmatmul.reference)(x, w))
    return _AWKWARD


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bm=st.sampled_from((1, 2, 4)), bn=st.sampled_from((1, 2, 4)), tile_m=st.integers(1, 8),
       tile_n=st.integers(1, 40), order=st.sampled_from(qmatmul.ORDERS), unroll=st.sampled_from((1, 2)),
       threads=st.integers(1, 3), prefetch=st.sampled_from((0, 64, 4096)))
def test_quantized_matmul_any_tiling(bm, bn, tile_m, tile_n, order, unroll, threads, prefetch):
    p = _awkward()
    cfg = qmatmul.Config(isa=ISAS[-1], threads=threads, block_m=bm, block_n=bn, tile_m=tile_m, tile_n=tile_n,
                         order=order, unroll=unroll, prefetch=prefetch)
    _close(qmatmul.quantized_matmul(p["x"], p["w"], config=cfg), p["want"])


def test_activation_quantization_is_llama_cpps_q8():
    """Against gguf's Q8_0 quantizer (ggml's reference C, in numpy): same f16 scales; values equal
    except where ggml's scalar reference rounds a tie away from zero and its x86 SIMD path (which we
    follow, and which llama.cpp runs here) rounds it to even."""
    x = np.array(jax.random.normal(jax.random.key(0), (64, 256)), np.float32)
    x[0, :32] = np.concatenate([[127.0], np.arange(31) - 15.5])  # 127/amax = 1: every other value is a tie
    q, d, _ = qmatmul.quantize_activations(jnp.asarray(x))
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(64, 8, 34)
    their_d = theirs[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    their_q = theirs[..., 2:].copy().view(np.int8).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(d), their_d)
    diff = np.abs(np.asarray(q) - their_q)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 32, False), (4, 64, False), (4, 128, True),
                                                    (8, 32, True), (8, 64, True)])
def test_cpu_layout_is_exact(bits, group, symmetric):
    w = jax.random.normal(jax.random.key(1), (2, 256, 48)) * 0.1  # a stack of two layers
    q = w4a16.quantize(w, bits=bits, group=group, symmetric=symmetric)
    b = qmatmul.cpu_layout(q)
    assert b.format == ("q8_0" if bits == 8 else "q4_0" if symmetric else "q4_1")
    for layer in range(2):
        np.testing.assert_array_equal(np.asarray(qmatmul.dequantize(b.at(layer))),
                                      np.asarray(w4a16.dequantize(q)[layer]))


@pytest.mark.parametrize("isa", ISAS)
def test_swiglu_matches_reference(isa):
    wg, wu = qmatmul.random_weight(128, 40, "q4_0", 1), qmatmul.random_weight(128, 40, "q4_1", 2)
    x = jax.random.normal(jax.random.key(4), (3, 128))
    cfg = qmatmul.Config(isa=isa, threads=2, tile_n=16)
    _close(qmatmul.swiglu(x, wg, wu, config=cfg), jax.jit(qmatmul.swiglu_reference)(x, wg, wu))


@pytest.mark.parametrize("isa", ISAS)
def test_attention_writes_the_cache_and_matches_reference(isa):
    ks = jax.random.split(jax.random.key(0), 5)
    n_layers, b, hq, hkv, s, d = 3, 2, 6, 2, 64, 16
    rotary = rope.Rotary(theta=500.0, scaling=2.0, llama3=(4.0, 1.0, 4.0, 16.0))
    for t, starts in ((1, [5, 40]), (7, [0, 57])):  # decode; a chunk of prefill ending at the cache's end
        q = jax.random.normal(ks[0], (b, t, hq, d))
        kn, vn = jax.random.normal(ks[1], (b, t, hkv, d)), jax.random.normal(ks[2], (b, t, hkv, d))
        kc, vc = jax.random.normal(ks[3], (n_layers, b, hkv, s, d)), jax.random.normal(ks[4], (n_layers, b, hkv, s, d))
        starts = jnp.array(starts, jnp.int32)
        want = jax.jit(lambda *a: attention.reference(*a, rotary=rotary))(q, kn, vn, kc, vc, 1, starts)
        for cfg in (attention.Config(isa=isa), attention.Config(isa=isa, threads=2, splits=3)):
            got = jax.jit(lambda *a, cfg=cfg: attention.attention(*a, rotary=rotary, config=cfg))(
                q, kn, vn, kc, vc, 1, starts)
            np.testing.assert_allclose(got[0], want[0], atol=2e-5)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.parametrize("isa", ISAS)
def test_rmsnorm_matches_reference(isa):
    kx, kr, kw = jax.random.split(jax.random.key(5), 3)
    x, r, w = jax.random.normal(kx, (20, 96)), jax.random.normal(kr, (20, 96)), jax.random.normal(kw, (96,))
    for residual in (r, None):
        want = rmsnorm.reference(x, w, eps=1e-5, residual=residual)
        got = rmsnorm.rmsnorm(x, w, eps=1e-5, residual=residual, config=rmsnorm.Config(isa=isa, threads=2))
        np.testing.assert_allclose(got[0], want[0], atol=2e-5)
        np.testing.assert_allclose(got[1], want[1], atol=0)


@pytest.mark.parametrize("variant", matmul.VARIANTS)
def test_lesson_matmul_variants_match_jnp(variant):
    a = jax.random.normal(jax.random.key(0), (37, 70))
    b = jax.random.normal(jax.random.key(1), (70, 53))
    cfg = matmul.Config(variant=variant, tile_m=8, tile_n=16, tile_k=32, unroll=4, isa=ISAS[-1], threads=2)
    np.testing.assert_allclose(matmul.matmul(a, b, config=cfg), matmul.reference(a, b), atol=1e-4, rtol=1e-5)


def test_bad_inputs_are_clear_errors():
    w = qmatmul.random_weight(64, 8, "q4_1")
    with pytest.raises(ValueError, match="K=32 but the weight has K=64"):
        qmatmul.quantized_matmul(jnp.ones((1, 32)), w)
    with pytest.raises(ValueError, match="float32"):
        qmatmul.quantized_matmul(jnp.ones((1, 64), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="block_n=3"):
        qmatmul.Config(block_n=3)
    with pytest.raises(ValueError, match="isa='sse9'"):
        qmatmul.Config(isa="sse9")
    unsupported = next((i for i in build.ISAS if i not in ISAS), None)
    if unsupported:
        with pytest.raises(build.BuildError, match=f"does not run the {unsupported} kernels"):
            qmatmul.quantized_matmul(jnp.ones((1, 64)), w, config=qmatmul.Config(isa=unsupported))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs a cross compiler: apt-get install g++-aarch64-linux-gnu")
@pytest.mark.parametrize("march", ["armv8.2-a+dotprod", "armv8-a"])
def test_neon_bodies_compile_for_aarch64(tmp_path, march):
    """This machine cannot run the NEON bodies; it can at least compile both (sdot, and without it)."""
    cmd = build._command("aarch64-linux-gnu-g++", "neon", tmp_path / "libneon.so")
    cmd = [f"-march={march}" if a.startswith("-march=") else a for a in cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert (tmp_path / "libneon.so").stat().st_size > 0
