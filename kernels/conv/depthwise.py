"""Direct depthwise convolution (one filter per channel), and its in-place form.

The direct kernel accumulates ``kh * kw`` shifted, strided input slices times per-channel
weights: no GEMM, since each channel only meets its own filter. The in-place form writes its
output over its input, as TinyEngine does to cut peak activation memory: one activation buffer
with a zero halo serves every stride-1 depthwise layer, and ``input_output_aliases`` makes the
output that same buffer. Channels are independent, so programs owning disjoint channel blocks
never race; inside a program a line buffer of ``kh - 1`` input rows (the loop carry) holds the
rows that the program has already overwritten.
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
    pad_nchw,
    pad_nhwc,
    pow2_at_least,
    round_up,
)
from tuning import platform


def _depthwise_body(x_ref, w_ref, b_ref, o_ref, *, layout: str, kh: int, kw: int, stride, dilation,
                    block_h: int, block_m: int, activation):
    """NHWC: x_ref (Hp, Wp, bc), w_ref (kh*kw, bc), o_ref (block_h, block_m, bc).
    NCHW: x_ref (bc, Hp, Wp), w_ref (bc, kh*kw), o_ref (bc, block_h, block_m)."""
    (sh, sw), (dh, dw) = stride, dilation
    row_block, col0 = pl.program_id(1), pl.program_id(2) * (block_m * sw)
    nhwc = layout == "NHWC"
    taps = [(w_ref[pl.ds(t, 1), :] if nhwc else w_ref[:, pl.ds(t, 1)]).astype(jnp.float32)
            for t in range(kh * kw)]
    bias = b_ref[...].astype(jnp.float32)

    def output_row(r, carry):
        out_row = row_block * block_h + r
        acc = None
        for i in range(kh):
            in_row = out_row * sh + i * dh
            for j in range(kw):
                cols = pl.ds(col0 + j * dw, block_m, stride=sw)
                x = (x_ref[in_row, cols, :] if nhwc else x_ref[:, in_row, cols]).astype(jnp.float32)
                term = x * taps[i * kw + j]
                acc = term if acc is None else acc + term
        acc = activate(acc + bias, activation)
        if nhwc:
            o_ref[r, :, :] = acc.astype(o_ref.dtype)
        else:
            o_ref[:, r, :] = acc.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, block_h, output_row, 0)


@functools.partial(jax.jit, static_argnames=("g", "layout", "block_h", "block_m", "block_c", "activation",
                                             "num_warps", "num_stages", "interpret"))
def depthwise_conv(x, w, bias, *, g: ConvGeometry, layout: str, block_h: int, block_m: int, block_c: int,
                   activation=None, num_warps: int = 4, num_stages: int = 2, interpret: bool = True):
    """Depthwise conv, groups == C == K: x in ``layout``, w (kh, kw, 1, C), bias (C,)."""
    oh_p, ow_p = round_up(g.out_h, block_h), round_up(g.out_w, block_m)
    cp = round_up(g.c, block_c)
    rows, cols = g.rows_needed(oh_p), g.cols_needed(ow_p)
    taps = jnp.pad(w.reshape(g.kh * g.kw, g.c), ((0, 0), (0, cp - g.c)))
    bp = jnp.pad(bias.astype(jnp.float32), (0, cp - g.c))
    grid = (g.n, oh_p // block_h, ow_p // block_m, cp // block_c)
    t = g.kh * g.kw
    if layout == "NHWC":
        xp = pad_nhwc(x, g, rows, cols, cp)
        in_specs = [
            pl.BlockSpec((None, rows, cols, block_c), lambda n, h, w_, c: (n, 0, 0, c)),
            pl.BlockSpec((t, block_c), lambda n, h, w_, c: (0, c)),
            pl.BlockSpec((1, block_c), lambda n, h, w_, c: (0, c)),
        ]
        out_shape = (g.n, oh_p, ow_p, cp)
        out_spec = pl.BlockSpec((None, block_h, block_m, block_c), lambda n, h, w_, c: (n, h, w_, c))
        operands = (xp, taps, bp.reshape(1, cp))
    else:
        xp = pad_nchw(x, g, rows, cols, cp)
        in_specs = [
            pl.BlockSpec((None, block_c, rows, cols), lambda n, h, w_, c: (n, c, 0, 0)),
            pl.BlockSpec((block_c, t), lambda n, h, w_, c: (c, 0)),
            pl.BlockSpec((block_c, 1), lambda n, h, w_, c: (c, 0)),
        ]
        out_shape = (g.n, cp, oh_p, ow_p)
        out_spec = pl.BlockSpec((None, block_c, block_h, block_m), lambda n, h, w_, c: (n, c, h, w_))
        operands = (xp, taps.T, bp.reshape(cp, 1))
    body = functools.partial(_depthwise_body, layout=layout, kh=g.kh, kw=g.kw, stride=g.stride,
                             dilation=g.dilation, block_h=block_h, block_m=block_m, activation=activation)
    out = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(out_shape, x.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=platform.compiler_params(num_warps, num_stages, interpret),
        name="tinypallas_conv_depthwise",
    )(*operands)
    if layout == "NHWC":
        return out[:, :g.out_h, :g.out_w, :g.c]
    return out[:, :g.c, :g.out_h, :g.out_w]


# ---------------------------------------------------------------------------------------------
# In place (TinyEngine): output overwrites the input buffer
# ---------------------------------------------------------------------------------------------

HALO_CHANNEL_BLOCK = 16


def halo_buffer(x, kernel_size: int):
    """NHWC activations -> the in-place buffer: a zero halo of ``(kernel_size - 1) // 2`` pixels,
    width padded to a power of 2 (Triton loads whole rows) and channels to a multiple of 16."""
    _n, _h, w, c = x.shape
    p = (kernel_size - 1) // 2
    wt = pow2_at_least(w, 8)
    return jnp.pad(x, ((0, 0), (p, p), (p, wt - w + p), (0, round_up(c, HALO_CHANNEL_BLOCK) - c)))


def from_halo_buffer(buf, h: int, w: int, c: int, kernel_size: int):
    p = (kernel_size - 1) // 2
    return buf[:, p:p + h, p:p + w, :c]


def _depthwise_inplace_body(x_ref, w_ref, b_ref, o_ref, *, kh: int, kw: int, height: int, width: int,
                            row_width: int, activation):
    """x_ref and o_ref are the same (H + 2p, Wt + 2p, bc) block of one buffer."""
    p = (kh - 1) // 2
    taps = [w_ref[pl.ds(t, 1), :].astype(jnp.float32) for t in range(kh * kw)]
    bias = b_ref[...].astype(jnp.float32)
    column_is_pixel = (jnp.arange(row_width) < width)[:, None]

    def load_row(row):
        return tuple(x_ref[row, pl.ds(j, row_width), :].astype(jnp.float32) for j in range(kw))

    def output_row(r, line_buffer):
        # line_buffer: input rows r .. r+kh-2 (padded coordinates), read before they were
        # overwritten; row r+kh-1 is still unwritten (outputs so far reach row r-1+p < r+kh-1).
        window = line_buffer + (load_row(r + kh - 1),)
        acc = bias
        for i in range(kh):
            for j in range(kw):
                acc = acc + window[i][j] * taps[i * kw + j]
        # The halo must stay zero for the next layer: slack columns are written as zeros.
        acc = jnp.where(column_is_pixel, activate(acc, activation), 0.0)
        o_ref[r + p, pl.ds(p, row_width), :] = acc.astype(o_ref.dtype)
        return window[1:]

    lax.fori_loop(0, height, output_row, tuple(load_row(i) for i in range(kh - 1)))


@functools.partial(jax.jit, static_argnames=("height", "width", "activation", "block_c", "num_warps",
                                             "num_stages", "interpret"), donate_argnums=(0,))
def depthwise_conv_inplace(buf, w, bias, *, height: int, width: int, activation=None,
                           block_c: int = HALO_CHANNEL_BLOCK, num_warps: int = 4, num_stages: int = 1,
                           interpret: bool = True):
    """Stride-1 'SAME' depthwise conv of a ``halo_buffer`` whose result is written into that buffer.

    buf: (N, H + 2p, Wt + 2p, Cp) from ``halo_buffer`` (donated: do not use it afterwards);
    w: (k, k, 1, C) with k odd; bias: (C,). Returns the same buffer, now holding the output.
    """
    kh, kw, _, c = w.shape
    n, hp, wp, cp = buf.shape
    p = (kh - 1) // 2
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"in-place depthwise needs an odd square kernel (3, 5, 7), got {kh}x{kw}")
    row_width = wp - 2 * p
    if hp != height + 2 * p or row_width < width or row_width & (row_width - 1) or cp % block_c or cp < c:
        raise ValueError(
            f"buffer of shape {buf.shape} is not a halo_buffer of a {height}x{width}x{c} activation for a "
            f"{kh}x{kw} kernel; build it with halo_buffer(x, {kh})"
        )
    if bias.shape != (c,) or not jnp.issubdtype(bias.dtype, jnp.floating):
        raise ValueError(f"bias must be a float ({c},) array (one per channel), got {bias.dtype}{bias.shape}")
    if 0 in (n, c, height, width):  # no pixel to compute: the buffer is already the (empty) output
        return buf
    taps = jnp.pad(w.reshape(kh * kw, c), ((0, 0), (0, cp - c)))
    bp = jnp.pad(bias.astype(jnp.float32), (0, cp - c)).reshape(1, cp)
    body = functools.partial(_depthwise_inplace_body, kh=kh, kw=kw, height=height, width=width,
                             row_width=row_width, activation=activation)
    block = pl.BlockSpec((None, hp, wp, block_c), lambda b, c: (b, 0, 0, c))
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(buf.shape, buf.dtype),
        grid=(n, cp // block_c),
        in_specs=[block, pl.BlockSpec((kh * kw, block_c), lambda b, c: (0, c)),
                  pl.BlockSpec((1, block_c), lambda b, c: (0, c))],
        out_specs=block,
        input_output_aliases={0: 0},
        interpret=interpret,
        compiler_params=platform.compiler_params(num_warps, num_stages, interpret),
        name="tinypallas_conv_depthwise_inplace",
    )(buf, taps, bp)
