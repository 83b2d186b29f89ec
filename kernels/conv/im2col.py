"""Convolution as one GEMM on the tiled matmul: im2col (explicit patch matrix) and pointwise 1x1.

im2col materialises a ``(N*OH*OW, kh*kw*C)`` patch matrix in memory (``kh*kw`` times the input,
the cost the implicit GEMM avoids), then multiplies it by the ``(kh*kw*C, K)`` weight matrix.
A 1x1 conv needs no patches at all: NHWC activations already are the ``(N*H*W, C)`` matrix.
Bias and activation run in the matmul's epilogue.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels import matmul as mm
from kernels.conv.geometry import ConvGeometry, activate, pad_nchw, pad_nhwc


def patch_matrix(x, g: ConvGeometry, layout: str):
    """NHWC: (N*OH*OW, kh*kw*C), columns in HWIO order. NCHW: (C*kh*kw, N*OH*OW), rows in (C, kh, kw) order."""
    (sh, sw), (dh, dw) = g.stride, g.dilation
    rows, cols = g.rows_needed(g.out_h), g.cols_needed(g.out_w)
    pad = pad_nhwc if layout == "NHWC" else pad_nchw
    xp = pad(x, g, rows, cols, g.c)
    h_axis = 1 if layout == "NHWC" else 2
    taps = []
    for i in range(g.kh):
        for j in range(g.kw):
            tap = lax.slice_in_dim(xp, i * dh, i * dh + (g.out_h - 1) * sh + 1, sh, axis=h_axis)
            taps.append(lax.slice_in_dim(tap, j * dw, j * dw + (g.out_w - 1) * sw + 1, sw, axis=h_axis + 1))
    if layout == "NHWC":
        return jnp.stack(taps, axis=3).reshape(g.n * g.out_h * g.out_w, g.kh * g.kw * g.c)
    patches = jnp.stack(taps, axis=2)  # (N, C, kh*kw, OH, OW)
    return jnp.transpose(patches, (1, 2, 0, 3, 4)).reshape(g.c * g.kh * g.kw, g.n * g.out_h * g.out_w)


@functools.partial(jax.jit, static_argnames=("g", "layout", "config", "activation", "interpret"))
def im2col_conv(x, w, bias, *, g: ConvGeometry, layout: str, config: mm.Config, activation=None,
                interpret: bool = True):
    """Dense conv as patch matrix x weight matrix on ``kernels.matmul``."""
    patches = patch_matrix(x, g, layout)
    if layout == "NHWC":
        out = mm.matmul(patches, w.reshape(-1, g.k), bias=bias.astype(x.dtype), activation=activation,
                        config=config, interpret=interpret)
        return out.reshape(g.n, g.out_h, g.out_w, g.k)
    # NCHW: out^T = W^T @ patches, so output channels are GEMM rows; the bias is per row, which
    # the matmul epilogue (per column) cannot take: it is applied after, fused by XLA.
    w_t = jnp.transpose(w, (3, 2, 0, 1)).reshape(g.k, -1)
    out = mm.matmul(w_t, patches, out_dtype=jnp.float32, config=config, interpret=interpret)
    out = activate(out + bias.astype(jnp.float32)[:, None], activation).astype(x.dtype)
    return jnp.transpose(out.reshape(g.k, g.n, g.out_h, g.out_w), (1, 0, 2, 3))


@functools.partial(jax.jit, static_argnames=("g", "layout", "config", "activation", "interpret"))
def pointwise_conv(x, w, bias, *, g: ConvGeometry, layout: str, config: mm.Config, activation=None,
                   interpret: bool = True):
    """1x1 conv (any stride, no padding needed) as a GEMM over the pixels."""
    (sh, sw) = g.stride
    if layout == "NHWC":
        xs = pad_nhwc(x, g, g.rows_needed(g.out_h), g.cols_needed(g.out_w), g.c)[:, ::sh, ::sw, :]
        out = mm.matmul(xs.reshape(-1, g.c), w.reshape(g.c, g.k), bias=bias.astype(x.dtype),
                        activation=activation, config=config, interpret=interpret)
        return out.reshape(g.n, g.out_h, g.out_w, g.k)
    xs = pad_nchw(x, g, g.rows_needed(g.out_h), g.cols_needed(g.out_w), g.c)[:, :, ::sh, ::sw]
    pixels = jnp.transpose(xs, (1, 0, 2, 3)).reshape(g.c, -1)  # a no-op copy when N == 1
    out = mm.matmul(w.reshape(g.c, g.k).T, pixels, out_dtype=jnp.float32, config=config, interpret=interpret)
    out = activate(out + bias.astype(jnp.float32)[:, None], activation).astype(x.dtype)
    return jnp.transpose(out.reshape(g.k, g.n, g.out_h, g.out_w), (1, 0, 2, 3))
