"""Convolution geometry shared by every algorithm: padding, output size, operand padding.

``lax.conv_general_dilated``'s conventions throughout: NHWC activations, HWIO weights, "SAME"
padding puts the odd pixel at the bottom/right.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.matmul import apply_activation

Padding = str | int | Sequence[tuple[int, int]]
LAYOUTS = ("NHWC", "NCHW")


def pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(e) for e in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name}={v} must be a positive int or a pair of positive ints, e.g. {name}=2")
    return v


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, pl.next_power_of_2(max(int(x), 1)))


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one 2-D convolution, all static."""

    n: int
    h: int
    w: int
    c: int  # input channels
    k: int  # output channels
    kh: int
    kw: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad_h: tuple[int, int]  # (top, bottom)
    pad_w: tuple[int, int]  # (left, right)
    groups: int = 1

    @property
    def out_h(self) -> int:
        return (self.h + sum(self.pad_h) - (self.kh - 1) * self.dilation[0] - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.w + sum(self.pad_w) - (self.kw - 1) * self.dilation[1] - 1) // self.stride[1] + 1

    def rows_needed(self, out_rows: int) -> int:
        """Padded input rows read by ``out_rows`` output rows."""
        return (out_rows - 1) * self.stride[0] + (self.kh - 1) * self.dilation[0] + 1

    def cols_needed(self, out_cols: int) -> int:
        return (out_cols - 1) * self.stride[1] + (self.kw - 1) * self.dilation[1] + 1


def resolve_padding(padding: Padding, h: int, w: int, kh: int, kw: int, stride, dilation):
    """``padding`` ("SAME", "VALID", an int, or ((top, bottom), (left, right))) -> explicit pairs."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0), (0, 0)
        if mode != "SAME":
            raise ValueError(f"padding={padding!r}: use 'SAME', 'VALID', an int or ((top, bottom), (left, right))")
        pads = []
        for size, k, s, d in ((h, kh, stride[0], dilation[0]), (w, kw, stride[1], dilation[1])):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        if padding < 0:
            raise ValueError(f"padding={padding} must be >= 0")
        return (padding, padding), (padding, padding)
    try:
        (t, b), (lft, r) = padding
        pads = (int(t), int(b)), (int(lft), int(r))
    except (TypeError, ValueError):
        raise ValueError(f"padding={padding!r}: use 'SAME', 'VALID', an int or ((top, bottom), (left, right))") from None
    if min(pads[0] + pads[1]) < 0:
        raise ValueError(f"padding={padding!r} must not be negative")
    return pads


def make_geometry(x_shape, w_shape, *, stride, padding, dilation, groups, layout) -> ConvGeometry:
    """Validate shapes (clear errors) and return the convolution's geometry."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D ({layout}), got shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"w must be 4-D HWIO (kh, kw, c_in/groups, c_out), got shape {tuple(w_shape)}")
    if layout == "NHWC":
        n, h, w, c = x_shape
    else:
        n, c, h, w = x_shape
    kh, kw, ci, k = w_shape
    if min(kh, kw) < 1:
        raise ValueError(f"w {tuple(w_shape)} has a {kh}x{kw} kernel; it needs at least one tap (kh, kw >= 1)")
    if groups < 1 or c % groups or k % groups:
        raise ValueError(f"groups={groups} must divide both input channels {c} and output channels {k}")
    if ci * groups != c:
        raise ValueError(
            f"w has {ci} input channels per group but x has {c} channels and groups={groups}; "
            f"w.shape[2] must be {c // groups} (depthwise: w of shape (kh, kw, 1, C) with groups=C)"
        )
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    pad_h, pad_w = resolve_padding(padding, h, w, kh, kw, stride, dilation)
    g = ConvGeometry(n, h, w, c, k, kh, kw, stride, dilation, pad_h, pad_w, groups)
    if g.out_h < 1 or g.out_w < 1:
        raise ValueError(
            f"a {kh}x{kw} kernel (dilation {dilation}) does not fit the {h}x{w} input with padding "
            f"{pad_h, pad_w}; use padding='SAME' or a larger input"
        )
    return g


def fit_axis(x, axis: int, before: int, total: int):
    """Zero-pad ``before`` elements in front of ``axis`` and pad or crop its end to ``total``."""
    from jax import lax

    keep = min(x.shape[axis], total - before)
    if keep < x.shape[axis]:
        x = lax.slice_in_dim(x, 0, keep, axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, total - before - keep)
    return jnp.pad(x, widths) if (before or total - before - keep) else x


def pad_nhwc(x, g: ConvGeometry, rows: int, cols: int, channels: int):
    """NHWC input with the conv's top/left zero padding, sized to ``rows x cols x channels``."""
    x = fit_axis(x, 1, g.pad_h[0], rows)
    x = fit_axis(x, 2, g.pad_w[0], cols)
    return fit_axis(x, 3, 0, channels)


def pad_nchw(x, g: ConvGeometry, rows: int, cols: int, channels: int):
    x = fit_axis(x, 2, g.pad_h[0], rows)
    x = fit_axis(x, 3, g.pad_w[0], cols)
    return fit_axis(x, 1, 0, channels)


def to_layout(x, src: str, dst: str):
    """Transpose activations between NHWC and NCHW (a real copy: its cost is part of the op)."""
    if src == dst:
        return x
    return jnp.transpose(x, (0, 3, 1, 2) if dst == "NCHW" else (0, 2, 3, 1))


def dot(a, b):
    """A tile product with f32 accumulation (full f32 precision for f32 inputs, as the reference)."""
    from jax import lax

    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


# The fused activations are the matmul epilogue's, one definition for every kernel.
activate = apply_activation

