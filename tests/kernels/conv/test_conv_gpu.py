"""Compiled (Triton) runs of every conv kernel on an NVIDIA GPU against lax; skipped elsewhere."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels.conv as kc
from tuning import platform

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(platform.backend() != "gpu", reason="needs an NVIDIA GPU")]

# f32 dots run at full precision; bf16 inputs accumulate in f32. Winograd F(4x4,3x3) in bf16 rounds
# the transformed tiles (entries up to ~30x the input) to 8 bits: its measured max error on these
# O(1) outputs is ~0.25 (see winograd.error_table), hence its own bound.
TOL = {"float32": 2e-4, "bfloat16": 3e-2}
WINOGRAD_F4_BF16_ATOL = 0.4

CASES = [
    # x shape NHWC, w shape HWIO, conv kwargs, algorithm, config overrides
    ((2, 28, 28, 32), (3, 3, 32, 64), {"stride": 1}, "implicit_gemm", {"block_m": 32, "block_n": 64, "block_k": 32}),
    ((2, 28, 28, 32), (3, 3, 32, 64), {"stride": 2}, "implicit_gemm", {"block_m": 16, "block_n": 32, "block_k": 16}),
    ((1, 28, 28, 32), (3, 3, 32, 64), {"stride": 1}, "winograd", {"winograd_m": 2, "block_m": 16, "block_n": 32, "block_k": 16}),
    ((1, 28, 28, 32), (3, 3, 32, 64), {"stride": 1}, "winograd", {"winograd_m": 4, "block_m": 16, "block_n": 16, "block_k": 16}),
    ((1, 28, 28, 32), (3, 3, 32, 64), {"stride": 1}, "im2col", {"block_m": 64, "block_n": 64, "block_k": 32}),
    ((1, 28, 28, 32), (1, 1, 32, 64), {"stride": 1}, "pointwise", {"block_m": 64, "block_n": 64, "block_k": 32}),
    ((2, 28, 28, 48), (3, 3, 1, 48), {"stride": 1, "groups": 48}, "depthwise", {"block_m": 16, "block_c": 16}),
    ((2, 28, 28, 48), (5, 5, 1, 48), {"stride": 2, "groups": 48}, "depthwise", {"block_m": 16, "block_c": 16}),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_compiled_conv_matches_lax(case, layout, dtype):
    xs, ws, kwargs, algorithm, knobs = CASES[case]
    kx, kw = jax.random.split(jax.random.key(case))
    x = jax.random.normal(kx, xs, jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, ws, jnp.float32) / np.sqrt(np.prod(ws[:3]))).astype(dtype)
    if layout == "NCHW":
        x = jnp.transpose(x, (0, 3, 1, 2))
    cfg = kc.Config(algorithm=algorithm, layout="NHWC" if algorithm == "winograd" else layout, **knobs)
    got = kc.conv2d(x, w, layout=layout, config=cfg, activation="relu", **kwargs)
    want = kc.reference(x.astype(jnp.float32), w.astype(jnp.float32), layout=layout, activation="relu", **kwargs)
    atol = TOL[dtype]
    if algorithm == "winograd" and knobs["winograd_m"] == 4 and dtype == "bfloat16":
        atol = WINOGRAD_F4_BF16_ATOL
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=atol, rtol=TOL[dtype])


def test_compiled_inplace_depthwise_aliases_and_matches_lax():
    x = jax.random.normal(jax.random.key(0), (1, 28, 28, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 1, 32)) / 3
    b = jnp.zeros((32,))
    want = kc.reference(x, w, groups=32, activation="relu6")
    buf = kc.halo_buffer(x, 3)
    ptr = buf.unsafe_buffer_pointer()
    out = kc.depthwise_conv_inplace(buf, w, b, height=28, width=28, activation="relu6", interpret=False)
    assert out.unsafe_buffer_pointer() == ptr
    np.testing.assert_allclose(kc.from_halo_buffer(out, 28, 28, 32, 3), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stride,cin,t,cout", [(1, 24, 6, 24), (2, 24, 6, 32), (1, 32, 1, 16)])
def test_compiled_inverted_residual_matches_lax(stride, cin, t, cout):
    ks = jax.random.split(jax.random.key(stride), 7)
    ce = cin * t
    x = jax.random.normal(ks[0], (1, 28, 28, cin))
    we = None if t == 1 else jax.random.normal(ks[1], (cin, ce)) / np.sqrt(cin)
    be = None if t == 1 else jax.random.normal(ks[2], (ce,))
    wd = jax.random.normal(ks[3], (3, 3, 1, ce)) / 3
    bd = jax.random.normal(ks[4], (ce,))
    wp = jax.random.normal(ks[5], (ce, cout)) / np.sqrt(ce)
    bp = jax.random.normal(ks[6], (cout,))
    want = kc.inverted_residual_reference(x, we, be, wd, bd, wp, bp, stride=stride)
    got = kc.inverted_residual(x, we, be, wd, bd, wp, bp, stride=stride, interpret=False,
                               config=kc.InvertedResidualConfig(block_h=2, block_m=16, block_e=16))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
