"""Hopper (H100/H200) decode GEMV in Mosaic GPU: y = x @ W (+ residual), x at most 8 rows, W 4-bit
(``QuantizedWeight`` group halves, scales and mins) or bf16.

STATUS: written without a GPU and NEVER RUN. What is tested is what the CPU can check: the offline
re-layout (``relayout``) and the arithmetic of the kernel, replayed step by step in jnp by
``reference_from_layout`` and required to be bit-exact against plain dequantization
(tests/kernels/llm/test_gemv_mgpu.py). The kernel itself has ``@pytest.mark.gpu`` tests that have
not run; until they pass on an H100/H200 the model uses the portable body of ``kernels.llm.w4a16``.

Design (the reference points are Marlin, Frantar et al. 2024, and JAX's
``hopper_mixed_type_matmul_mgpu.py`` for the Pallas Mosaic GPU idioms; no code is taken from either):
- Swap A and B: out^T (N, 8) = W^T (N, K) @ x^T (K, 8). The weight rows are wgmma's M (64 per
  warpgroup) and the batch, padded to 8, is wgmma's N, so batch 1 wastes 8x, not 64x, of the
  tensor-core work: about 0.1 ms of tensor-core time per LLaMA-2-7B token, far below its memory time.
- Offline re-layout: W^T N-major, (N, K/2) bytes for 4-bit (a byte still holds elements i and
  g/2 + i of its group), so one group of a 64-row tile is one TMA box of (64, g/2) bytes.
- Persistent grid of one CTA per SM; the work is (N/64 tiles) x (``split`` K chunks), split chosen
  to minimise the busiest SM's steps (balanced split-K, ``balanced_split``); CTA c takes units
  c, c + #SMs, ... Each unit's partial (64, 8) result goes to its own slot of a (split, N, 8)
  f32 output; the split partials and the residual are added by one small XLA fusion after.
- Per group, a multi-stage TMA pipeline (``plgpu.emit_pipeline``, ``stages`` deep: ``stages`` x
  (64 x g/2 + scales + activations) bytes in flight per SM) brings the weight tile, the group's
  scales and mins, and the activation halves into shared memory.
- 4-bit dequantization by bit pattern in 16-bit lanes: 0x4300 | q is the bf16 128 + q exactly (128
  has a spacing of 1 in bf16), so (0x4300 | q) - 128 is q: an AND/shift and an OR per element
  and one subtraction, no int->float conversion; two lanes share a 32-bit register, so each
  logical op acts on a bf16 pair (the bf16 form of Marlin's fp16 trick with 1024).
- Scales and mins on partial sums: per group, two wgmmas (low nibbles with x's first half of the
  group, high nibbles with the second) into a fresh accumulator give the exact integer-weighted sum
  P = x . q; the register total += P * s + m * sum(x_group) (x . (q s + m) = s (x . q) + m sum x).
  The total lives in registers across the K loop and is written once per unit.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.llm import common
from kernels.llm.w4a16 import QuantizedWeight
from tuning import platform

TILE_N = 64  # wgmma M: the weight rows of one warpgroup's tile
BATCH = 8  # wgmma N: the activation rows, padded
_BF16_128_BITS = 0x4300  # bf16 bit pattern of 128.0: spacing 1 in [128, 256)


@dataclasses.dataclass(frozen=True)
class Config:
    """stages: pipeline depth (groups in flight per SM); split: K chunks per 64-row tile (0: chosen
    so the units fill whole waves of the SMs); sms: the persistent grid (0: the device's SM count)."""

    stages: int = 4
    split: int = 0
    sms: int = 0

    def params(self) -> dict:
        return common.params_of(self)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed_t", "scales", "mins"],
                   meta_fields=["bits", "group"])
@dataclasses.dataclass(frozen=True)
class MosaicWeight:
    """A (K, N) weight laid out for this kernel: ``packed_t`` (N, K/2) uint8 (4-bit) or (N, K) bf16,
    N-major; ``scales``, ``mins`` (K/g, N) (None for bf16)."""

    packed_t: jax.Array
    scales: jax.Array | None
    mins: jax.Array | None
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        n, kb = self.packed_t.shape
        return (kb * 2 if self.bits == 4 else kb, n)


def relayout(w: QuantizedWeight | jax.Array) -> MosaicWeight:
    """The offline re-layout: a (K, N) ``QuantizedWeight`` (4-bit, with mins) or dense weight -> N-major.

    Byte j of row n of ``packed_t`` is byte (j mod g/2) of group j // (g/2) of column n: it holds
    elements i = j mod g/2 (low nibble) and g/2 + i (high nibble) of the group, as the group-halves
    layout does; only the axis order changes (one (64, g/2) box per group and tile for TMA)."""
    if isinstance(w, QuantizedWeight):
        if w.bits != 4 or w.mins is None or w.packed.ndim != 3:
            raise ValueError(f"the Mosaic GEMV takes one 4-bit weight with mins (Q4_1/Q4_0 form); got bits={w.bits}, "
                             f"mins={'yes' if w.mins is not None else 'no'}, shape {w.shape}")
        groups, half, n = w.packed.shape
        packed_t = jnp.transpose(w.packed, (2, 0, 1)).reshape(n, groups * half)
        return MosaicWeight(packed_t, w.scales, w.mins, 4, w.group)
    if w.ndim != 2:
        raise ValueError(f"expected a (K, N) weight, got shape {w.shape}")
    return MosaicWeight(jnp.asarray(w, jnp.bfloat16).T, None, None, 16, 0)


def dequant_bf16_pairs(byte_tile: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 bytes -> (low nibbles, high nibbles) as exact bf16 integers 0..15, by bit pattern in 16-bit
    lanes: ((u16 & 0xF) | 0x4300) is 128 + q as a bf16; minus 128 is q. The same code runs in the
    kernel (on registers) and in ``reference_from_layout`` (in jnp)."""
    u = byte_tile.astype(jnp.uint16)
    lo = jax.lax.bitcast_convert_type((u & 0xF) | _BF16_128_BITS, jnp.bfloat16)
    hi = jax.lax.bitcast_convert_type((u >> 4) | _BF16_128_BITS, jnp.bfloat16)
    return lo - jnp.bfloat16(128), hi - jnp.bfloat16(128)


def dequantize_layout(w: MosaicWeight) -> jax.Array:
    """The dense (K, N) float32 weight a ``MosaicWeight`` stands for, through ``dequant_bf16_pairs``
    (the plain dequantization of the re-laid-out bytes: q * scale + min)."""
    if w.bits == 16:
        return w.packed_t.T.astype(jnp.float32)
    n = w.packed_t.shape[0]
    half = w.group // 2
    lo, hi = dequant_bf16_pairs(w.packed_t)
    q = jnp.concatenate([lo.reshape(n, -1, half), hi.reshape(n, -1, half)], axis=2).astype(jnp.float32)  # (N, G, g)
    deq = q * w.scales.T.astype(jnp.float32)[:, :, None] + w.mins.T.astype(jnp.float32)[:, :, None]
    return deq.reshape(n, -1).T


def _activation_halves(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (M, K) -> x^T halves (G * g/2, 8) bf16 (first and second half of each group, batch padded to
    8) and the per-group sums (G, 8) f32 of the bf16 activations (for the mins)."""
    m, k = x.shape
    xb = jnp.pad(x.astype(jnp.bfloat16), ((0, BATCH - m), (0, 0)))
    xg = xb.T.reshape(k // group, group, BATCH)
    half = group // 2
    x_lo = xg[:, :half].reshape(-1, BATCH)
    x_hi = xg[:, half:].reshape(-1, BATCH)
    return x_lo, x_hi, jnp.sum(xg.astype(jnp.float32), axis=1)


def reference_from_layout(x: jax.Array, w: MosaicWeight, residual: jax.Array | None = None) -> jax.Array:
    """The kernel's arithmetic in jnp, group by group as the kernel runs it: exact integer partial sums
    of bf16 activations (f32 accumulation, as wgmma), then * scale + min * sum(x), summed over groups
    in f32; + residual. Returns (M, N) f32."""
    m, k = x.shape
    n = w.packed_t.shape[0]
    if w.bits == 16:
        out = jnp.dot(x.astype(jnp.bfloat16), w.packed_t.T, preferred_element_type=jnp.float32)
    else:
        g, half = w.group, w.group // 2
        x_lo, x_hi, x_sum = _activation_halves(x, g)
        lo, hi = dequant_bf16_pairs(w.packed_t)  # (N, K/2) each: exact integers
        lo = lo.reshape(n, k // g, half).transpose(1, 0, 2)  # (G, N, g/2)
        hi = hi.reshape(n, k // g, half).transpose(1, 0, 2)
        x_lo, x_hi = x_lo.reshape(k // g, half, BATCH), x_hi.reshape(k // g, half, BATCH)
        partial = (jnp.einsum("gnh,ghb->gnb", lo, x_lo, preferred_element_type=jnp.float32)
                   + jnp.einsum("gnh,ghb->gnb", hi, x_hi, preferred_element_type=jnp.float32))  # (G, N, 8)
        scaled = (partial * w.scales.astype(jnp.float32)[:, :, None]
                  + w.mins.astype(jnp.float32)[:, :, None] * x_sum[:, None, :])
        out = jnp.sum(scaled, axis=0).T[:m]  # (M, N)
    if residual is not None:
        out = out + residual.astype(jnp.float32)
    return out[:m, :n]


PIPELINE_FILL_STEPS = 2  # per unit: filling the pipeline and the epilogue cost about two K steps


def balanced_split(n_tiles: int, k_steps: int, sms: int) -> int:
    """K chunks per tile minimising the busiest SM's work: ceil(units / sms) waves, each of
    k_steps / split steps plus ``PIPELINE_FILL_STEPS``; ties go to fewer chunks (fewer partials)."""
    def cost(split: int) -> int:
        return -(-n_tiles * split // sms) * (k_steps // split + PIPELINE_FILL_STEPS)

    return min((s for s in range(1, k_steps + 1) if k_steps % s == 0), key=lambda s: (cost(s), s))


def violations(cfg: Config, m: int, n: int, k: int, bits: int, group: int) -> list[str]:
    out = []
    if m > BATCH:
        out.append(f"the Mosaic GEMV takes at most {BATCH} rows, got M={m}")
    if n % TILE_N:
        out.append(f"N={n} must be a multiple of {TILE_N}")
    if bits == 4 and group not in (64, 128):
        out.append(f"4-bit groups of 64 or 128 (a TMA box of g/2 >= 32 bytes), got {group}")
    if bits not in (4, 16):
        out.append(f"bits={bits}: the Mosaic GEMV takes 4-bit or bf16 weights")
    if bits == 16 and k % 64:
        out.append(f"K={k} must be a multiple of 64")
    if cfg.stages < 2:
        out.append(f"stages={cfg.stages}: the pipeline needs at least 2")
    return out


def supported_on_this_device() -> bool:
    """Hopper (sm_90) with the Mosaic GPU bindings installed."""
    if not platform.is_hopper():
        return False
    try:
        from jax.experimental.pallas import mosaic_gpu  # noqa: F401
    except ImportError:
        return False
    return True


@functools.partial(jax.jit, static_argnames=("config",))
def gemv(x: jax.Array, w: MosaicWeight, residual: jax.Array | None = None, *, config: Config = Config()) -> jax.Array:
    """x (M <= 8, K) @ W (+ residual) on Hopper -> (M, N) float32. See the module docstring (never run)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = x.shape
    n = w.packed_t.shape[0]
    bad = violations(config, m, n, k, w.bits, w.group or 64)
    if bad:
        raise ValueError(f"gemv_mgpu: {'; '.join(bad)}")
    sms = config.sms or int(platform.gpu_properties().get("sm_count") or 132)
    group = w.group if w.bits == 4 else 64  # bf16: one "group" of 64 elements per pipeline step
    half = group // 2 if w.bits == 4 else group
    k_steps = k // group
    n_tiles = n // TILE_N
    split = config.split or balanced_split(n_tiles, k_steps, sms)
    steps = k_steps // split
    units = n_tiles * split
    if w.bits == 4:
        x_lo, x_hi, x_sum = _activation_halves(x, group)
    else:
        xb = jnp.pad(x.astype(jnp.bfloat16), ((0, BATCH - m), (0, 0)))
        x_lo = xb.T  # (K, 8)

    def transforms(minor_elems: int, dtype):
        bits = jnp.dtype(dtype).itemsize * 8
        swizzle = plgpu.find_swizzle(minor_elems * bits)
        return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))

    w_spec = plgpu.BlockSpec((TILE_N, half), lambda s: (0, s), transforms=transforms(half, w.packed_t.dtype))
    x_spec = plgpu.BlockSpec((half, BATCH), lambda s: (s, 0), transforms=transforms(BATCH, jnp.bfloat16))
    row_spec = plgpu.BlockSpec((1, TILE_N), lambda s: (s, 0))
    sum_spec = plgpu.BlockSpec((1, BATCH), lambda s: (s, 0))

    def kernel(*refs):
        if w.bits == 4:
            xlo_gmem, xhi_gmem, xsum_gmem, w_gmem, s_gmem, m_gmem, out_gmem = refs
        else:
            xlo_gmem, w_gmem, out_gmem = refs

        @plgpu.nd_loop((units,), collective_axes="sm")
        def _unit(info):
            (u,) = info.index
            tile, chunk = u // split, u % split
            k0 = chunk * steps
            rows = pl.ds(tile * TILE_N, TILE_N)

            def step4(_, w_smem, xlo_smem, xhi_smem, s_smem, m_smem, xs_smem, total):
                lo, hi = dequant_bf16_pairs(w_smem[...])  # (64, g/2) bf16 each, exact integers

                def partial_sum(acc_ref):
                    plgpu.wgmma(acc_ref, lo, xlo_smem)
                    plgpu.wgmma(acc_ref, hi, xhi_smem)
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]

                partial = pl.run_scoped(partial_sum, plgpu.ACC((TILE_N, BATCH), jnp.float32))
                scale = jax.lax.broadcast_in_dim(s_smem[0, :].astype(jnp.float32), (TILE_N, BATCH), (0,))
                minimum = jax.lax.broadcast_in_dim(m_smem[0, :].astype(jnp.float32), (TILE_N, BATCH), (0,))
                xsum = jax.lax.broadcast_in_dim(xs_smem[0, :], (TILE_N, BATCH), (1,))
                return total + partial * scale + minimum * xsum

            def step16(_, w_smem, x_smem, total):
                def partial_sum(acc_ref):
                    plgpu.wgmma(acc_ref, w_smem, x_smem)
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]

                return total + pl.run_scoped(partial_sum, plgpu.ACC((TILE_N, BATCH), jnp.float32))

            zero = plgpu.layout_cast(jnp.zeros((TILE_N, BATCH), jnp.float32), plgpu.Layout.WGMMA)
            if w.bits == 4:
                pipeline = plgpu.emit_pipeline(
                    step4, grid=(steps,), max_concurrent_steps=config.stages, init_carry=zero,
                    in_specs=[w_spec, x_spec, x_spec, row_spec, row_spec, sum_spec])
                total = pipeline(w_gmem.at[rows, pl.ds(k0 * half, steps * half)],
                                 xlo_gmem.at[pl.ds(k0 * half, steps * half)],
                                 xhi_gmem.at[pl.ds(k0 * half, steps * half)],
                                 s_gmem.at[pl.ds(k0, steps), rows], m_gmem.at[pl.ds(k0, steps), rows],
                                 xsum_gmem.at[pl.ds(k0, steps)])
            else:
                pipeline = plgpu.emit_pipeline(step16, grid=(steps,), max_concurrent_steps=config.stages,
                                               init_carry=zero, in_specs=[w_spec, x_spec])
                total = pipeline(w_gmem.at[rows, pl.ds(k0 * group, steps * group)],
                                 xlo_gmem.at[pl.ds(k0 * group, steps * group)])
            out_gmem[chunk, pl.ds(tile * TILE_N, TILE_N), :] = total  # each unit its own slot: no atomics

    operands = (x_lo, x_hi, x_sum, w.packed_t, w.scales, w.mins) if w.bits == 4 else (x_lo, w.packed_t)
    partials = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((split, n, BATCH), jnp.float32),
        grid=(min(sms, units),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(*operands)
    out = jnp.sum(partials, axis=0).T[:m]  # the split partials, added once
    return out if residual is None else out + residual.astype(jnp.float32)


# LLaMA-2-7B decode GEMVs at batch 1 (fused q/k/v, o, the FFN, down) for the GPU check's sweep.
SWEEP_SHAPES = ((12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008))


def sweep_configs() -> list[Config]:
    return [Config(stages=s, split=0) for s in (2, 4, 6)]
