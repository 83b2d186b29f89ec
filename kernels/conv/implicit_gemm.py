"""Implicit GEMM convolution: the im2col GEMM with patches gathered inside the kernel.

No patch matrix exists in memory: each program reads the rows of the (zero-padded) input that
its output tile needs, with strided loads for the conv stride, and accumulates one
``(pixels x in-channels) @ (in-channels x out-channels)`` product per filter tap.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.conv.geometry import (
    ConvGeometry,
    activate,
    dot,
    pad_nchw,
    pad_nhwc,
    round_up,
)
from tuning import platform


def _implicit_gemm_body(x_ref, w_ref, b_ref, o_ref, *, layout: str, kh: int, kw: int, stride, dilation,
                        block_h: int, block_m: int, block_k: int, num_c: int, activation):
    """One program: ``block_h`` output rows x ``block_m`` output columns x ``block_n`` channels.

    NHWC: x_ref (Hp, Wp, Cp), w_ref (kh, kw, Cp, block_n), o_ref (block_h, block_m, block_n).
    NCHW: x_ref (Cp, Hp, Wp), w_ref (kh, kw, block_n, Cp), o_ref (block_n, block_h, block_m);
    the product is then (out-channels x in-channels) @ (in-channels x pixels).
    """
    (sh, sw), (dh, dw) = stride, dilation
    # Program ids are read here, outside the loops (the interpreter needs them at top level).
    row_block, col0 = pl.program_id(1), pl.program_id(2) * (block_m * sw)
    bias = b_ref[...].astype(jnp.float32)
    acc_shape = (block_m, o_ref.shape[2]) if layout == "NHWC" else (o_ref.shape[0], block_m)

    def output_row(r, carry):
        out_row = row_block * block_h + r
        acc = jnp.zeros(acc_shape, jnp.float32)
        for i in range(kh):
            in_row = out_row * sh + i * dh
            for j in range(kw):
                cols = pl.ds(col0 + j * dw, block_m, stride=sw)

                def channel_step(cc, acc, i=i, j=j, in_row=in_row, cols=cols):
                    chans = pl.ds(cc * block_k, block_k)
                    if layout == "NHWC":
                        return acc + dot(x_ref[in_row, cols, chans], w_ref[i, j, chans, :])
                    return acc + dot(w_ref[i, j, :, chans], x_ref[chans, in_row, cols])

                acc = lax.fori_loop(0, num_c, channel_step, acc)
        acc = activate(acc + bias, activation)
        if layout == "NHWC":
            o_ref[r, :, :] = acc.astype(o_ref.dtype)
        else:
            o_ref[:, r, :] = acc.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, block_h, output_row, 0)


@functools.partial(jax.jit, static_argnames=("g", "layout", "block_h", "block_m", "block_n", "block_k",
                                             "activation", "num_warps", "num_stages", "interpret"))
def implicit_gemm_conv(x, w, bias, *, g: ConvGeometry, layout: str, block_h: int, block_m: int,
                       block_n: int, block_k: int, activation=None, num_warps: int = 4,
                       num_stages: int = 2, interpret: bool = True):
    """Dense (groups=1) conv of x (``layout``) with HWIO w; bias (K,) and activation fused."""
    oh_p, ow_p = round_up(g.out_h, block_h), round_up(g.out_w, block_m)
    cp, kp = round_up(g.c, block_k), round_up(g.k, block_n)
    rows, cols = g.rows_needed(oh_p), g.cols_needed(ow_p)
    wp = jnp.pad(w, ((0, 0), (0, 0), (0, cp - g.c), (0, kp - g.k)))
    bp = jnp.pad(bias.astype(jnp.float32), (0, kp - g.k))
    grid = (g.n, oh_p // block_h, ow_p // block_m, kp // block_n)
    if layout == "NHWC":
        xp = pad_nhwc(x, g, rows, cols, cp)
        in_specs = [
            pl.BlockSpec((None, rows, cols, cp), lambda n, h, c, k: (n, 0, 0, 0)),
            pl.BlockSpec((g.kh, g.kw, cp, block_n), lambda n, h, c, k: (0, 0, 0, k)),
            pl.BlockSpec((1, block_n), lambda n, h, c, k: (0, k)),
        ]
        out_shape = (g.n, oh_p, ow_p, kp)
        out_spec = pl.BlockSpec((None, block_h, block_m, block_n), lambda n, h, c, k: (n, h, c, k))
        operands = (xp, wp, bp.reshape(1, kp))
    else:
        xp = pad_nchw(x, g, rows, cols, cp)
        in_specs = [
            pl.BlockSpec((None, cp, rows, cols), lambda n, h, c, k: (n, 0, 0, 0)),
            pl.BlockSpec((g.kh, g.kw, block_n, cp), lambda n, h, c, k: (0, 0, k, 0)),
            pl.BlockSpec((block_n, 1), lambda n, h, c, k: (k, 0)),
        ]
        out_shape = (g.n, kp, oh_p, ow_p)
        out_spec = pl.BlockSpec((None, block_n, block_h, block_m), lambda n, h, c, k: (n, k, h, c))
        operands = (xp, jnp.transpose(wp, (0, 1, 3, 2)), bp.reshape(kp, 1))
    body = functools.partial(
        _implicit_gemm_body, layout=layout, kh=g.kh, kw=g.kw, stride=g.stride, dilation=g.dilation,
        block_h=block_h, block_m=block_m, block_k=block_k, num_c=cp // block_k, activation=activation,
    )
    out = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(out_shape, x.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=platform.compiler_params(num_warps, num_stages, interpret),
        name="tinypallas_conv_implicit_gemm",
    )(*operands)
    if layout == "NHWC":
        return out[:, :g.out_h, :g.out_w, :g.k]
    return out[:, :g.k, :g.out_h, :g.out_w]
