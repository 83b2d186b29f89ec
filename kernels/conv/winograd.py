"""Winograd convolution F(2x2, 3x3) and F(4x4, 3x3) in one Pallas kernel.

``Y = A^T [ (G g G^T) . (B^T d B) ] A`` (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2015). The filter transform ``U = G g G^T`` runs once per weight tensor
(``transform_filter``, keep the result with the weights); the kernel does the input transform
``B^T d B`` on each (m+2)x(m+2) input tile, the (m+2)^2 GEMMs over channels in the transformed
domain, and the output transform ``A^T M A``, without anything leaving the program in between.
Multiplies per output pixel per channel pair: 9 direct, (m+2)^2/m^2 Winograd (4 for m=2,
2.25 for m=4). The price is accuracy: the transforms' large entries (m=4) amplify rounding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kernels.conv.geometry import (
    ConvGeometry,
    activate,
    dot,
    pad_nhwc,
    round_up,
)
from tuning import platform

# (B^T, G, A^T) for output tile m x m and a 3x3 filter (Lavin & Gray, section 4).
TRANSFORMS = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    ),
    4: (
        np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64),
    ),
}
TILE_SIZES = tuple(TRANSFORMS)


def multiplies_per_output(m: int) -> float:
    """Element-wise multiplies per output pixel per (in, out) channel pair (direct 3x3: 9)."""
    return (m + 2) ** 2 / m ** 2


def check_supported(g: ConvGeometry, m: int) -> None:
    if m not in TRANSFORMS:
        raise ValueError(f"Winograd tile m={m} is not supported; use F(2x2,3x3) (m=2) or F(4x4,3x3) (m=4)")
    if (g.kh, g.kw) != (3, 3) or g.stride != (1, 1) or g.dilation != (1, 1) or g.groups != 1:
        raise ValueError(
            f"Winograd supports only 3x3 kernels with stride 1, dilation 1 and groups=1 "
            f"(F(2x2,3x3), F(4x4,3x3)); got a {g.kh}x{g.kw} kernel, stride {g.stride}, dilation "
            f"{g.dilation}, groups {g.groups}: use algorithm='implicit_gemm' or 'im2col'"
        )


def transform_filter(w, m: int):
    """HWIO 3x3 weights -> ``U = G g G^T`` as ((m+2)^2, C, K) in w's dtype. Do this once per weight."""
    if m not in TRANSFORMS:
        raise ValueError(f"Winograd tile m={m} is not supported; use m=2 or m=4")
    if w.shape[:2] != (3, 3):
        raise ValueError(f"Winograd filter transform needs 3x3 weights (HWIO), got {w.shape}")
    g_mat = jnp.asarray(TRANSFORMS[m][1], jnp.float32)
    u = jnp.einsum("ai,ijck,bj->abck", g_mat, w.astype(jnp.float32), g_mat, precision=lax.Precision.HIGHEST)
    return u.reshape((m + 2) ** 2, w.shape[2], w.shape[3]).astype(w.dtype)


def _combine(coeffs, terms):
    """sum_i coeffs[i] * terms[i], skipping zeros (the transforms are sparse, entries exact)."""
    out = None
    for c, t in zip(coeffs, terms):
        if c == 0:
            continue
        term = t if c == 1 else (-t if c == -1 else t * float(c))
        out = term if out is None else out + term
    return out


def _winograd_body(x_ref, u_ref, b_ref, o_ref, *, m: int, block_m: int, block_k: int, num_c: int, activation):
    """One program: a row of ``block_m`` output tiles (m x m pixels each) x ``block_n`` channels.

    x_ref (Hp, Wp, Cp); u_ref ((m+2)^2, Cp, block_n); o_ref (m, block_m * m, block_n).
    """
    bt, _, at = TRANSFORMS[m]
    alpha = m + 2
    row0, col0 = pl.program_id(1) * m, pl.program_id(2) * (block_m * m)
    block_n = o_ref.shape[2]

    def channel_step(cc, acc):
        chans = pl.ds(cc * block_k, block_k)
        # d[a][b]: input pixel (a, b) of every tile in the row of tiles, a (block_m, block_k) slab.
        d = [[x_ref[row0 + a, pl.ds(col0 + b, block_m, stride=m), chans].astype(jnp.float32)
              for b in range(alpha)] for a in range(alpha)]
        t = [[_combine(bt[xi], [d[a][b] for a in range(alpha)]) for b in range(alpha)] for xi in range(alpha)]
        v = [[_combine(bt[nu], t[xi]) for nu in range(alpha)] for xi in range(alpha)]
        return tuple(
            acc[xi * alpha + nu] + dot(v[xi][nu].astype(u_ref.dtype), u_ref[xi * alpha + nu, chans, :])
            for xi in range(alpha) for nu in range(alpha)
        )

    zeros = tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in range(alpha * alpha))
    acc = lax.fori_loop(0, num_c, channel_step, zeros)
    bias = b_ref[...].astype(jnp.float32)
    s = [[_combine(at[i], [acc[xi * alpha + nu] for xi in range(alpha)]) for nu in range(alpha)] for i in range(m)]
    for i in range(m):
        for j in range(m):
            y = activate(_combine(at[j], s[i]) + bias, activation)
            # A traced row index: the interpreter's strided (gather) store rejects a Python int.
            o_ref[jnp.int32(i), pl.ds(j, block_m, stride=m), :] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("g", "m", "block_m", "block_n", "block_k", "activation",
                                             "num_warps", "num_stages", "interpret"))
def winograd_conv(x, u, bias, *, g: ConvGeometry, m: int, block_m: int, block_n: int, block_k: int,
                  activation=None, num_warps: int = 4, num_stages: int = 2, interpret: bool = True):
    """NHWC 3x3 stride-1 conv from transformed weights ``u = transform_filter(w, m)``."""
    check_supported(g, m)
    tiles_h, tiles_w = -(-g.out_h // m), round_up(-(-g.out_w // m), block_m)
    cp, kp = round_up(g.c, block_k), round_up(g.k, block_n)
    xp = pad_nhwc(x, g, g.rows_needed(tiles_h * m), g.cols_needed(tiles_w * m), cp)
    up = jnp.pad(u, ((0, 0), (0, cp - g.c), (0, kp - g.k)))
    bp = jnp.pad(bias.astype(jnp.float32), (0, kp - g.k)).reshape(1, kp)
    alpha2 = (m + 2) ** 2
    body = functools.partial(_winograd_body, m=m, block_m=block_m, block_k=block_k, num_c=cp // block_k,
                             activation=activation)
    out = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((g.n, tiles_h * m, tiles_w * m, kp), x.dtype),
        grid=(g.n, tiles_h, tiles_w // block_m, kp // block_n),
        in_specs=[
            pl.BlockSpec((None,) + xp.shape[1:], lambda n, h, w_, k: (n, 0, 0, 0)),
            pl.BlockSpec((alpha2, cp, block_n), lambda n, h, w_, k: (0, 0, k)),
            pl.BlockSpec((1, block_n), lambda n, h, w_, k: (0, k)),
        ],
        out_specs=pl.BlockSpec((None, m, block_m * m, block_n), lambda n, h, w_, k: (n, h, w_, k)),
        interpret=interpret,
        compiler_params=platform.compiler_params(num_warps, num_stages, interpret),
        name=f"tinypallas_conv_winograd_f{m}x{m}_3x3",
    )(xp, up, bp)
    return out[:, :g.out_h, :g.out_w, :g.k]


def error_table(*, n: int = 1, h: int = 16, w: int = 16, c: int = 32, k: int = 32, seed: int = 0,
                interpret: bool | None = None) -> list[dict]:
    """Max absolute and relative error of Winograd and of the direct conv, per tile size and dtype.

    Both are measured against the direct conv in f32 at full precision on the same (rounded)
    inputs, so the 'direct' column is the floor that the dtype alone imposes.
    """
    from kernels.conv.geometry import make_geometry
    from tuning import platform

    interpret = platform.interpret_default() if interpret is None else interpret
    kx, kw_ = jax.random.split(jax.random.key(seed))
    x32 = jax.random.normal(kx, (n, h, w, c), jnp.float32)
    w32 = jax.random.normal(kw_, (3, 3, c, k), jnp.float32) / np.sqrt(9 * c)
    g = make_geometry(x32.shape, w32.shape, stride=1, padding="SAME", dilation=1, groups=1, layout="NHWC")
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        x, wt = x32.astype(dtype), w32.astype(dtype)
        exact = lax.conv_general_dilated(x.astype(jnp.float32), wt.astype(jnp.float32), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=lax.Precision.HIGHEST)
        scale = float(jnp.max(jnp.abs(exact)))
        # The direct conv as a kernel would deliver it: f32 accumulation, output in the dtype.
        direct = lax.conv_general_dilated(x, wt, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          preferred_element_type=jnp.float32).astype(dtype)
        candidates = [("direct", direct)] + [
            (f"F({m}x{m},3x3)", winograd_conv(x, transform_filter(wt, m), jnp.zeros((k,), jnp.float32), g=g, m=m,
                                                block_m=16, block_n=min(32, max(16, k)), block_k=16,
                                                interpret=interpret))
            for m in TILE_SIZES
        ]
        for name, y in candidates:
            err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - exact)))
            rows.append({"algorithm": name, "dtype": jnp.dtype(dtype).name, "max_abs_error": err,
                         "max_rel_error": err / scale})
    return rows
