"""The MobileNetV2 inverted-residual block as one Pallas kernel.

``y = project(relu6(depthwise(relu6(expand(x))))) (+ x)`` with batch norm folded into each
conv's weights and bias. The expanded activation (``t`` times wider than the block's input and
output) never reaches memory: a program owns ``block_h x block_m`` output pixels, reads the
input rows under them plus the depthwise halo, and walks the expanded channels ``block_e`` at a
time: expand that slice, depthwise it, and add its contribution to the projection accumulator.
The expansion of a halo row is recomputed by the neighbouring tile (the price of fusion);
taller tiles (``block_h``) amortise it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import matmul as mm
from kernels.conv.geometry import (
    activate,
    dot,
    make_geometry,
    pad_nhwc,
    pow2_at_least,
    round_up,
)
from tuning import platform, tuned
from tuning.space import Knob, SearchSpace


@dataclasses.dataclass(frozen=True)
class Config:
    """Knobs of the fused block.

    block_h: output rows per program (the halo of 3 - stride input rows is recomputed per tile,
        so taller tiles recompute less but hold more in registers).
    block_m: output pixels along a row per program (power of 2 >= 16: a dot dimension).
    block_e: expanded channels per step (power of 2 >= 16).
    num_warps, num_stages: Triton launch knobs.
    """

    block_h: int = 2
    block_m: int = 16
    block_e: int = 32
    num_warps: int = 4
    num_stages: int = 1

    def params(self) -> dict:
        return dataclasses.asdict(self)


def inverted_residual_reference(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, *, stride: int = 1,
                                precision=lax.Precision.HIGHEST):
    """The block as separate XLA ops (NHWC). w_expand (Cin, Ce) or None (expand ratio 1),
    w_dw (3, 3, 1, Ce), w_project (Ce, Cout); biases are the folded batch norms."""
    dn = ("NHWC", "HWIO", "NHWC")
    hi = precision
    e = x
    if w_expand is not None:
        e = activate(jnp.einsum("nhwc,ce->nhwe", x, w_expand, precision=hi) + b_expand, "relu6").astype(x.dtype)
    ce = e.shape[-1]
    d = lax.conv_general_dilated(e, w_dw, (stride, stride), "SAME", dimension_numbers=dn,
                                 feature_group_count=ce, precision=hi)
    d = activate(d + b_dw, "relu6").astype(x.dtype)
    y = jnp.einsum("nhwe,eo->nhwo", d, w_project, precision=hi) + b_project
    if stride == 1 and x.shape[-1] == y.shape[-1]:
        y = y + x
    return y.astype(x.dtype)


def _inverted_residual_body(x_ref, we_ref, be_ref, wd_ref, bd_ref, wp_ref, bp_ref, o_ref, *, stride: int,
                            kh: int, kw: int, block_h: int, block_m: int, block_e: int, num_e: int,
                            pad_top: int, pad_left: int, height: int, width: int, expand: bool,
                            residual: bool):
    """x_ref (Hp, Wp, Cin_p) padded input; o_ref (block_h, block_m, Cout_p)."""
    s = stride
    in_row0 = pl.program_id(1) * (block_h * s)
    col0 = pl.program_id(2) * (block_m * s)
    q = jnp.arange(block_m)
    # The depthwise conv pads the *expanded* activation with zeros, but expand(0) = relu6(bias)
    # is not zero: positions in the padding are masked after the expansion.
    col_is_pixel = [((col0 + q * s + j >= pad_left) & (col0 + q * s + j < pad_left + width))[:, None]
                    for j in range(kw)]

    def row_is_pixel(local_row):
        row = in_row0 + local_row
        return (row >= pad_top) & (row < pad_top + height)

    def expanded_channels_step(ec, accs):
        chans = pl.ds(ec * block_e, block_e)
        expanded = {}  # (local input row, column tap) -> (block_m, block_e), shared by output rows

        def expansion(local_row, j):
            if (local_row, j) not in expanded:
                cols = pl.ds(col0 + j, block_m, stride=s)
                if expand:
                    v = activate(dot(x_ref[in_row0 + local_row, cols, :], we_ref[:, chans])
                                 + be_ref[:, chans].astype(jnp.float32), "relu6")
                else:
                    v = x_ref[in_row0 + local_row, cols, chans].astype(jnp.float32)
                expanded[(local_row, j)] = jnp.where(row_is_pixel(local_row) & col_is_pixel[j], v, 0.0)
            return expanded[(local_row, j)]

        taps = [wd_ref[pl.ds(t, 1), chans].astype(jnp.float32) for t in range(kh * kw)]
        bias_dw = bd_ref[:, chans].astype(jnp.float32)
        new = []
        for r in range(block_h):
            acc = bias_dw
            for i in range(kh):
                for j in range(kw):
                    acc = acc + expansion(r * s + i, j) * taps[i * kw + j]
            depthwise = activate(acc, "relu6").astype(wp_ref.dtype)
            new.append(accs[r] + dot(depthwise, wp_ref[chans, :]))
        return tuple(new)

    zeros = tuple(jnp.zeros((block_m, o_ref.shape[2]), jnp.float32) for _ in range(block_h))
    accs = lax.fori_loop(0, num_e, expanded_channels_step, zeros)
    bias_project = bp_ref[...].astype(jnp.float32)
    for r in range(block_h):
        y = accs[r] + bias_project
        if residual:  # stride 1: output pixel (oh, ow) is input pixel (oh, ow)
            y = y + x_ref[in_row0 + r + pad_top, pl.ds(col0 + pad_left, block_m), :].astype(jnp.float32)
        o_ref[r, :, :] = y.astype(o_ref.dtype)


def _check_shapes(x, w_expand, w_dw, w_project, stride: int):
    cin = x.shape[3]
    ce = w_dw.shape[3]
    expand = w_expand is not None
    if (expand and tuple(w_expand.shape) != (cin, ce)) or (not expand and ce != cin) or w_project.shape[0] != ce \
            or tuple(w_dw.shape[:3]) != (3, 3, 1):
        raise ValueError(
            f"inverted residual shapes disagree: x {x.shape}, w_expand "
            f"{None if w_expand is None else w_expand.shape}, w_dw {w_dw.shape}, w_project {w_project.shape}; "
            "need w_expand (Cin, Ce) or None, w_dw (3, 3, 1, Ce), w_project (Ce, Cout)"
        )
    if stride not in (1, 2):
        raise ValueError(f"stride={stride}: MobileNetV2 blocks have stride 1 or 2")


@functools.partial(jax.jit, static_argnames=("stride", "config", "interpret"))
def _inverted_residual(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, *, stride: int, config: Config,
                       interpret: bool):
    n, h, w, cin = x.shape
    kh, kw, _, ce = w_dw.shape
    cout = w_project.shape[1]
    expand = w_expand is not None
    block_h, block_m, block_e = config.block_h, config.block_m, config.block_e
    g = make_geometry((n, h, w, ce), w_dw.shape, stride=stride, padding="SAME", dilation=1, groups=ce,
                      layout="NHWC")
    residual = stride == 1 and cin == cout
    # Whole channel rows are single Triton tensors (dot operands), hence powers of 2.
    cin_p, cout_p = pow2_at_least(cin), pow2_at_least(cout)
    if residual:
        cin_p = cout_p = max(cin_p, cout_p)
    ce_p = round_up(ce, block_e) if expand else cin_p
    oh_p, ow_p = round_up(g.out_h, block_h), round_up(g.out_w, block_m)
    xp = pad_nhwc(x, g, g.rows_needed(oh_p), max(g.cols_needed(ow_p), g.pad_w[0] + ow_p), cin_p)
    if expand:
        we = jnp.pad(w_expand, ((0, cin_p - cin), (0, ce_p - ce)))
        be = jnp.pad(b_expand.astype(jnp.float32), (0, ce_p - ce)).reshape(1, ce_p)
    else:  # placeholders, never read
        we = jnp.zeros((16, 16), x.dtype)
        be = jnp.zeros((1, 16), jnp.float32)
    wd = jnp.pad(w_dw.reshape(kh * kw, ce), ((0, 0), (0, ce_p - ce)))
    bd = jnp.pad(b_dw.astype(jnp.float32), (0, ce_p - ce)).reshape(1, ce_p)
    wp = jnp.pad(w_project, ((0, ce_p - ce), (0, cout_p - cout)))
    bp = jnp.pad(b_project.astype(jnp.float32), (0, cout_p - cout)).reshape(1, cout_p)
    whole = lambda *shape: pl.BlockSpec(shape, lambda b, r, c: (0,) * len(shape))
    block_e = block_e if expand else cin_p  # no expansion: the input channels are the "expanded" ones
    body = functools.partial(
        _inverted_residual_body, stride=stride, kh=kh, kw=kw, block_h=block_h, block_m=block_m,
        block_e=block_e, num_e=ce_p // block_e, pad_top=g.pad_h[0], pad_left=g.pad_w[0], height=h,
        width=w, expand=expand, residual=residual,
    )
    out = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((n, oh_p, ow_p, cout_p), x.dtype),
        grid=(n, oh_p // block_h, ow_p // block_m),
        in_specs=[pl.BlockSpec((None,) + xp.shape[1:], lambda b, r, c: (b, 0, 0, 0)),
                  whole(*we.shape), whole(*be.shape), whole(*wd.shape), whole(*bd.shape),
                  whole(*wp.shape), whole(*bp.shape)],
        out_specs=pl.BlockSpec((None, block_h, block_m, cout_p), lambda b, r, c: (b, r, c, 0)),
        interpret=interpret,
        compiler_params=platform.compiler_params(config.num_warps, config.num_stages, interpret),
        name="tinypallas_inverted_residual",
    )(xp, we, be, wd, bd, wp, bp)
    return out[:, :g.out_h, :g.out_w, :cout]


def problem_key(x_shape, c_out: int, expansion: int, stride: int, dtype) -> dict:
    n, h, w, cin = x_shape
    return {"n": int(n), "h": int(h), "w": int(w), "c_in": int(cin), "expansion": int(expansion),
            "c_out": int(c_out), "stride": int(stride), "dtype": jnp.dtype(dtype).name}


def config_violations(cfg: Config, problem: dict, *, backend: str | None = None) -> list[str]:
    """Why ``cfg`` cannot run this block; empty when it can. Checked without compiling."""
    backend = backend or platform.backend()
    problems = []
    for name in ("block_m", "block_e"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            problems.append(f"{name}={v} must be a power of 2 >= 16 (a Triton dot dimension)")
    if cfg.block_h < 1:
        problems.append(f"block_h={cfg.block_h} must be >= 1")
    if backend == "gpu":
        # Live per program: the projection accumulators and the expanded rows of one step.
        rows = (cfg.block_h - 1) * problem["stride"] + 3
        live = cfg.block_h * cfg.block_m * pow2_at_least(problem["c_out"]) + rows * 3 * cfg.block_m * cfg.block_e
        if live > 65536:
            problems.append(f"{live} live f32 values per program (> 65536); lower block_h, block_m or block_e")
    return problems


def heuristic_config(problem: dict, backend: str | None = None) -> Config:
    if (backend or platform.backend()) != "gpu":
        return Config(block_h=4, block_m=16, block_e=64)  # interpreted: fewer, larger steps
    return Config(block_h=2, block_m=16, block_e=32)


def inverted_residual(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, *, stride: int = 1,
                      config: Config | None = None, interpret: bool | None = None):
    """Fused inverted-residual block, NHWC; arguments as ``inverted_residual_reference``.

    config: explicit knobs; ``None`` takes the tuned cache for this block, else a heuristic.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (4-D), got shape {x.shape}")
    _check_shapes(x, w_expand, w_dw, w_project, stride)
    for name, bias in (("b_expand", b_expand), ("b_dw", b_dw), ("b_project", b_project)):
        if bias is not None:
            mm.check_bias_dtype(jnp.asarray(bias), jnp.float32, "inverted_residual", name)
    if 0 in (*x.shape, w_dw.shape[3], w_project.shape[1]):  # no tile to run: the separate XLA ops' answer
        return inverted_residual_reference(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride=stride)
    if interpret is None:
        interpret = platform.interpret_default()
    expansion = 1 if w_expand is None else w_dw.shape[3] // x.shape[3]
    problem = problem_key(x.shape, w_project.shape[1], expansion, stride, x.dtype)
    config = tuned.resolve("inverted_residual", problem, config, config_type=Config,
                           heuristic=lambda: heuristic_config(problem))
    problems = config_violations(config, problem, backend="cpu" if interpret else "gpu")
    if problems:
        raise ValueError(f"inverted_residual cannot run {config}: " + "; ".join(problems))
    return _inverted_residual(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride=stride,
                              config=config, interpret=interpret)


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------

# MobileNetV2 (width 1.0, 224x224): (input size, C_in, expansion, C_out, stride) of each distinct block.
MOBILENETV2_BLOCKS = [(112, 32, 1, 16, 1), (112, 16, 6, 24, 2), (56, 24, 6, 24, 1), (56, 24, 6, 32, 2),
                      (28, 32, 6, 32, 1), (28, 32, 6, 64, 2), (14, 64, 6, 64, 1), (14, 64, 6, 96, 1),
                      (14, 96, 6, 96, 1), (14, 96, 6, 160, 2), (7, 160, 6, 160, 1), (7, 160, 6, 320, 1)]
PRESETS = {"mobilenetv2": [problem_key((1, s, s, cin), cout, t, stride, "float32")
                           for s, cin, t, cout, stride in MOBILENETV2_BLOCKS]}
DEFAULT_PROBLEMS = [problem_key((1, 8, 8, 16), 16, 6, 1, "float32"), problem_key((1, 8, 8, 16), 24, 6, 2, "float32")]


def parse_shape(text: str) -> dict:
    """``"HxWxCin:t:Cout[:sS]"`` (or ``NxHxWxCin``) -> problem dict, e.g. ``"56x56x24:6:24"``, ``"56x56x24:6:32:s2"``."""
    fix = "e.g. 56x56x24:6:24 (input HxWxC_in, expansion t, C_out) or 56x56x24:6:32:s2"
    parts = text.strip().split(":")
    try:
        dims = [int(d) for d in parts[0].lower().split("x")]
        dims = [1] + dims if len(dims) == 3 else dims
        n, h, w, cin = dims
        t, cout = int(parts[1]), int(parts[2])
        stride = int(parts[3].lstrip("s")) if len(parts) > 3 else 1
    except (ValueError, IndexError):
        raise ValueError(f"--shape {text!r} is not an inverted-residual block; {fix}") from None
    if stride not in (1, 2) or min(n, h, w, cin, t, cout) < 1:
        raise ValueError(f"--shape {text!r}: sizes must be positive and the stride 1 or 2; {fix}")
    return problem_key((n, h, w, cin), cout, t, stride, "float32")


def search_space(problem: dict) -> SearchSpace:
    """Spatial tile (block_h x block_m, with its halo), expanded-channel step and Triton knobs."""
    on_gpu = platform.backend() == "gpu"
    cin, t, cout, s = problem["c_in"], problem["expansion"], problem["c_out"], problem["stride"]
    ce, dtype = cin * t, problem["dtype"]
    knobs = [Knob("block_h", (1, 2, 4, 8)), Knob("block_m", (16, 32, 64)), Knob("block_e", (16, 32, 64, 128))]
    if on_gpu:
        knobs += [Knob("num_warps", (2, 4, 8)), Knob("num_stages", (1, 2, 3))]

    def make_inputs(seed):
        ks = jax.random.split(jax.random.key(seed), 7)
        x = jax.random.normal(ks[0], (problem["n"], problem["h"], problem["w"], cin), dtype)
        we = None if t == 1 else (jax.random.normal(ks[1], (cin, ce)) / cin ** 0.5).astype(dtype)
        be = None if t == 1 else jax.random.normal(ks[2], (ce,)) * 0.1
        wd = (jax.random.normal(ks[3], (3, 3, 1, ce)) / 3).astype(dtype)
        wp = (jax.random.normal(ks[5], (ce, cout)) / ce ** 0.5).astype(dtype)
        return x, we, be, wd, jax.random.normal(ks[4], (ce,)) * 0.1, wp, jax.random.normal(ks[6], (cout,)) * 0.1

    return SearchSpace(
        kernel="inverted_residual",
        problem=problem,
        knobs=tuple(knobs),
        violations=lambda params: config_violations(Config(**params), problem),
        to_config=lambda params: Config(**params),
        fn=lambda cfg: functools.partial(inverted_residual, stride=s, config=cfg),
        make_inputs=make_inputs,
        default=heuristic_config(problem).params(),
        interpreted=platform.interpret_default(),
    )
