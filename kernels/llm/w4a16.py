"""Group-quantized weight x 16-bit activation matmul (W4A16, W8A16) with dequantization fused.

Weights stay packed in HBM; the kernel unpacks 4-bit nibbles / int8 in registers and applies the
per-group scale and min after the partial dot products, so the full-precision weight never exists.

Packed layout ("group halves", K-major): a weight W (K, N) with groups of ``g`` along K is
  4-bit: ``packed`` uint8 (K/g, g/2, N): byte i of group j holds element j*g+i in its low nibble and
         element j*g+g/2+i in its high nibble; W = q * scale + min, q in 0..15.
  8-bit: ``packed`` int8 (K/g, g, N); W = q * scale.
``scales``/``mins`` are (K/g, N). With g = 32 this is exactly GGUF's Q4_1 block (Q4_0 with
min = -8 * scale, Q8_0 with the int8 block), re-strided to K-major at load time, not dequantized.
Our own quantizer (``quantize``) writes the same layout for g in {32, 64, 128}.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import platform, tuned
from kernels.llm import common
from kernels.space import Knob, SearchSpace

GROUPS = (32, 64, 128)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "scales", "mins"],
                   meta_fields=["bits", "group"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A (K, N) weight (or a stack of them: leading axes) in the packed group-halves layout."""

    packed: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (..., K, N) shape."""
        *lead, groups, _, n = self.packed.shape
        return (*lead, groups * self.group, n)

    @property
    def nbytes(self) -> int:
        return sum(int(a.size * a.dtype.itemsize) for a in (self.packed, self.scales, self.mins) if a is not None)


# ---------------------------------------------------------------------------------------------
# Packing, unpacking and the reference
# ---------------------------------------------------------------------------------------------


def pack_nibbles(q: jax.Array) -> jax.Array:
    """(..., G, g, N) integers in 0..15 -> (..., G, g/2, N) uint8 in the group-halves order."""
    half = q.shape[-2] // 2
    q = q.astype(jnp.uint8)
    return q[..., :half, :] | (q[..., half:, :] << 4)


def quantize(w: jax.Array, *, bits: int = 4, group: int = 32, symmetric: bool = False,
             scale_dtype=jnp.float16) -> QuantizedWeight:
    """Round-to-nearest group quantization of a (K, N) weight along K.

    4-bit asymmetric (Q4_1-like): scale = (max - min) / 15, min = group min.
    4-bit symmetric (Q4_0-like):  scale = -extreme / 8 with q - 8 in -8..7, stored as min = -8 * scale.
    8-bit (Q8_0-like):            scale = absmax / 127.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported; use 4 or 8")
    k, n = w.shape[-2:]
    if k % group:
        raise ValueError(f"K={k} is not a multiple of group={group}; pick a group in {GROUPS} that divides K")
    wg = w.astype(jnp.float32).reshape(*w.shape[:-2], k // group, group, n)
    if bits == 8:
        scale = jnp.max(jnp.abs(wg), axis=-2) / 127.0
        scale = scale.astype(scale_dtype)
        s32 = scale.astype(jnp.float32)
        q = jnp.round(wg / jnp.where(s32 == 0, 1.0, s32)[..., None, :])
        return QuantizedWeight(jnp.clip(q, -127, 127).astype(jnp.int8), scale, None, 8, group)
    if symmetric:
        # As llama.cpp's Q4_0: the signed value of largest magnitude maps exactly to -8 (so the
        # scale may be negative) and everything else lands in -8..7 without clipping.
        extreme = jnp.take_along_axis(wg, jnp.argmax(jnp.abs(wg), axis=-2)[..., None, :], axis=-2)[..., 0, :]
        scale = (extreme / -8.0).astype(scale_dtype)
        s32 = scale.astype(jnp.float32)
        q = jnp.round(wg / jnp.where(s32 == 0, 1.0, s32)[..., None, :]) + 8
        mins = (-8.0 * s32).astype(scale_dtype)
    else:
        lo, hi = jnp.min(wg, axis=-2), jnp.max(wg, axis=-2)
        scale = ((hi - lo) / 15.0).astype(scale_dtype)
        mins = lo.astype(scale_dtype)
        s32 = scale.astype(jnp.float32)
        q = jnp.round((wg - mins.astype(jnp.float32)[..., None, :]) / jnp.where(s32 == 0, 1.0, s32)[..., None, :])
    return QuantizedWeight(pack_nibbles(jnp.clip(q, 0, 15)), scale, mins, 4, group)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The (..., K, N) weight the packed form stands for."""
    p = w.packed
    if w.bits == 4:
        q = jnp.concatenate([p & 15, p >> 4], axis=-2).astype(jnp.float32)
    else:
        q = p.astype(jnp.float32)
    deq = q * w.scales.astype(jnp.float32)[..., None, :]
    if w.mins is not None:
        deq = deq + w.mins.astype(jnp.float32)[..., None, :]
    *lead, groups, g, n = deq.shape
    return deq.reshape(*lead, groups * g, n).astype(dtype)


def reference(x: jax.Array, w: QuantizedWeight | jax.Array) -> jax.Array:
    """x (..., K) @ W (K, N) with W dequantized, f32 accumulation, x's dtype out."""
    dense = dequantize(w, x.dtype) if isinstance(w, QuantizedWeight) else w.astype(x.dtype)
    return jnp.dot(x, dense, preferred_element_type=jnp.float32).astype(x.dtype)


# Bytes (as f32) of the weight columns one step of ``xla_matmul``'s CPU loop reads: large enough that
# the loop's overhead stays hidden (SmolLM2's 113 MB output projection in 8 chunks: 7 ms, against
# 11 ms in 4 MiB chunks and 50-70 ms dequantized at once).
XLA_CHUNK_BYTES = 16 * 2**20


def xla_matmul(x: jax.Array, w: QuantizedWeight | jax.Array) -> jax.Array:
    """The same product as ``reference``, written for XLA, which has no fused dequantizing dot.

    The weight is never expanded to a scaled (K, N) matrix: per-group partial sums of the raw
    integers are scaled afterwards, x . (q*s + m) = s * (x . q) + m * sum(x) (inside a ``lax.scan``
    over layers this runs 7x faster on XLA:CPU than dequantize-then-dot). On the CPU, a weight whose
    f32 form exceeds ``XLA_CHUNK_BYTES`` (an output projection: 113 MB for a 49152 vocabulary) runs
    as a loop over column chunks, so no intermediate of its full size is ever written.
    """
    if not isinstance(w, QuantizedWeight):
        return reference(x, w)
    k, n = w.shape[-2:]
    chunks = _chunk_count(n, k * 4) if platform.backend() == "cpu" else 1
    if chunks == 1:
        return _grouped_matmul(x, w).astype(x.dtype)
    nb = n // chunks

    def chunk(c):
        def cols(a):
            return None if a is None else jax.lax.dynamic_slice_in_dim(a, c * nb, nb, axis=a.ndim - 1)
        return _grouped_matmul(x, QuantizedWeight(cols(w.packed), cols(w.scales), cols(w.mins), w.bits, w.group))

    out = jax.lax.map(chunk, jnp.arange(chunks))  # (chunks, ..., nb)
    return jnp.moveaxis(out, 0, -2).reshape(*x.shape[:-1], n).astype(x.dtype)


def _grouped_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    g = w.group
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g).astype(jnp.float32)
    if w.bits == 4:
        lo, hi = (w.packed & 15).astype(jnp.float32), (w.packed >> 4).astype(jnp.float32)
        part = (jnp.einsum("...gh,ghn->...gn", xg[..., : g // 2], lo)
                + jnp.einsum("...gh,ghn->...gn", xg[..., g // 2:], hi))
    else:
        part = jnp.einsum("...gh,ghn->...gn", xg, w.packed.astype(jnp.float32))
    out = part * w.scales.astype(jnp.float32)
    if w.mins is not None:
        out = out + jnp.sum(xg, axis=-1)[..., None] * w.mins.astype(jnp.float32)
    return jnp.sum(out, axis=-2)


def _chunk_count(n: int, bytes_per_column: int) -> int:
    """The fewest column chunks, dividing N, of at most ``XLA_CHUNK_BYTES`` each."""
    want = max(1, -(-n * bytes_per_column // XLA_CHUNK_BYTES))
    return next(c for c in range(want, n + 1) if n % c == 0)


def embedding_lookup(w: QuantizedWeight | jax.Array, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Rows ``ids`` of an embedding stored as a (dim, vocab) weight: only those columns are dequantized."""
    if not isinstance(w, QuantizedWeight):
        return jnp.take(w, ids.reshape(-1), axis=-1).T.reshape(*ids.shape, -1).astype(dtype)
    picked = QuantizedWeight(jnp.take(w.packed, ids.reshape(-1), axis=-1),
                             jnp.take(w.scales, ids.reshape(-1), axis=-1),
                             None if w.mins is None else jnp.take(w.mins, ids.reshape(-1), axis=-1),
                             w.bits, w.group)
    return dequantize(picked, dtype).T.reshape(*ids.shape, -1)


# ---------------------------------------------------------------------------------------------
# Kernel body
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """block_m: rows of activations per program; < 16 selects the GEMV body (broadcast-multiply and
    reduce, no tensor cores, for decode), >= 16 the dot body (prefill).
    block_n: output columns per program. block_groups: quantization groups per K step.
    split_k: K is cut into this many slices run by separate programs (partial sums added after),
    so a batch-1 GEMV with few output tiles still fills every SM."""

    block_m: int = 1
    block_n: int = 128
    block_groups: int = 4
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def params(self) -> dict:
        return common.params_of(self)


def accumulate(x_refs, w_ref, s_ref, m_ref, *, bits: int, block_m: int, block_groups: int, num_steps: int):
    """sum_k x[:, k] * W[k, :] over the whole K for one (block_m, block_n) tile, in f32.

    x_refs: for 4-bit (x_lo, x_hi), each (block_m, K/g, g/2): activations split like the nibbles;
            otherwise (x,) (block_m, K/g, g). w_ref: (K/g, g/2 or g, block_n). s_ref, m_ref: (K/g,
            block_n) or None. Returns a list of block_m (block_n,) rows (GEMV) or a (block_m,
            block_n) array (dot body). Scale and min are applied per group after the partial sums:
            x . (q*s + m) = s * (x . q) + m * sum(x).
    """
    f32 = jnp.float32

    def unpack(q):
        if bits == 4:
            return [(q & 15).astype(f32), (q >> 4).astype(f32)]
        return [q.astype(f32)]

    block_n = w_ref.shape[-1]
    if block_m < 16:
        def gemv_step(step, rows):
            gs = pl.ds(step * block_groups, block_groups)
            halves = unpack(w_ref[gs, :, :])  # each (bg, h, bn)
            s = None if s_ref is None else s_ref[gs, :].astype(f32)
            mn = None if m_ref is None else m_ref[gs, :].astype(f32)
            out = []
            for r in range(block_m):
                xs = [x_ref[r, gs, :].astype(f32) for x_ref in x_refs]  # each (bg, h)
                part = sum(jnp.sum(q * x[:, :, None], axis=1) for q, x in zip(halves, xs))  # (bg, bn)
                if s is not None:
                    part = part * s
                if mn is not None:
                    xsum = sum(jnp.sum(x, axis=1) for x in xs)  # (bg,)
                    part = part + xsum[:, None] * mn
                out.append(rows[r] + jnp.sum(part, axis=0))
            return tuple(out)

        init = tuple(jnp.zeros((block_n,), f32) for _ in range(block_m))
        return list(jax.lax.fori_loop(0, num_steps, gemv_step, init))

    def dot_step(step, acc):
        for j in range(block_groups):
            gi = step * block_groups + j
            q = w_ref[gi, :, :]
            xs = [x_ref[:, gi, :] for x_ref in x_refs]  # each (bm, h)
            halves = [h.astype(xs[0].dtype) for h in unpack(q)] if bits in (4, 8) else [q.astype(xs[0].dtype)]
            part = sum(jnp.dot(x, q_h, preferred_element_type=f32) for x, q_h in zip(xs, halves))
            if s_ref is not None:
                part = part * s_ref[gi, :].astype(f32)[None, :]
            if m_ref is not None:
                xsum = sum(jnp.sum(x.astype(f32), axis=1) for x in xs)
                part = part + xsum[:, None] * m_ref[gi, :].astype(f32)[None, :]
            acc = acc + part
        return acc

    return jax.lax.fori_loop(0, num_steps, dot_step, jnp.zeros((block_m, block_n), f32))


def _matmul_kernel(*refs, bits: int, has_scales: bool, has_mins: bool, block_m: int, block_groups: int,
                   num_steps: int):
    n_x = 2 if bits == 4 else 1
    x_refs, rest = refs[:n_x], list(refs[n_x:])
    w_ref = rest.pop(0)
    s_ref = rest.pop(0) if has_scales else None
    m_ref = rest.pop(0) if has_mins else None
    (o_ref,) = rest
    acc = accumulate(x_refs, w_ref, s_ref, m_ref, bits=bits, block_m=block_m, block_groups=block_groups,
                     num_steps=num_steps)
    if block_m < 16:
        for r in range(block_m):
            o_ref[r, :] = acc[r]
    else:
        o_ref[...] = acc


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def as_grouped(w: QuantizedWeight | jax.Array) -> tuple[int, int, list[jax.Array], int]:
    """(bits, group, [packed, scales?, mins?], K) for a quantized or dense (K, N) weight.

    A dense weight runs through the same body as 16-bit "groups" of 64 (or 32) without scales.
    """
    if isinstance(w, QuantizedWeight):
        if w.packed.ndim != 3:
            raise ValueError(f"expected one (K, N) weight, got a stack of shape {w.shape}; index the layer first")
        arrays = [w.packed, w.scales] + ([] if w.mins is None else [w.mins])
        return w.bits, w.group, arrays, w.shape[0]
    if w.ndim != 2:
        raise ValueError(f"expected a (K, N) weight, got shape {w.shape}")
    k, n = w.shape
    g = 64 if k % 64 == 0 else 32 if k % 32 == 0 else 16
    if k % g:
        raise ValueError(f"dense weight K={k} must be a multiple of 16 for the Pallas path")
    return 16, g, [w.reshape(k // g, g, n)], k


def split_activations(x2: jax.Array, bits: int, group: int) -> list[jax.Array]:
    """(M, K) -> the activation operands of ``accumulate`` (nibble halves for 4-bit)."""
    m, k = x2.shape
    xg = x2.reshape(m, k // group, group)
    if bits == 4:
        return [xg[:, :, : group // 2], xg[:, :, group // 2:]]
    return [xg]


def problem_key(m: int, n: int, k: int, bits: int, group: int, dtype) -> dict:
    return {"m": m, "n": n, "k": k, "bits": bits, "group": group, "dtype": jnp.dtype(dtype).name}


def heuristic_config(m: int, n: int, k: int, bits: int, group: int, on_gpu: bool | None = None) -> Config:
    groups = k // group
    if on_gpu is None:
        on_gpu = platform.backend() == "gpu"
    if m < 16 and on_gpu:
        block_m = min(8, pl.next_power_of_2(m))
        block_n = common.largest_pow2_divisor(n, 64)
        # The GEMV body holds (block_groups, rows of a group, block_n) unpacked weights in registers:
        # keep that near 4096 elements (32 per thread at 4 warps) so nothing spills, and split K
        # until there are >= 256 programs (two per SM on an H100).
        rows = group // 2 if bits == 4 else group
        block_groups = common.largest_pow2_divisor(groups, max(1, 4096 // (rows * block_n)))
        split_k = common.largest_pow2_divisor(groups // block_groups, max(1, 256 // max(1, n // block_n)))
    elif m < 16:  # the interpreter: few, large programs
        block_m = min(8, pl.next_power_of_2(m))
        block_n = common.largest_pow2_divisor(n, 128)
        split_k = 1
        block_groups = common.largest_pow2_divisor(groups, max(1, 512 // group))
    else:
        block_m = 32 if m >= 32 else 16
        block_n = common.largest_pow2_divisor(n, 64)
        split_k = 1
        block_groups = common.largest_pow2_divisor(groups, max(1, 128 // group))
    return Config(block_m=block_m, block_n=block_n, block_groups=block_groups, split_k=split_k, num_warps=4,
                  num_stages=2)


def config_violations(cfg: Config, m: int, n: int, k: int, group: int, on_gpu: bool) -> list[str]:
    out = []
    groups = k // group
    if n % cfg.block_n:
        out.append(f"block_n={cfg.block_n} must divide N={n}")
    if groups % cfg.split_k or (groups // cfg.split_k) % cfg.block_groups:
        out.append(f"split_k*block_groups={cfg.split_k}*{cfg.block_groups} must divide K/group={groups}")
    for name in ("block_m", "block_n", "block_groups", "split_k"):
        if not common.is_pow2(getattr(cfg, name)):
            out.append(f"{name}={getattr(cfg, name)} must be a power of 2")
    if on_gpu and cfg.block_n < 16:
        out.append(f"block_n={cfg.block_n} < 16 does not lower to Triton; N={n} needs a factor 16")
    if cfg.block_m >= 16 and group < 32:
        out.append("the dot body needs group >= 32 (16-wide halves)")
    return out


@functools.partial(jax.jit, static_argnames=("bits", "group", "config", "interpret"))
def _quantized_matmul(x2, arrays, *, bits: int, group: int, config: Config, interpret: bool):
    m, k = x2.shape
    n = arrays[0].shape[-1]
    cfg = config
    m_pad = -m % cfg.block_m
    if m_pad:
        x2 = jnp.pad(x2, ((0, m_pad), (0, 0)))
    xs = split_activations(x2, bits, group)
    split_groups = k // group // cfg.split_k  # quantization groups in one K slice
    grid = (x2.shape[0] // cfg.block_m, n // cfg.block_n, cfg.split_k)
    x_specs = [pl.BlockSpec((cfg.block_m, split_groups, xi.shape[-1]), lambda i, j, s: (i, s, 0)) for xi in xs]
    w_spec = pl.BlockSpec((split_groups, arrays[0].shape[1], cfg.block_n), lambda i, j, s: (s, 0, j))
    sm_specs = [pl.BlockSpec((split_groups, cfg.block_n), lambda i, j, s: (s, j)) for _ in arrays[1:]]
    kernel = functools.partial(
        _matmul_kernel, bits=bits, has_scales=len(arrays) > 1, has_mins=len(arrays) > 2, block_m=cfg.block_m,
        block_groups=cfg.block_groups, num_steps=split_groups // cfg.block_groups)
    partials = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=x_specs + [w_spec] + sm_specs,
        out_specs=pl.BlockSpec((None, cfg.block_m, cfg.block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, x2.shape[0], n), jnp.float32),
        compiler_params=platform.compiler_params(cfg.num_warps, cfg.num_stages, interpret),
        interpret=interpret,
    )(*xs, *arrays)
    out = jnp.sum(partials, axis=0).astype(x2.dtype)
    return out[:m]


def quantized_matmul(x: jax.Array, w: QuantizedWeight | jax.Array, *, config: Config | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """x (..., K) @ W (K, N) -> (..., N) in x's dtype; W packed 4-/8-bit (or dense), dequantized in-kernel."""
    bits, group, arrays, k = as_grouped(w)
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={k}")
    lead = x.shape[:-1]
    m, n = math.prod(lead), arrays[0].shape[-1]
    if k == 0:
        raise ValueError("the weights have K=0 input features; quantized_matmul needs K >= 1")
    if 0 in (m, n):  # no row or no output feature: the empty result
        return jnp.zeros((*lead, n), x.dtype)
    x2 = x.reshape(-1, k)
    if interpret is None:
        interpret = platform.interpret_default()
    cfg = tuned.resolve("w4a16", problem_key(m, n, k, bits, group, x.dtype), config, config_type=Config,
                        heuristic=lambda: heuristic_config(m, n, k, bits, group, on_gpu=not interpret))
    bad = config_violations(cfg, m, n, k, group, on_gpu=not interpret)
    if bad:
        raise ValueError(f"w4a16 config {cfg} is illegal for M={m}, N={n}, K={k}: {'; '.join(bad)}")
    out = _quantized_matmul(x2, arrays, bits=bits, group=group, config=cfg, interpret=interpret)
    return out.reshape(*lead, n)


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------

# LLaMA-2-7B decode GEMVs (batch 1): the fused q/k/v projection, o, the FFN, the output projection.
DEFAULT_PROBLEMS = [
    problem_key(1, 12288, 4096, 4, 32, "bfloat16"),
    problem_key(1, 4096, 4096, 4, 32, "bfloat16"),
    problem_key(1, 11008, 4096, 4, 32, "bfloat16"),
    problem_key(1, 4096, 11008, 4, 32, "bfloat16"),
    problem_key(1, 32000, 4096, 4, 32, "bfloat16"),
]


def parse_shape(text: str) -> dict:
    """``MxNxK`` or ``MxNxK:g128`` (4-bit, group 32 by default) or ``MxNxK:g32:b8``."""
    head, *opts = text.split(":")
    try:
        m, n, k = (int(v) for v in head.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} is not MxNxK[:gGROUP][:bBITS], e.g. 1x4096x4096:g128") from None
    group, bits = 32, 4
    for opt in opts:
        if opt[:1] in ("g", "b") and opt[1:].isdigit():
            group, bits = (int(opt[1:]), bits) if opt[0] == "g" else (group, int(opt[1:]))
        else:
            raise ValueError(f"shape {text!r}: option {opt!r} is not gGROUP or bBITS, e.g. 1x4096x4096:g128:b4")
    if min(m, n, k) < 1 or bits not in (4, 8) or group < 1 or k % group:
        raise ValueError(f"shape {text!r}: sizes must be positive, BITS 4 or 8 and GROUP divide K, "
                         "e.g. 1x4096x4096:g128")
    return problem_key(m, n, k, bits, group, "bfloat16")


def search_space(problem: dict) -> SearchSpace:
    m, n, k, bits, group = problem["m"], problem["n"], problem["k"], problem["bits"], problem["group"]
    dtype = jnp.dtype(problem["dtype"])
    on_gpu = platform.backend() == "gpu"
    groups = k // group
    block_ms = (1, 2, 4, 8) if m < 16 else (16, 32, 64)
    knobs = [
        Knob("block_m", tuple(b for b in block_ms if b <= max(m, 16) or b == block_ms[0])),
        Knob("block_n", tuple(b for b in (16, 32, 64, 128, 256, 512) if n % b == 0) or (1,)),
        Knob("block_groups", tuple(b for b in (1, 2, 4, 8, 16) if groups % b == 0)),
        Knob("split_k", tuple(b for b in (1, 2, 4, 8, 16) if groups % b == 0)),
    ]
    if on_gpu:
        knobs += [Knob("num_warps", (1, 2, 4, 8)), Knob("num_stages", (1, 2, 3, 4))]

    def make_inputs(seed):
        kx, kw = jax.random.split(jax.random.key(seed))
        x = jax.random.normal(kx, (m, k), dtype)
        return x, quantize(jax.random.normal(kw, (k, n), jnp.float32) * 0.02, bits=bits, group=group)

    return SearchSpace(
        kernel="w4a16",
        problem=problem,
        knobs=tuple(knobs),
        violations=lambda p: config_violations(Config(**{**Config().params(), **p}), m, n, k, group, on_gpu),
        to_config=lambda p: Config(**{**Config().params(), **p}),
        fn=lambda cfg: functools.partial(quantized_matmul, config=cfg),
        make_inputs=make_inputs,
        default=heuristic_config(m, n, k, bits, group).params(),
    )
