"""2-D convolution: one front door, ``conv2d``, over five algorithms the autotuner picks per layer.

im2col + GEMM, implicit GEMM, Winograd F(2x2|4x4, 3x3), direct depthwise and pointwise 1x1, each
in NHWC or NCHW (the compute layout is a knob; changing layout is a transpose that is timed with
the op). Fused epilogues: bias (folded batch norm) and ReLU/ReLU6. Beside it: the fused MobileNetV2
inverted-residual block and the in-place depthwise conv.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import matmul as mm
from kernels.conv import winograd
from kernels.conv.depthwise import (
    depthwise_conv,
    depthwise_conv_inplace,
    from_halo_buffer,
    halo_buffer,
)
from kernels.conv.geometry import (
    LAYOUTS,
    ConvGeometry,
    Padding,
    activate,
    make_geometry,
    to_layout,
)
from kernels.conv.im2col import im2col_conv, pointwise_conv
from kernels.conv.implicit_gemm import implicit_gemm_conv
from kernels.conv.inverted_residual import Config as InvertedResidualConfig
from kernels.conv.inverted_residual import (
    inverted_residual,
    inverted_residual_reference,
)
from tuning import platform, tuned
from tuning.space import Knob, SearchSpace

__all__ = [
    "ALGORITHMS",
    "DEFAULT_PROBLEMS",
    "PRESETS",
    "Config",
    "InvertedResidualConfig",
    "conv2d",
    "conv2d_bn_act",
    "depthwise_conv_inplace",
    "fold_batch_norm",
    "from_halo_buffer",
    "halo_buffer",
    "inverted_residual",
    "inverted_residual_reference",
    "parse_shape",
    "reference",
    "search_space",
]

ALGORITHMS = ("im2col", "implicit_gemm", "winograd", "depthwise", "pointwise")
GEMM_ALGORITHMS = ("im2col", "implicit_gemm", "winograd", "pointwise")  # those with output/reduction tiles
ACTIVATIONS = (None, "relu", "relu6")
DTYPES = ("float32", "bfloat16", "float16")
MAX_GEMM_GROUPS = 16  # grouped convs on the GEMM paths run one GEMM per group


@dataclasses.dataclass(frozen=True)
class Config:
    """Tunable knobs of ``conv2d``; each algorithm reads the ones it has.

    algorithm: "im2col", "implicit_gemm", "winograd", "depthwise" or "pointwise".
    layout: the layout the kernel computes in, "NHWC" or "NCHW" (Winograd: NHWC only). When it
        differs from the data's layout, the input and output are transposed, inside the timed op.
    block_h: output rows per program (implicit GEMM, depthwise).
    block_m: output pixels along a row per program (implicit GEMM, depthwise; Winograd: tiles);
        for im2col/pointwise, the GEMM's M tile.
    block_n: output-channel tile. block_k: input-channel (reduction) tile.
    block_c: channel tile of the depthwise kernel.
    winograd_m: output tile of Winograd F(m x m, 3x3): 2 or 4.
    num_warps, num_stages: Triton launch knobs.
    """

    algorithm: str = "implicit_gemm"
    layout: str = "NHWC"
    block_h: int = 2
    block_m: int = 16
    block_n: int = 32
    block_k: int = 32
    block_c: int = 32
    winograd_m: int = 2
    num_warps: int = 4
    num_stages: int = 2

    def params(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def reference(x, w, *, stride=1, padding: Padding = "SAME", dilation=1, groups: int = 1, layout: str = "NHWC",
              bias=None, activation: str | None = None):
    """``lax.conv_general_dilated`` (full f32 precision) + bias + activation: the oracle."""
    g = make_geometry(x.shape, w.shape, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      layout=layout)
    y = lax.conv_general_dilated(
        x, w, g.stride, (g.pad_h, g.pad_w), rhs_dilation=g.dilation,
        dimension_numbers=(layout, "HWIO", layout), feature_group_count=groups,
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )
    if bias is not None:
        y = y + (bias[None, :, None, None] if layout == "NCHW" else bias).astype(jnp.float32)
    return activate(y, activation).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def problem_key(g: ConvGeometry, dtype, layout: str = "NHWC", padding: Padding = "SAME") -> dict:
    """The problem dict of the tuned cache and the autotuner."""
    if isinstance(padding, str):
        pad = padding.upper()
    else:
        pad = [list(g.pad_h), list(g.pad_w)]
    stride = g.stride[0] if g.stride[0] == g.stride[1] else list(g.stride)
    dilation = g.dilation[0] if g.dilation[0] == g.dilation[1] else list(g.dilation)
    return {"n": g.n, "h": g.h, "w": g.w, "c": g.c, "k": g.k, "kh": g.kh, "kw": g.kw, "stride": stride,
            "padding": pad, "dilation": dilation, "groups": g.groups, "dtype": jnp.dtype(dtype).name,
            "layout": layout}


def geometry_of(problem: dict) -> ConvGeometry:
    p = problem
    shape = (p["n"], p["h"], p["w"], p["c"])
    layout = p.get("layout", "NHWC")
    if layout == "NCHW":
        shape = (p["n"], p["c"], p["h"], p["w"])
    padding = p["padding"] if isinstance(p["padding"], (str, int)) else tuple(map(tuple, p["padding"]))
    return make_geometry(shape, (p["kh"], p["kw"], p["c"] // p["groups"], p["k"]), stride=p["stride"],
                         padding=padding, dilation=p["dilation"], groups=p["groups"], layout=layout)


def is_depthwise(g: ConvGeometry) -> bool:
    """One group per input channel (with C=1 a dense conv is also depthwise)."""
    return g.groups == g.c


def applicable_algorithms(g: ConvGeometry) -> tuple[str, ...]:
    """The algorithms that can run this conv (``conv2d`` refuses the others with a reason)."""
    return tuple(a for a in ALGORITHMS if not _algorithm_violations(a, g))


def _algorithm_violations(algorithm: str, g: ConvGeometry) -> list[str]:
    if algorithm not in ALGORITHMS:
        return [f"algorithm={algorithm!r} is not one of {ALGORITHMS}"]
    if algorithm == "depthwise":
        return [] if is_depthwise(g) else [
            f"algorithm='depthwise' needs groups == input channels (got groups={g.groups}, C={g.c})"]
    if g.groups > MAX_GEMM_GROUPS:
        return [f"algorithm={algorithm!r} runs one GEMM per group and groups={g.groups} > {MAX_GEMM_GROUPS}; "
                f"use algorithm='depthwise'" + ("" if is_depthwise(g) else " (needs groups == C)")]
    if algorithm == "pointwise" and (g.kh, g.kw) != (1, 1):
        return [f"algorithm='pointwise' needs a 1x1 kernel, got {g.kh}x{g.kw}"]
    if algorithm == "winograd":
        try:
            winograd.check_supported(dataclasses.replace(g, groups=1), 2)
        except ValueError as e:
            return [str(e)]
    return []


def config_violations(cfg: Config, g: ConvGeometry, *, backend: str | None = None) -> list[str]:
    """Why ``cfg`` cannot run this conv; empty when it can. Checked without compiling."""
    backend = backend or platform.backend()
    problems = _algorithm_violations(cfg.algorithm, g)
    if cfg.layout not in LAYOUTS:
        problems.append(f"layout={cfg.layout!r} is not one of {LAYOUTS}")
    if cfg.algorithm == "winograd" and cfg.layout != "NHWC":
        problems.append("Winograd computes in NHWC only; use layout='NHWC' (NCHW data is transposed)")
    floors = {"block_m": 8 if cfg.algorithm == "depthwise" else 16, "block_n": 16, "block_k": 16, "block_c": 8}
    for name, floor in floors.items():
        v = getattr(cfg, name)
        if v < floor or v & (v - 1):
            problems.append(f"{name}={v} must be a power of 2 >= {floor} (Triton blocks; tl.dot needs >= 16)")
    if cfg.block_h < 1:
        problems.append(f"block_h={cfg.block_h} must be >= 1")
    if cfg.winograd_m not in winograd.TILE_SIZES:
        problems.append(f"winograd_m={cfg.winograd_m} must be one of {winograd.TILE_SIZES}")
    if backend == "gpu":
        # Accumulators live in registers: keep a program's live f32 tile within 64K values.
        live = {
            "winograd": (cfg.winograd_m + 2) ** 2 * cfg.block_m * cfg.block_n,
            "implicit_gemm": cfg.block_m * cfg.block_n,
            "depthwise": cfg.block_m * cfg.block_c,
        }.get(cfg.algorithm, 0)
        if live > 65536:
            problems.append(f"{cfg.algorithm} keeps {live} f32 accumulators per program (> 65536); "
                            "lower block_m or block_n")
    return problems


def heuristic_config(g: ConvGeometry, dtype, backend: str | None = None, algorithm: str | None = None) -> Config:
    """A reasonable config without tuning (for ``algorithm`` if given)."""
    backend = backend or platform.backend()

    def fit(dim, lo, cap):
        return max(lo, min(cap, pl.next_power_of_2(max(dim, 1))))

    cpu = backend != "gpu"  # interpreted: every grid step costs, so few large tiles
    if algorithm is None:
        if is_depthwise(g) and g.groups > 1:
            algorithm = "depthwise"
        elif (g.kh, g.kw) == (1, 1) and g.groups == 1:
            algorithm = "pointwise"
        else:
            algorithm = "im2col" if cpu else "implicit_gemm"
    if algorithm in ("im2col", "pointwise"):
        gemm_m = g.n * g.out_h * g.out_w
        return Config(algorithm=algorithm, block_m=fit(gemm_m, 16, 128 if cpu else 64),
                      block_n=fit(g.k, 16, 128 if cpu else 64),
                      block_k=fit(g.c * g.kh * g.kw, 16, 128 if cpu else 32), num_warps=4, num_stages=3)
    return Config(algorithm=algorithm, block_h=8 if cpu else 2,
                  block_m=fit(g.out_w, 8 if algorithm == "depthwise" else 16, 128 if cpu else 32),
                  block_n=fit(g.k // g.groups, 16, 128 if cpu else 64),
                  block_k=fit(g.c // g.groups, 16, 128 if cpu else 32),
                  block_c=fit(g.c, 8, 128 if cpu else 32), num_warps=4, num_stages=2)


def _run(algorithm: str, x, w, bias, g: ConvGeometry, cfg: Config, activation, interpret: bool):
    """Dispatch one conv, x already in ``cfg.layout``."""
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "interpret": interpret}
    if algorithm in ("im2col", "pointwise"):
        mcfg = mm.Config(block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        run = im2col_conv if algorithm == "im2col" else pointwise_conv
        return run(x, w, bias, g=g, layout=cfg.layout, config=mcfg, activation=activation, interpret=interpret)
    if algorithm == "implicit_gemm":
        return implicit_gemm_conv(x, w, bias, g=g, layout=cfg.layout, block_h=cfg.block_h, block_m=cfg.block_m,
                                  block_n=cfg.block_n, block_k=cfg.block_k, activation=activation, **launch)
    if algorithm == "winograd":
        u = winograd.transform_filter(w, cfg.winograd_m)
        return winograd.winograd_conv(x, u, bias, g=g, m=cfg.winograd_m, block_m=cfg.block_m, block_n=cfg.block_n,
                                      block_k=cfg.block_k, activation=activation, **launch)
    # depthwise: a channel multiplier (K = m*C) repeats each input channel m times.
    mult = g.k // g.c
    if mult > 1:
        x = jnp.repeat(x, mult, axis=3 if cfg.layout == "NHWC" else 1)
        g = dataclasses.replace(g, c=g.k, groups=g.k)
    return depthwise_conv(x, w, bias, g=g, layout=cfg.layout, block_h=cfg.block_h, block_m=cfg.block_m,
                          block_c=cfg.block_c, activation=activation, **launch)


def conv2d(x, w, *, stride: int | Sequence[int] = 1, padding: Padding = "SAME", dilation: int | Sequence[int] = 1,
           groups: int = 1, layout: str = "NHWC", bias=None, activation: str | None = None,
           algorithm: str | None = None, config: Config | None = None, interpret: bool | None = None):
    """2-D convolution with ``lax.conv_general_dilated``'s conventions.

    x: (N, H, W, C) for ``layout="NHWC"`` or (N, C, H, W) for "NCHW"; w: HWIO (kh, kw, C/groups, K)
    (depthwise: (kh, kw, 1, C) with groups=C). padding: "SAME", "VALID", an int, or
    ((top, bottom), (left, right)). bias: (K,), added in the kernel's epilogue, followed by
    ``activation`` (None, "relu", "relu6"). Returns the output in ``layout``, x's dtype.
    algorithm: force one of ALGORITHMS (the other knobs from the tuned cache or heuristic);
    config: every knob explicit. With neither, the tuned cache picks, else a heuristic.
    """
    g = make_geometry(jnp.shape(x), jnp.shape(w), stride=stride, padding=padding, dilation=dilation,
                      groups=groups, layout=layout)
    if jnp.result_type(x).name not in DTYPES or jnp.result_type(w) != jnp.result_type(x):
        raise ValueError(f"x is {x.dtype} and w is {w.dtype}; both must be one of {DTYPES}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")
    if bias is not None and jnp.shape(bias) != (g.k,):
        raise ValueError(f"bias must have shape ({g.k},) (one per output channel), got {jnp.shape(bias)}")
    if bias is not None:
        mm.check_bias_dtype(jnp.asarray(bias), jnp.float32, "conv2d")
    if 0 in (g.n, g.c, g.k):  # no tile to run: lax's answer (empty, or bias and activation alone for C = 0)
        return reference(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups, layout=layout,
                         bias=None if bias is None else jnp.asarray(bias), activation=activation)
    if interpret is None:
        interpret = platform.interpret_default()
    if config is not None and algorithm is not None and algorithm != config.algorithm:
        raise ValueError(f"algorithm={algorithm!r} disagrees with config.algorithm={config.algorithm!r}; "
                         "pass one of them")
    cfg = tuned.resolve("conv2d", problem_key(g, x.dtype, layout, padding), config, config_type=Config,
                        heuristic=lambda: heuristic_config(g, x.dtype, algorithm=algorithm),
                        accept=lambda c: algorithm is None or c.algorithm == algorithm)
    problems = config_violations(cfg, g, backend="cpu" if interpret else "gpu")
    if problems:
        raise ValueError(f"conv2d cannot run {cfg} on x{tuple(x.shape)} ({layout}) * w{tuple(w.shape)}: "
                         + "; ".join(problems))
    return _conv2d(x, w, bias, g=g, cfg=cfg, layout=layout, activation=activation, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("g", "cfg", "layout", "activation", "interpret"))
def _conv2d(x, w, bias, *, g: ConvGeometry, cfg: Config, layout: str, activation, interpret: bool):
    """Everything after validation, as one jitted computation (layout changes included)."""
    if bias is None:
        bias = jnp.zeros((g.k,), jnp.float32)
    xc = to_layout(x, layout, cfg.layout)
    if cfg.algorithm == "depthwise" or g.groups == 1:
        out = _run(cfg.algorithm, xc, w, bias, g, cfg, activation, interpret)
    else:  # grouped GEMM: one conv per group
        cg, kg = g.c // g.groups, g.k // g.groups
        caxis = 3 if cfg.layout == "NHWC" else 1
        gg = dataclasses.replace(g, c=cg, k=kg, groups=1)
        out = jnp.concatenate([
            _run(cfg.algorithm, lax.slice_in_dim(xc, i * cg, (i + 1) * cg, axis=caxis), w[..., i * kg:(i + 1) * kg],
                 bias[i * kg:(i + 1) * kg], gg, cfg, activation, interpret)
            for i in range(g.groups)
        ], axis=caxis)
    return to_layout(out, cfg.layout, layout)


def fold_batch_norm(w, bias, gamma, beta, mean, var, eps: float = 1e-5):
    """Fold inference batch norm into the conv: ``BN(conv(x, w) + b) = conv(x, w') + b'``.

    w' = w * gamma / sqrt(var + eps) (per output channel, HWIO's last axis);
    b' = (b - mean) * gamma / sqrt(var + eps) + beta. ``bias`` may be None.
    """
    scale = gamma / jnp.sqrt(var + eps)
    b = jnp.zeros_like(mean) if bias is None else bias
    return (w * scale.astype(w.dtype)), ((b - mean) * scale + beta)


def conv2d_bn_act(x, w, gamma, beta, mean, var, *, eps: float = 1e-5, bias=None, activation: str | None = "relu",
                  **conv_kwargs):
    """conv + batch norm (folded into the weights) + ReLU/ReLU6, as one kernel."""
    wf, bf = fold_batch_norm(w, bias, gamma, beta, mean, var, eps)
    return conv2d(x, wf, bias=bf, activation=activation, **conv_kwargs)


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------


def conv_problem(h: int, w: int, c: int, k: int, kernel: int = 3, stride: int = 1, groups: int = 1, n: int = 1,
                 dtype: str = "float32", padding: str = "SAME", dilation: int = 1, layout: str = "NHWC") -> dict:
    return {"n": n, "h": h, "w": w, "c": c, "k": k, "kh": kernel, "kw": kernel, "stride": stride,
            "padding": padding, "dilation": dilation, "groups": groups, "dtype": dtype, "layout": layout}


def _mobilenetv2_layers(resolution: int = 224) -> list[dict]:
    """Every distinct conv of MobileNetV2 (width 1.0): stem, each block's expand/depthwise/project, head."""
    layers = [conv_problem(resolution, resolution, 3, 32, 3, 2)]
    h, cin = resolution // 2, 32
    for t, cout, repeats, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                (6, 160, 3, 2), (6, 320, 1, 1)):
        for r in range(repeats):
            stride = s if r == 0 else 1
            ce = cin * t
            if t != 1:
                layers.append(conv_problem(h, h, cin, ce, 1))
            layers.append(conv_problem(h, h, ce, ce, 3, stride, groups=ce))
            h = -(-h // stride)
            layers.append(conv_problem(h, h, ce, cout, 1))
            cin = cout
    layers.append(conv_problem(h, h, cin, 1280, 1))
    return _distinct(layers)


def _resnet18_layers(resolution: int = 224) -> list[dict]:
    layers = [conv_problem(resolution, resolution, 3, 64, 7, 2)]
    h, cin = resolution // 4, 64
    for cout, s in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers.append(conv_problem(h, h, cin, cout, 3, s))
        if s != 1:
            layers.append(conv_problem(h, h, cin, cout, 1, s))  # downsample shortcut
        h = -(-h // s)
        layers.append(conv_problem(h, h, cout, cout, 3, 1))
        cin = cout
    return _distinct(layers)


def _distinct(problems: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in problems:
        key = tuple(sorted(p.items()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


PRESETS = {"mobilenetv2": _mobilenetv2_layers(), "resnet18": _resnet18_layers()}

# Small enough to tune in the interpreter on a CPU.
DEFAULT_PROBLEMS = [
    conv_problem(16, 16, 16, 16, 3),
    conv_problem(16, 16, 32, 32, 3, groups=32),
    conv_problem(16, 16, 32, 64, 1),
]


def parse_shape(text: str) -> dict:
    """``"NxHxWxC:K:KHxKW[:sS][:dD][:gG][:SAME|VALID][:NCHW][:bfloat16]"`` -> problem dict.

    E.g. ``"1x56x56x64:64:3x3"`` (ResNet-18 conv), ``"1x112x112x96:96:3x3:s2:g96"`` (depthwise).
    ``NxHxWxC`` may be ``HxWxC`` (N=1), ``KHxKW`` may be one number.
    """
    fix = "e.g. 1x56x56x64:64:3x3:s1 (input NxHxWxC, output channels, kernel, then sS dD gG SAME|VALID NCHW dtype)"
    parts = text.strip().split(":")
    try:
        dims = [int(d) for d in parts[0].lower().split("x")]
        if len(dims) == 3:
            dims = [1] + dims
        n, h, w, c = dims
        k = int(parts[1])
        kernel = [int(d) for d in parts[2].lower().split("x")] if len(parts) > 2 else [3]
        kh, kw = (kernel * 2)[:2]
    except (ValueError, IndexError):
        raise ValueError(f"--shape {text!r} is not a conv shape; {fix}") from None
    p = conv_problem(h, w, c, k, n=n)
    p.update(kh=kh, kw=kw)
    for opt in parts[3:]:
        o = opt.strip()
        if o.upper() in ("SAME", "VALID"):
            p["padding"] = o.upper()
        elif o.upper() in LAYOUTS:
            p["layout"] = o.upper()
        elif o in DTYPES:
            p["dtype"] = o
        elif o[:1] in "sdg" and o[1:].isdigit():
            p[{"s": "stride", "d": "dilation", "g": "groups"}[o[0]]] = int(o[1:])
        else:
            raise ValueError(f"--shape {text!r}: option {o!r} not understood; {fix}")
    geometry_of(p)  # validates
    return p


def search_space(problem: dict) -> SearchSpace:
    """Algorithm, compute layout, tiles and Triton knobs for one conv problem."""
    g = geometry_of(problem)
    dtype = problem.get("dtype", "float32")
    layout = problem.get("layout", "NHWC")
    padding = problem["padding"] if isinstance(problem["padding"], (str, int)) else tuple(map(tuple, problem["padding"]))
    on_gpu = platform.backend() == "gpu"

    def pow2s(dim, lo, cap):
        top = max(lo, min(cap, pl.next_power_of_2(max(dim, 1))))
        return tuple(t for t in (8, 16, 32, 64, 128, 256) if lo <= t <= top)

    gemm_m = g.n * g.out_h * g.out_w
    knobs = [
        Knob("algorithm", applicable_algorithms(g)),
        Knob("layout", LAYOUTS),
        # Each algorithm reads only some tiles (see Config): the others are not sampled for it.
        Knob("block_h", (1, 2, 4, 8), when={"algorithm": ("implicit_gemm", "depthwise")}),
        Knob("block_m", tuple(sorted(set(pow2s(g.out_w, 8, 128)) | set(pow2s(gemm_m, 16, 128))))),
        Knob("block_n", pow2s(g.k, 16, 128), when={"algorithm": GEMM_ALGORITHMS}),
        Knob("block_k", pow2s(g.c * g.kh * g.kw, 16, 128), when={"algorithm": GEMM_ALGORITHMS}),
        Knob("block_c", pow2s(g.c, 8, 128), when={"algorithm": ("depthwise",)}),
        Knob("winograd_m", winograd.TILE_SIZES, when={"algorithm": ("winograd",)}),
    ]
    if on_gpu:
        knobs += [Knob("num_warps", (2, 4, 8)), Knob("num_stages", (1, 2, 3, 4))]

    def violations(params: dict) -> list[str]:
        return config_violations(Config(**params), g)

    def make_inputs(seed):
        kx, kw_ = jax.random.split(jax.random.key(seed))
        shape = (g.n, g.h, g.w, g.c) if layout == "NHWC" else (g.n, g.c, g.h, g.w)
        x = jax.random.normal(kx, shape, dtype)
        w = jax.random.normal(kw_, (g.kh, g.kw, g.c // g.groups, g.k), jnp.float32) / (g.kh * g.kw * g.c) ** 0.5
        return x, w.astype(dtype)

    def fn(cfg: Config):
        # The whole op, layout changes included.
        return functools.partial(conv2d, stride=g.stride, padding=padding, dilation=g.dilation, groups=g.groups,
                                 layout=layout, config=cfg)

    return SearchSpace(
        kernel="conv2d",
        problem=problem,
        knobs=tuple(knobs),
        violations=violations,
        to_config=lambda params: Config(**params),
        fn=fn,
        make_inputs=make_inputs,
        default=heuristic_config(g, dtype).params(),
        interpreted=platform.interpret_default(),
    )


def flops(problem: dict) -> float:
    g = geometry_of(problem)
    return 2.0 * g.n * g.out_h * g.out_w * g.k * (g.c // g.groups) * g.kh * g.kw
