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

from kernels.llm import common, rmsnorm
from tuning import platform, tuned
from tuning.space import Knob, SearchSpace, parse_dims

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


def reference(x: jax.Array, w: QuantizedWeight | jax.Array, *, norm_weight: jax.Array | None = None,
              eps: float = 1e-5, residual: jax.Array | None = None, dtype=None) -> jax.Array:
    """x (..., K) @ W (K, N) with W dequantized, f32 accumulation, ``dtype`` (default x's) out.

    norm_weight: x (the residual stream) is first RMS-normalised and scaled (``rmsnorm.reference``),
    then rounded to ``dtype``. residual: residual + product is returned, added in f32, in the
    residual's dtype.
    """
    dtype = x.dtype if dtype is None else dtype
    if norm_weight is not None:
        x = rmsnorm.reference(x.astype(jnp.float32), norm_weight, eps=eps)[0]
    x = x.astype(dtype)
    dense = dequantize(w, dtype) if isinstance(w, QuantizedWeight) else w.astype(dtype)
    out = jnp.dot(x, dense, preferred_element_type=jnp.float32)
    if residual is not None:
        return (residual.astype(jnp.float32) + out).astype(residual.dtype)
    return out.astype(dtype)


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

# Exact integer -> float32 by bit pattern: 0x4B000000 is 2^23, whose float32 spacing is 1, so
# or-ing an integer 0 <= q < 2^23 into its mantissa gives the float 2^23 + q exactly, and one
# subtraction leaves q. This replaces a (quarter-rate) int->float conversion per weight with an
# integer OR and a float subtract (the float32 form of the trick Marlin plays with fp16 2^10).
_MAGIC_F32_BITS = 0x4B000000
_MAGIC_F32 = 8388608.0


def unpack_exact(q: jax.Array, bits: int) -> list[jax.Array]:
    """Packed weights -> their integer values as float32 by the bit trick above (usable in a kernel).

    4-bit: uint8 (..., h, n) -> [low nibbles, high nibbles] in 0..15 (the two halves of each group).
    8-bit: int8 -> [q] in -128..127 (biased by 128 to be non-negative, unbiased after).
    16-bit: a dense float tile -> [tile as float32].
    """
    f32 = jnp.float32
    if bits == 4:
        u = q.astype(jnp.uint32)
        lo = jax.lax.bitcast_convert_type((u & 15) | _MAGIC_F32_BITS, f32) - _MAGIC_F32
        hi = jax.lax.bitcast_convert_type((u >> 4) | _MAGIC_F32_BITS, f32) - _MAGIC_F32
        return [lo, hi]
    if bits == 8:
        u = (jax.lax.bitcast_convert_type(q, jnp.uint8) ^ 0x80).astype(jnp.uint32)  # q + 128
        return [jax.lax.bitcast_convert_type(u | _MAGIC_F32_BITS, f32) - (_MAGIC_F32 + 128.0)]
    return [q.astype(f32)]


@dataclasses.dataclass(frozen=True)
class Config:
    """block_m: rows of activations per program; < 16 selects the GEMV body (dequantize, multiply
    into a register tile, reduce once at the end; no tensor cores, for decode), >= 16 the dot body
    (prefill). block_n: output columns per program. block_groups: quantization groups per K step.
    split_k: K is cut into this many slices run by separate programs, whose partial sums are added
    into the output atomically in the epilogue (only with a residual: the output starts as the
    residual), so a batch-1 GEMV with few output tiles still fills every SM.
    (The Hopper GEMV of ``kernels.llm.gemv_mgpu`` has its own weight layout and ``Config``; it has not
    run yet and is not dispatched from here.)"""

    block_m: int = 1
    block_n: int = 128
    block_groups: int = 4
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def params(self) -> dict:
        return common.params_of(self)


def _inv_rms(x_ref, row, *, block_groups: int, num_steps: int, dim: int, eps: float):
    """1 / rms of activation row ``row`` (or rows: a slice) of x_ref (rows, K/g, g), in f32, by a loop
    of the same K steps as the product (Triton loads power-of-2 tiles only)."""
    def step(i, total):
        xs = x_ref[row, pl.ds(i * block_groups, block_groups), :].astype(jnp.float32)
        return total + jnp.sum(jnp.sum(xs * xs, axis=-1), axis=-1)

    zero = jnp.zeros((), jnp.float32) if isinstance(row, int) else jnp.zeros((x_ref.shape[0],), jnp.float32)
    total = jax.lax.fori_loop(0, num_steps, step, zero)
    return jax.lax.rsqrt(total / dim + eps)


def _activation_parts(x_ref, row, gs, halves: int, inv_rms, nw_ref):
    """Activations of K step ``gs`` for row(s) ``row`` as f32, split like the weight's halves (two for
    4-bit: elements i and g/2 + i of a group share a byte), RMS-normalised when ``nw_ref`` is given."""
    g = x_ref.shape[-1]
    h = g // halves
    parts = []
    for p in range(halves):
        xp = x_ref[row, gs, pl.ds(p * h, h)].astype(jnp.float32)
        if nw_ref is not None:
            scale = inv_rms if isinstance(row, int) else inv_rms[:, None, None]
            xp = xp * scale * nw_ref[gs, pl.ds(p * h, h)].astype(jnp.float32)
        parts.append(xp)
    return parts


def accumulate(x_ref, w_ref, s_ref, m_ref, nw_ref=None, *, bits: int, block_m: int, block_groups: int,
               num_steps: int, eps: float = 0.0, dim: int = 0):
    """sum_k y[:, k] * W[k, :] over this program's K slice for one (block_m, block_n) tile, in f32.

    x_ref: (block_m, K/g, g) activations; w_ref: (K/g, g/2 or g, block_n) packed; s_ref, m_ref:
    (K/g, block_n) or None. y = x, or with ``nw_ref`` (K/g, g) the RMS-normalised x * nw (the norm
    over the full row of ``dim`` elements: the prologue of the fused RMSNorm). Returns a list of
    block_m (block_n,) rows (GEMV) or a (block_m, block_n) array (dot body).

    GEMV: each step dequantizes its tile exactly (``unpack_exact``, then q * scale + min) and
    multiplies it into a (block_groups, rows, block_n) register accumulator; the accumulator is
    reduced once, after the K loop. Dot body: per group, s * (x . q) + m * sum(x) on tensor cores.
    """
    f32 = jnp.float32
    halves = 2 if bits == 4 else 1
    block_n = w_ref.shape[-1]
    if block_m < 16:
        inv = [None] * block_m
        if nw_ref is not None:
            inv = [_inv_rms(x_ref, r, block_groups=block_groups, num_steps=num_steps, dim=dim, eps=eps)
                   for r in range(block_m)]

        def gemv_step(step, accs):
            gs = pl.ds(step * block_groups, block_groups)
            weights = unpack_exact(w_ref[gs, :, :], bits)  # each (bg, h, bn)
            if s_ref is not None:
                s = s_ref[gs, :].astype(f32)[:, None, :]
                mn = None if m_ref is None else m_ref[gs, :].astype(f32)[:, None, :]
                weights = [q * s if mn is None else q * s + mn for q in weights]
            out = []
            for r in range(block_m):
                xs = _activation_parts(x_ref, r, gs, halves, inv[r], nw_ref)  # each (bg, h)
                acc = accs[r]
                for w, xp in zip(weights, xs):
                    acc = acc + w * xp[:, :, None]
                out.append(acc)
            return tuple(out)

        rows = w_ref.shape[1]
        init = tuple(jnp.zeros((block_groups, rows, block_n), f32) for _ in range(block_m))
        accs = jax.lax.fori_loop(0, num_steps, gemv_step, init)
        return [jnp.sum(jnp.sum(acc, axis=0), axis=0) for acc in accs]

    inv_all = None
    if nw_ref is not None:
        inv_all = _inv_rms(x_ref, slice(None), block_groups=block_groups, num_steps=num_steps, dim=dim, eps=eps)
    dot_dtype = x_ref.dtype if jnp.dtype(x_ref.dtype).itemsize <= 2 or bits == 16 else f32

    def dot_step(step, acc):
        for j in range(block_groups):
            gi = step * block_groups + j
            gs = pl.ds(gi, 1)
            xs = [xp[:, 0, :] for xp in _activation_parts(x_ref, slice(None), gs, halves, inv_all, nw_ref)]
            qs = unpack_exact(w_ref[gi, :, :], bits)  # each (h, bn), exact integers (or the dense tile)
            part = sum(jnp.dot(xp.astype(dot_dtype), q.astype(dot_dtype), preferred_element_type=f32)
                       for xp, q in zip(xs, qs))
            if s_ref is not None:
                part = part * s_ref[gi, :].astype(f32)[None, :]
            if m_ref is not None:
                xsum = sum(jnp.sum(xp, axis=1) for xp in xs)
                part = part + xsum[:, None] * m_ref[gi, :].astype(f32)[None, :]
            acc = acc + part
        return acc

    return jax.lax.fori_loop(0, num_steps, dot_step, jnp.zeros((block_m, block_n), f32))


def store_rows(o_ref, acc, *, block_m: int, accumulate_into: bool, atomic: bool):
    """The epilogue: write the (block_m, block_n) result, or add it to what the output holds (the
    residual, aliased in); ``atomic`` when several K-slice programs add into the same tile."""
    rows = acc if block_m < 16 else [acc[r] for r in range(block_m)]
    if atomic:
        from jax.experimental.pallas import triton as pltriton

        for r, row in enumerate(rows):
            pltriton.atomic_add(o_ref, (pl.ds(r, 1), pl.ds(0, o_ref.shape[-1])), row[None, :].astype(o_ref.dtype))
        return
    if block_m >= 16:
        o_ref[...] = (o_ref[...].astype(jnp.float32) + acc if accumulate_into else acc).astype(o_ref.dtype)
        return
    for r, row in enumerate(rows):
        o_ref[r, :] = (o_ref[r, :].astype(jnp.float32) + row if accumulate_into else row).astype(o_ref.dtype)


def _linear_kernel(*refs, bits: int, n_extra: int, has_norm: bool, has_residual: bool, block_m: int,
                   block_groups: int, num_steps: int, split_k: int, eps: float, dim: int):
    refs = list(refs)
    x_ref = refs.pop(0)
    nw_ref = refs.pop(0) if has_norm else None
    w_ref = refs.pop(0)
    s_ref = refs.pop(0) if n_extra > 0 else None
    m_ref = refs.pop(0) if n_extra > 1 else None
    if has_residual:
        refs.pop(0)  # the residual input: the same buffer as the output (aliased), read through o_ref
    (o_ref,) = refs
    acc = accumulate(x_ref, w_ref, s_ref, m_ref, nw_ref, bits=bits, block_m=block_m, block_groups=block_groups,
                     num_steps=num_steps, eps=eps, dim=dim)
    store_rows(o_ref, acc, block_m=block_m, accumulate_into=has_residual, atomic=has_residual and split_k > 1)


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


def problem_key(m: int, n: int, k: int, bits: int, group: int, dtype) -> dict:
    return {"m": m, "n": n, "k": k, "bits": bits, "group": group, "dtype": jnp.dtype(dtype).name}


def sm_count() -> int:
    """Streaming multiprocessors of the GPU (132 on an H100 SXM, the figure used off a GPU, so that
    configs chosen on the CPU for a GPU lowering are the GPU's)."""
    return int(platform.gpu_properties().get("sm_count") or 132)


def heuristic_config(m: int, n: int, k: int, bits: int, group: int, on_gpu: bool | None = None, *,
                     residual: bool = False) -> Config:
    """Tiles for a GEMV (m < 16) or a prefill matmul. ``residual``: the product is added into a
    residual (split-K is then legal: its partial sums are added atomically)."""
    groups = k // group
    if on_gpu is None:
        on_gpu = platform.backend() == "gpu"
    if m < 16 and on_gpu:
        block_m = common.largest_pow2_divisor(m, 8)
        # Output tiles of 32-64 columns; the register tile (block_groups, rows of a group, block_n)
        # near 2048 f32 (16 per thread at 4 warps), so nothing spills.
        block_n = common.largest_pow2_divisor(n, 64 if n >= 64 * 2 * sm_count() else 32)
        rows = group // 2 if bits == 4 else group
        block_groups = common.largest_pow2_divisor(groups, max(1, 2048 // (rows * block_n)))
        # Split K until the grid covers the SMs twice (only where partial sums can be added atomically).
        programs = -(-m // block_m) * (n // block_n)
        split_k = 1
        while residual and programs * split_k < 2 * sm_count() and (groups // block_groups) % (2 * split_k) == 0:
            split_k *= 2
    elif m < 16:  # the interpreter: few, large programs
        block_m = common.largest_pow2_divisor(m, 8)
        block_n = common.largest_pow2_divisor(n, 128)
        split_k = 1
        block_groups = common.largest_pow2_divisor(groups, max(1, 512 // group))
    else:
        block_m = 32 if m >= 32 else 16
        block_n = common.largest_pow2_divisor(n, 64)
        split_k = 1
        block_groups = common.largest_pow2_divisor(groups, max(1, 128 // group))
    return Config(block_m=block_m, block_n=block_n, block_groups=block_groups, split_k=split_k, num_warps=4,
                  num_stages=3 if on_gpu and m < 16 else 2)


def config_violations(cfg: Config, m: int, n: int, k: int, group: int, on_gpu: bool, *,
                      residual: bool = True) -> list[str]:
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
    if cfg.split_k > 1 and not residual:
        out.append(f"split_k={cfg.split_k} needs a residual to add the partial sums into; use split_k=1")
    return out


def pallas_linear(x2, arrays, *, bits: int, group: int, config: Config, interpret: bool, norm_weight=None,
                  eps: float = 0.0, residual=None, dtype=None, name: str = "w4a16_linear"):
    """The fused linear pallas_call on a 2-D x (M, K): [RMSNorm prologue] -> GEMV/dot -> [+ residual]."""
    m, k = x2.shape
    n = arrays[0].shape[-1]
    cfg = config
    dtype = x2.dtype if dtype is None else dtype
    m_pad = -m % cfg.block_m
    if m_pad:
        x2 = jnp.pad(x2, ((0, m_pad), (0, 0)))
        residual = None if residual is None else jnp.pad(residual, ((0, m_pad), (0, 0)))
    groups = k // group
    x3 = x2.reshape(x2.shape[0], groups, group)  # a bitcast: the kernel slices the nibble halves itself
    split_groups = groups // cfg.split_k  # quantization groups in one K slice
    grid = (x3.shape[0] // cfg.block_m, n // cfg.block_n, cfg.split_k)
    operands = [x3]
    specs = [pl.BlockSpec((cfg.block_m, split_groups, group), lambda i, j, s: (i, s, 0))]
    if norm_weight is not None:
        operands.append(norm_weight.reshape(groups, group))
        specs.append(pl.BlockSpec((split_groups, group), lambda i, j, s: (s, 0)))
    operands += arrays
    specs.append(pl.BlockSpec((split_groups, arrays[0].shape[1], cfg.block_n), lambda i, j, s: (s, 0, j)))
    specs += [pl.BlockSpec((split_groups, cfg.block_n), lambda i, j, s: (s, j)) for _ in arrays[1:]]
    out_spec = pl.BlockSpec((cfg.block_m, cfg.block_n), lambda i, j, s: (i, j))
    aliases = {}
    if residual is not None:
        aliases = {len(operands): 0}
        operands.append(residual)
        specs.append(out_spec)
    out_dtype = residual.dtype if residual is not None else dtype
    kernel = functools.partial(
        _linear_kernel, bits=bits, n_extra=len(arrays) - 1, has_norm=norm_weight is not None,
        has_residual=residual is not None, block_m=cfg.block_m, block_groups=cfg.block_groups,
        num_steps=split_groups // cfg.block_groups, split_k=cfg.split_k, eps=float(eps), dim=k)
    weight_bytes = sum(int(a.size) * a.dtype.itemsize for a in arrays)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((x3.shape[0], n), out_dtype),
        input_output_aliases=aliases,
        compiler_params=platform.compiler_params(cfg.num_warps, cfg.num_stages, interpret),
        interpret=interpret,
        name=name,
        cost_estimate=pl.CostEstimate(flops=2 * m * n * k, transcendentals=0,
                                      bytes_accessed=weight_bytes + (x2.size + 2 * m * n) * 4),
    )(*operands)
    return out[:m] if m_pad else out


@functools.partial(jax.jit, static_argnames=("bits", "group", "config", "interpret", "eps", "dtype"))
def _linear(x2, arrays, norm_weight, residual, *, bits: int, group: int, config: Config, interpret: bool,
            eps: float, dtype):
    return pallas_linear(x2, arrays, bits=bits, group=group, config=config, interpret=interpret,
                         norm_weight=norm_weight, eps=eps, residual=residual, dtype=dtype,
                         name="w4a16_" + ("norm_" if norm_weight is not None else "") + "linear"
                         + ("_residual" if residual is not None else ""))


def resolve_config(m: int, n: int, k: int, bits: int, group: int, dtype, config: Config | None, *,
                   interpret: bool, residual: bool, norm: bool = False, kernel: str = "w4a16") -> Config:
    """explicit > tuned cache > heuristic, then checked (a clear error naming the legal tiles).
    Split-K needs a residual to add into and no norm (the norm's statistic spans the whole row)."""
    splittable = residual and not norm
    cfg = tuned.resolve(kernel, problem_key(m, n, k, bits, group, dtype), config, config_type=Config,
                        heuristic=lambda: heuristic_config(m, n, k, bits, group, on_gpu=not interpret,
                                                           residual=splittable))
    if cfg.split_k > 1 and not splittable and config is None:  # a tuned split-K config used without residual
        cfg = dataclasses.replace(cfg, split_k=1, block_groups=common.largest_pow2_divisor(
            k // group, cfg.block_groups * cfg.split_k))
    bad = config_violations(cfg, m, n, k, group, on_gpu=not interpret, residual=residual)
    if norm and cfg.split_k > 1:
        bad.append(f"split_k={cfg.split_k} with norm_weight: the norm needs the whole row in one program")
    if bad:
        raise ValueError(f"{kernel} config {cfg} is illegal for M={m}, N={n}, K={k}: {'; '.join(bad)}")
    return cfg


def quantized_matmul(x: jax.Array, w: QuantizedWeight | jax.Array, *, norm_weight: jax.Array | None = None,
                     eps: float = 1e-5, residual: jax.Array | None = None, dtype=None,
                     config: Config | None = None, interpret: bool | None = None) -> jax.Array:
    """x (..., K) @ W (K, N) -> (..., N); W packed 4-/8-bit (or dense), dequantized in-kernel.

    Fused around the product (same contract as ``reference``): ``norm_weight`` (K,): x is the
    residual stream and is RMS-normalised first (the RMSNorm runs in the prologue); ``residual``
    (..., N): returned is residual + product in the residual's dtype (the epilogue adds it, and the
    split-K partial sums with it). Without a residual the result is in ``dtype`` (default x's).
    """
    bits, group, arrays, k = as_grouped(w)
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={k}")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight has shape {norm_weight.shape}, expected ({k},)")
    lead = x.shape[:-1]
    m, n = math.prod(lead), arrays[0].shape[-1]
    if k == 0:
        raise ValueError("the weights have K=0 input features; quantized_matmul needs K >= 1")
    if residual is not None and residual.shape != (*lead, n):
        raise ValueError(f"residual has shape {residual.shape}, expected {(*lead, n)}")
    if 0 in (m, n):  # no row or no output feature: the empty result
        return jnp.zeros((*lead, n), x.dtype if dtype is None else dtype)
    x2 = x.reshape(-1, k)
    if interpret is None:
        interpret = platform.interpret_default()
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    cfg = resolve_config(m, n, k, bits, group, dtype, config, interpret=interpret, residual=residual is not None,
                         norm=norm_weight is not None)
    out = _linear(x2, arrays, norm_weight, None if residual is None else residual.reshape(m, n), bits=bits,
                  group=group, config=cfg, interpret=interpret, eps=float(eps), dtype=dtype)
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
    m, n, k = parse_dims(head, "MxNxK[:gGROUP][:bBITS]", "1x4096x4096:g128")
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
    """The decode GEMV as the model runs it for ``wo`` and ``w_down``: the product added into the
    f32 residual stream (so split-K partial sums are added in the epilogue)."""
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

    def violations(p):
        return config_violations(Config(**{**Config().params(), **p}), m, n, k, group, on_gpu)

    def make_inputs(seed):
        kx, kw, kr = jax.random.split(jax.random.key(seed), 3)
        x = jax.random.normal(kx, (m, k), dtype)
        w = quantize(jax.random.normal(kw, (k, n), jnp.float32) * 0.02, bits=bits, group=group)
        return x, w, jax.random.normal(kr, (m, n), jnp.float32)

    def fn(cfg: Config):
        return lambda x, w, residual: quantized_matmul(x, w, residual=residual, config=cfg)

    return SearchSpace(
        kernel="w4a16",
        problem=problem,
        knobs=tuple(knobs),
        violations=violations,
        to_config=lambda p: Config(**{**Config().params(), **p}),
        fn=fn,
        make_inputs=make_inputs,
        default=heuristic_config(m, n, k, bits, group, residual=True).params(),
        interpreted=platform.interpret_default(),
    )
