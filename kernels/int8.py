"""Int8 kernels with TFLite-exact requantization: conv, depthwise conv, fully connected, and friends.

Conv and fully connected run as one int8 x int8 -> int32 GEMM (``kernels.matmul``) whose epilogue
adds the bias, requantizes per output channel (``kernels.quant``) and clamps, inside the kernel.
Depthwise conv is its own Pallas kernel: a reduction over the kernel taps with the same epilogue.
Pooling, MEAN and softmax are memory-bound reductions: they are plain ``jnp`` on the same integer
math (XLA fuses them; a Pallas kernel would only add launch cost); elementwise ADD/SUB/MUL/PRELU
are ``kernels.quant``'s functions on jnp arrays, and unary int8 ops a 256-entry table lookup.

Every function takes int8 activations (NHWC, any batch) and the integer parameters TFLite Micro
prepares (``models.quantization.op_params``); results are bit-exact with TFLite Micro's
reference kernels.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels import matmul as mm
from kernels import quant
from tuning import platform, tuned
from tuning.space import Knob, SearchSpace, parse_dims


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of the int8 kernels.

    block_m, block_n, block_k, order, group_m, num_warps, num_stages: the int8 GEMM's tiling
        (``kernels.matmul.Config``); for depthwise conv ``block_m`` tiles output pixels and
        ``block_n`` tiles channels.
    """

    block_m: int = 128
    block_n: int = 64
    block_k: int = 128
    order: str = "m_major"
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def gemm(self) -> mm.Config:
        return mm.Config(block_m=self.block_m, block_n=self.block_n, block_k=self.block_k, order=self.order,
                         group_m=self.group_m, num_warps=self.num_warps, num_stages=self.num_stages)


KERNEL = "int8"  # registry / tuned-cache name of this module


def problem_key(m: int, n: int, k: int) -> dict:
    """An int8 GEMM (conv as im2col, FC): (M, K) x (K, N) with the requantizing epilogue."""
    return {"op": "gemm", "m": int(m), "n": int(n), "k": int(k), "dtype": "int8"}


def depthwise_problem_key(m: int, c: int, taps: int) -> dict:
    """An int8 depthwise conv: ``m`` output pixels (batch included), ``c`` channels, ``taps`` = kh*kw."""
    return {"op": "depthwise", "m": int(m), "c": int(c), "taps": int(taps), "dtype": "int8"}


def heuristic_config(problem: dict) -> Config:
    if problem["op"] == "depthwise":
        return Config(block_m=min(128, _pow2_at_least(problem["m"])), block_n=min(64, _pow2_at_least(problem["c"])))
    c = mm.heuristic_config(problem["m"], problem["n"], problem["k"], jnp.int8)
    return Config(block_m=c.block_m, block_n=c.block_n, block_k=c.block_k, order=c.order, group_m=c.group_m,
                  num_warps=c.num_warps, num_stages=c.num_stages)


def resolve_config(problem: dict, config: Config | None = None) -> Config:
    """``config`` if given, else the tuned cache (kernel ``"int8"``) for this problem here, else the heuristic."""
    return tuned.resolve(KERNEL, problem, config, config_type=Config, heuristic=lambda: heuristic_config(problem))


# ----------------------------------------------------------------------------------------
# Reference: the same math with XLA's integer dot (the oracle for the Pallas paths).
# ----------------------------------------------------------------------------------------


def gemm_requant_reference(a, b, bias, multiplier, shift, *, output_offset: int, act_min: int, act_max: int):
    acc = jnp.dot(a.astype(jnp.int32), b.astype(jnp.int32), preferred_element_type=jnp.int32)
    return quant.requantize(acc + bias[None, :], multiplier[None, :], shift[None, :], output_offset, act_min, act_max)


# ----------------------------------------------------------------------------------------
# Kernel bodies
# ----------------------------------------------------------------------------------------


def _requant_epilogue(acc, bias, multiplier, shift, *, output_offset: int, act_min: int, act_max: int):
    """GEMM epilogue on a (block_m, block_n) int32 tile; operands arrive as (1, block_n) tiles."""
    return quant.requantize(acc + bias, multiplier, shift, output_offset, act_min, act_max)


def _depthwise_body(taps_ref, w_ref, bias_ref, mult_ref, shift_ref, o_ref, *, output_offset, act_min, act_max):
    """One (block_m pixels, block_n channels) tile: sum over taps of x * w, then requantize."""
    acc = jnp.sum(taps_ref[...].astype(jnp.int32) * w_ref[...].astype(jnp.int32)[:, None, :], axis=0)
    o_ref[...] = quant.requantize(acc + bias_ref[...], mult_ref[...], shift_ref[...], output_offset, act_min, act_max)


# ----------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------


def gemm_requant(a, b, bias, multiplier, shift, *, output_offset: int, act_min: int, act_max: int,
                 config: Config | None = None, interpret: bool | None = None, pallas: bool = True):
    """``clamp(MBQM(a @ b + bias, multiplier, shift) + output_offset)`` as int8, one Pallas kernel.

    a: (M, K) int8, b: (K, N) int8; bias, multiplier, shift: (N,) int32 (bias already holds
    the input-offset correction, see ``fold_input_offset``). ``pallas=False`` computes the same
    with XLA's integer dot (``gemm_requant_reference``).
    """
    a, b, bias, multiplier, shift = (jnp.asarray(v) for v in (a, b, bias, multiplier, shift))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm_requant expects a (M, K) and b (K, N), got a{a.shape} and b{b.shape}")
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise ValueError(f"gemm_requant multiplies int8 by int8, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    for name, v in (("bias", bias), ("multiplier", multiplier), ("shift", shift)):
        if v.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) (one per output channel), got {v.shape}")
        mm.check_bias_dtype(v, jnp.int32, "gemm_requant", name)  # int32, or narrower integers
    if not pallas or 0 in (m, n, k):  # XLA's integer dot; also the empty (or K = 0) result, which has no tile
        return gemm_requant_reference(a, b, bias, multiplier, shift, output_offset=output_offset, act_min=act_min,
                                      act_max=act_max)
    cfg = resolve_config(problem_key(m, n, k), config)
    epilogue = functools.partial(_requant_epilogue, output_offset=int(output_offset), act_min=int(act_min),
                                 act_max=int(act_max))
    return mm.matmul(a, b, out_dtype=jnp.int8, epilogue=epilogue,
                     epilogue_operands=(bias, multiplier, shift), config=cfg.gemm(), interpret=interpret)


def fold_input_offset(weights_kn: np.ndarray, bias: np.ndarray | None, input_offset: int) -> np.ndarray:
    """Bias that makes ``x @ w`` equal TFLite's ``(x + input_offset) @ w``: bias + offset * sum_k w."""
    n = weights_kn.shape[1]
    if bias is not None and not np.issubdtype(np.asarray(bias).dtype, np.integer):
        raise ValueError(f"bias is {np.asarray(bias).dtype} but int8 kernels accumulate in int32; pass an int32 bias "
                         "(quantized at input scale * weight scale, zero point 0)")
    b = np.zeros(n, np.int64) if bias is None else bias.astype(np.int64)
    folded = b + int(input_offset) * weights_kn.astype(np.int64).sum(axis=0)
    if np.abs(folded).max(initial=0) >= 2**31:
        raise ValueError("folded bias overflows int32; the layer's zero point and weights are out of range")
    return folded.astype(np.int32)


def _patches(x, kh: int, kw: int, stride: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int]):
    """(B, H, W, C) already padded -> (B, Ho, Wo, kh*kw, C): the input under every tap."""
    sh, sw = stride
    dh, dw = dilation
    ho, wo = out_hw
    taps = []
    for i in range(kh):
        for j in range(kw):
            taps.append(x[:, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw, :])
    return jnp.stack(taps, axis=3)


def conv2d(x, w: np.ndarray, bias: np.ndarray | None, *, stride, dilation, padding, out_hw, input_offset: int,
           output_offset: int, multiplier, shift, act_min: int, act_max: int, config: Config | None = None,
           interpret: bool | None = None, pallas: bool = True):
    """Int8 CONV_2D (OHWI filter) as im2col + fused int8 GEMM. ``padding``: ((t, b), (l, r))."""
    o, kh, kw, c = w.shape
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-input_offset)
    b_ = x.shape[0]
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1):
        cols = x.reshape(-1, c)
    else:
        cols = _patches(x, kh, kw, stride, dilation, out_hw).reshape(b_ * out_hw[0] * out_hw[1], kh * kw * c)
    w_kn = np.ascontiguousarray(w.reshape(o, kh * kw * c).T)
    folded = fold_input_offset(w_kn, bias, input_offset)
    y = gemm_requant(cols, jnp.asarray(w_kn), jnp.asarray(folded), jnp.asarray(multiplier), jnp.asarray(shift),
                     output_offset=output_offset, act_min=act_min, act_max=act_max, config=config, interpret=interpret,
                     pallas=pallas)
    return y.reshape(b_, out_hw[0], out_hw[1], o)


def fully_connected(x, w: np.ndarray, bias: np.ndarray | None, *, input_offset: int, output_offset: int,
                    multiplier, shift, act_min: int, act_max: int, config: Config | None = None,
                    interpret: bool | None = None, pallas: bool = True):
    """Int8 FULLY_CONNECTED: x (..., in) with weights (out, in) -> (rows, out)."""
    _out_features, in_features = w.shape
    rows = x.reshape(-1, in_features)
    w_kn = np.ascontiguousarray(w.T)
    folded = fold_input_offset(w_kn, bias, input_offset)
    return gemm_requant(rows, jnp.asarray(w_kn), jnp.asarray(folded), jnp.asarray(multiplier), jnp.asarray(shift),
                        output_offset=output_offset, act_min=act_min, act_max=act_max, config=config,
                        interpret=interpret, pallas=pallas)


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, pl.next_power_of_2(x))


def depthwise_conv2d(x, w: np.ndarray, bias: np.ndarray | None, *, stride, dilation, padding, out_hw,
                     depth_multiplier: int, input_offset: int, output_offset: int, multiplier, shift,
                     act_min: int, act_max: int, config: Config | None = None, interpret: bool | None = None):
    """Int8 DEPTHWISE_CONV_2D (filter (1, kh, kw, C*mult)) as a Pallas tap-reduction kernel."""
    _, kh, kw, n = w.shape
    if min(kh, kw) < 1:
        raise ValueError(f"depthwise filter {w.shape} has a {kh}x{kw} kernel; it needs at least one tap")
    if 0 in (x.shape[0], *out_hw, n):  # nothing to compute: the empty output
        return jnp.zeros((x.shape[0], *out_hw, n), jnp.int8)
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-input_offset)
    b_ = x.shape[0]
    taps = _patches(x, kh, kw, stride, dilation, out_hw)  # (B, Ho, Wo, T, C)
    if depth_multiplier != 1:
        taps = jnp.repeat(taps, depth_multiplier, axis=-1)
    m = b_ * out_hw[0] * out_hw[1]
    t = kh * kw
    taps = jnp.moveaxis(taps.reshape(m, t, n), 1, 0)  # (T, M, N)
    w_tn = w.reshape(t, n)
    folded = fold_input_offset(w_tn, bias, input_offset)
    if interpret is None:
        interpret = platform.interpret_default()
    cfg = resolve_config(depthwise_problem_key(m, n, t), config)
    tp = _pow2_at_least(t)  # taps padded to a power of 2 (zero weights) for the Triton block shape
    mp = -(-m // cfg.block_m) * cfg.block_m
    np_ = -(-n // cfg.block_n) * cfg.block_n
    taps = jnp.pad(taps, ((0, tp - t), (0, mp - m), (0, np_ - n)))
    w_p = jnp.asarray(np.pad(w_tn, ((0, tp - t), (0, np_ - n))))
    vectors = [jnp.asarray(np.pad(v.astype(np.int32), (0, np_ - n))).reshape(1, np_) for v in (folded, multiplier, shift)]
    compiler_params = platform.compiler_params(cfg.num_warps, cfg.num_stages, interpret)
    body = functools.partial(_depthwise_body, output_offset=int(output_offset), act_min=int(act_min),
                             act_max=int(act_max))
    y = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.int8),
        grid=(mp // cfg.block_m, np_ // cfg.block_n),
        in_specs=[
            pl.BlockSpec((tp, cfg.block_m, cfg.block_n), lambda i, j: (0, i, j)),
            pl.BlockSpec((tp, cfg.block_n), lambda i, j: (0, j)),
        ] + [pl.BlockSpec((1, cfg.block_n), lambda i, j: (0, j))] * 3,
        out_specs=pl.BlockSpec((cfg.block_m, cfg.block_n), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="tinypallas_int8_depthwise",
    )(taps, w_p, *vectors)
    return y[:m, :n].reshape(b_, out_hw[0], out_hw[1], n)


def depthwise_conv2d_reference(x, w, bias, *, stride, dilation, padding, out_hw, depth_multiplier, input_offset,
                               output_offset, multiplier, shift, act_min, act_max):
    """Depthwise conv in plain jnp (int32 tap sum), the oracle of the Pallas kernel."""
    _, kh, kw, n = w.shape
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-input_offset)
    taps = _patches(x, kh, kw, stride, dilation, out_hw).astype(jnp.int32)
    if depth_multiplier != 1:
        taps = jnp.repeat(taps, depth_multiplier, axis=-1)
    acc = jnp.sum(taps * jnp.asarray(w.reshape(kh * kw, n), jnp.int32), axis=3)
    folded = fold_input_offset(w.reshape(kh * kw, n), bias, input_offset)
    return quant.requantize(acc + folded, multiplier, shift, output_offset, act_min, act_max)


def lookup(x, table: np.ndarray):
    """An int8 -> int8 op through its 256-entry table (entry ``i`` holds the result for ``i - 128``):
    the unary activations (HARD_SWISH, LOGISTIC, TANH, RELU, RELU6, LEAKY_RELU) and int8
    requantization, whose TFLite-exact integer math (``kernels.quant``) fills the table once."""
    return jnp.take(jnp.asarray(table, jnp.int8), x.astype(jnp.int32) + 128)


def _window_sum_and_count(x, filt, stride, padding, out_hw, init, reducer):
    """Apply ``reducer`` over every pooling window (padding excluded); also the valid counts."""
    (pt, pb), (pl_, pr) = padding
    fh, fw = filt
    sh, sw = stride
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl_, pr), (0, 0)), constant_values=init)
    out = None
    for i in range(fh):
        for j in range(fw):
            win = xp[:, i: i + (out_hw[0] - 1) * sh + 1: sh, j: j + (out_hw[1] - 1) * sw + 1: sw, :]
            out = win if out is None else reducer(out, win)
    h, w_ = x.shape[1:3]
    rows = np.arange(out_hw[0]) * sh - pt
    cols = np.arange(out_hw[1]) * sw - pl_
    count_h = np.minimum(rows + fh, h) - np.maximum(rows, 0)
    count_w = np.minimum(cols + fw, w_) - np.maximum(cols, 0)
    return out, np.outer(count_h, count_w).astype(np.int32)


def average_pool(x, *, filter_hw, stride, padding, out_hw, act_min, act_max):
    """Int8 AVERAGE_POOL_2D: integer mean over the valid window, rounded half away from zero."""
    total, count = _window_sum_and_count(x.astype(jnp.int32), filter_hw, stride, padding, out_hw, 0, jnp.add)
    count = jnp.asarray(count)[None, :, :, None]
    mean = jnp.sign(total) * ((jnp.abs(total) + count // 2) // count)
    return jnp.clip(mean, act_min, act_max).astype(jnp.int8)


def max_pool(x, *, filter_hw, stride, padding, out_hw, act_min, act_max):
    """Int8 MAX_POOL_2D (padding never wins the max)."""
    out, _ = _window_sum_and_count(x, filter_hw, stride, padding, out_hw, -128, jnp.maximum)
    return jnp.clip(out, act_min, act_max).astype(jnp.int8)


def mean(x, *, axes, keep_dims, input_zero_point, output_zero_point, num_elements, multiplier, shift):
    """Int8 MEAN over ``axes`` (TFLite: integer sum, 1/n folded into the multiplier)."""
    total = jnp.sum(x.astype(jnp.int32), axis=axes, keepdims=keep_dims) - input_zero_point * num_elements
    y = quant.multiply_by_quantized_multiplier(total, multiplier, shift) + output_zero_point
    return jnp.clip(y, -128, 127).astype(jnp.int8)


def softmax(x, *, input_multiplier, input_left_shift, diff_min):
    """Int8 SOFTMAX over the last axis (gemmlowp fixed-point exp, TFLite's reference)."""
    return quant.softmax_int8(x, input_multiplier, input_left_shift, diff_min)


# ----------------------------------------------------------------------------------------
# Autotuning: the int8 GEMM with its requantizing epilogue.
# ----------------------------------------------------------------------------------------

# GEMM shapes (M = batch-1 pixels, N = out channels, K = taps x in channels) and depthwise shapes
# of MLPerf Tiny layers (--layer vww01 etc.).
PRESETS = {
    "vww01": [problem_key(48 * 48, 8, 27), problem_key(24 * 24, 32, 16), problem_key(6 * 6, 128, 128),
              problem_key(3 * 3, 256, 256), depthwise_problem_key(48 * 48, 8, 9), depthwise_problem_key(6 * 6, 128, 9)],
    "ic01": [problem_key(32 * 32, 16, 27), problem_key(32 * 32, 16, 144), problem_key(16 * 16, 32, 288),
             problem_key(8 * 8, 64, 576)],
    "kws01": [problem_key(25 * 5, 64, 40), problem_key(25 * 5, 64, 64), depthwise_problem_key(25 * 5, 64, 9)],
}
DEFAULT_PROBLEMS = [problem_key(1024, 16, 144), problem_key(256, 32, 288), problem_key(64, 64, 576),
                    depthwise_problem_key(1024, 32, 9)]


def parse_shape(text: str) -> dict:
    """``"MxNxK"`` -> int8 GEMM problem; ``"dw:MxCxT"`` -> depthwise problem (pixels, channels, taps)."""
    if text.lower().startswith("dw:"):
        return depthwise_problem_key(*parse_dims(text[3:], "MxCxT", "dw:1024x32x9 (pixels, channels, taps)"))
    return problem_key(*parse_dims(text, "MxNxK", "1024x16x144, or dw:1024x32x9 for a depthwise layer"))


def _tiles(dim: int, cap: int) -> tuple[int, ...]:
    top = max(16, min(cap, pl.next_power_of_2(dim)))
    return tuple(t for t in (16, 32, 64, 128, 256) if t <= top)


def search_space(problem: dict) -> SearchSpace:
    """Knobs of one int8 problem: tiles and loop order of the GEMM + requantize epilogue, or the
    pixel/channel tiles of the depthwise kernel; Triton warps/stages on GPU."""
    on_gpu = platform.backend() == "gpu"
    rng = np.random.default_rng(0)
    if problem["op"] == "depthwise":
        m, c, taps = problem["m"], problem["c"], problem["taps"]
        knobs = [Knob("block_m", _tiles(m, 256)), Knob("block_n", _tiles(c, 128))]

        def violations(params: dict) -> list[str]:
            cfg = Config(**params)
            problems = [f"{k}={v} must be a power of 2 >= 16" for k, v in (("block_m", cfg.block_m), ("block_n", cfg.block_n))
                        if v < 16 or v & (v - 1)]
            tile_bytes = _pow2_at_least(taps) * cfg.block_m * cfg.block_n * 4  # int32 products in registers/smem
            if on_gpu and tile_bytes > platform.SHARED_MEMORY_BYTES:
                problems.append(f"a {cfg.block_m}x{cfg.block_n} tile over {taps} taps needs {tile_bytes} B; lower block_m")
            return problems

        side = max(1, int(np.sqrt(m)))
        kh = int(np.sqrt(taps)) if int(np.sqrt(taps)) ** 2 == taps else 1
        # The filter and multipliers are constants of the layer (numpy, folded at trace time).
        w = rng.integers(-127, 128, (1, kh, taps // kh, c)).astype(np.int8)
        mult, shift = quant.quantize_multipliers(rng.uniform(1e-3, 1e-2, c))
        pad = ((kh // 2, kh // 2), ((taps // kh) // 2, (taps // kh) // 2))

        def make_inputs(seed):
            return (jax.random.randint(jax.random.key(seed), (1, side, m // side, c), -128, 128, jnp.int8),)

        def fn(cfg: Config):
            return functools.partial(depthwise_conv2d, w=w, bias=None, stride=(1, 1), dilation=(1, 1), padding=pad,
                                     out_hw=(side, m // side), depth_multiplier=1, input_offset=3, output_offset=-2,
                                     multiplier=mult, shift=shift, act_min=-128, act_max=127, config=cfg)
    else:
        m, n, k = problem["m"], problem["n"], problem["k"]
        knobs = [Knob("block_m", _tiles(m, 256)), Knob("block_n", _tiles(n, 256)), Knob("block_k", _tiles(k, 256)),
                 Knob("order", mm.ORDERS), Knob("group_m", (1, 4, 8))]

        def violations(params: dict) -> list[str]:
            return mm.config_violations(Config(**params).gemm(), m, n, k, jnp.int8)

        # Per-channel requantization drawn from 64 real multipliers quantized the TFLite way; jax
        # only inside make_inputs, so its shapes evaluate abstractly (SearchSpace.problem_bytes).
        table = tuple(jnp.asarray(v) for v in quant.quantize_multipliers(rng.uniform(1e-4, 1e-2, 64)))

        def make_inputs(seed):
            ka, kb, kbias, kq = jax.random.split(jax.random.key(seed), 4)
            channel = jax.random.randint(kq, (n,), 0, 64)
            return (jax.random.randint(ka, (m, k), -128, 128, jnp.int8), jax.random.randint(kb, (k, n), -128, 128, jnp.int8),
                    jax.random.randint(kbias, (n,), -5000, 5000, jnp.int32), table[0][channel], table[1][channel])

        def fn(cfg: Config):
            return functools.partial(gemm_requant, output_offset=-3, act_min=-128, act_max=127, config=cfg)
    if on_gpu:
        knobs += [Knob("num_warps", (2, 4, 8)), Knob("num_stages", (2, 3, 4))]
    return SearchSpace(kernel=KERNEL, problem=problem, knobs=tuple(knobs), violations=violations,
                       to_config=lambda params: Config(**params), fn=fn, make_inputs=make_inputs,
                       default=heuristic_config(problem).params(), interpreted=platform.interpret_default())
