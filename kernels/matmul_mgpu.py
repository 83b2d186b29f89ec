"""Mosaic GPU body of ``kernels.matmul`` for Hopper (H100/H200): TMA + wgmma.

Same ``Config`` as the portable body, read differently:
- the tiles are walked in ``config.order`` exactly as the portable kernel does
  (``kernels.matmul.tile_coordinates``);
- ``warpgroups=1``: each CUDA block is one warpgroup computing a ``block_m x block_n`` tile; the
  K loop is a software pipeline (``plgpu.emit_pipeline``) of ``num_stages`` shared-memory slots
  filled by TMA; each step issues an asynchronous ``wgmma`` into a register accumulator and keeps
  one in flight (``delay_release=1``);
- ``warpgroups=2``: warp specialisation. Each block computes ``2*block_m x block_n``: a producer
  warpgroup only issues TMA loads into ``num_stages`` slots, two consumer warpgroups each run
  ``wgmma`` on their ``block_m`` rows of the shared A tile against the same B tile, so every B
  byte brought on chip feeds twice the math;
- ``activation`` is applied to the accumulator registers; the tile goes back through shared memory
  and one TMA store.

Constraints (checked with clear errors): float16/bfloat16 operands, ``block_m`` a multiple of
64 (wgmma's M per warpgroup), ``block_k * itemsize`` a multiple of 32 bytes (swizzle), no
``bias`` or ``epilogue`` (use ``backend="portable"`` for those). Only runs compiled on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def violations(cfg, dtype) -> list[str]:
    problems = []
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        problems.append(f"backend='mosaic' takes bfloat16/float16 operands, not {jnp.dtype(dtype).name}")
    if cfg.block_m % 64:
        problems.append(f"backend='mosaic' needs block_m a multiple of 64 (wgmma M), got {cfg.block_m}")
    if cfg.block_n > 256 or cfg.block_n % 16:
        problems.append(f"backend='mosaic' needs block_n a multiple of 16 and <= 256, got {cfg.block_n}")
    if (cfg.block_k * jnp.dtype(dtype).itemsize) % 32:
        problems.append(f"backend='mosaic' needs block_k x itemsize a multiple of 32 bytes, got block_k={cfg.block_k}")
    if cfg.warpgroups not in (1, 2):
        problems.append(f"backend='mosaic' takes warpgroups 1 or 2, got {cfg.warpgroups}")
    itemsize = jnp.dtype(dtype).itemsize
    stage_bytes = (cfg.warpgroups * cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * itemsize
    smem = max(cfg.num_stages, 2) * stage_bytes + cfg.warpgroups * cfg.block_m * cfg.block_n * itemsize
    if smem > 227 * 1024:
        problems.append(f"backend='mosaic' tiles need {smem} B of shared memory ({max(cfg.num_stages, 2)} "
                        "stages + the output tile), over 232448 B; lower num_stages, block_k or block_n")
    if cfg.block_m * cfg.block_n > 128 * 256:
        problems.append("backend='mosaic' keeps the accumulator in one warpgroup's registers: "
                        f"block_m x block_n must be <= 128x256, got {cfg.block_m}x{cfg.block_n}")
    return problems


def _transforms(plgpu, minor_elems: int, dtype):
    swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("config", "activation", "out_dtype"))
def _matmul(a, b, *, config, activation, out_dtype):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from kernels.matmul import apply_activation, tile_coordinates

    cfg = config
    m, k = a.shape
    n = b.shape[1]
    mp, np_, kp = _round_up(m, cfg.block_m * cfg.warpgroups), _round_up(n, cfg.block_n), _round_up(k, cfg.block_k)
    a = jnp.pad(a, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else a
    b = jnp.pad(b, ((0, kp - k), (0, np_ - n))) if (kp, np_) != (k, n) else b
    num_m, num_n, num_k = mp // cfg.block_m, np_ // cfg.block_n, kp // cfg.block_k
    in_transforms = _transforms(plgpu, cfg.block_k, a.dtype)
    out_transforms = _transforms(plgpu, cfg.block_n, out_dtype)

    def body(a_gmem, b_gmem, o_gmem, o_smem):
        pid = lax.axis_index("tiles")
        i, j = tile_coordinates(pid, num_m=num_m, num_n=num_n, order=cfg.order, group_m=cfg.group_m)
        rows = pl.ds(pl.multiple_of(i * cfg.block_m, cfg.block_m), cfg.block_m)
        cols = pl.ds(pl.multiple_of(j * cfg.block_n, cfg.block_n), cfg.block_n)

        def accumulate(acc_ref):
            def step(_, a_smem, b_smem):
                plgpu.wgmma(acc_ref, a_smem, b_smem)
                plgpu.wgmma_wait(1)  # keep one wgmma in flight; its slot is released a step late

            plgpu.emit_pipeline(
                step,
                grid=(num_k,),
                in_specs=[
                    plgpu.BlockSpec((cfg.block_m, cfg.block_k), lambda kk: (0, kk),
                                    transforms=in_transforms, delay_release=1),
                    plgpu.BlockSpec((cfg.block_k, cfg.block_n), lambda kk: (kk, 0),
                                    transforms=in_transforms, delay_release=1),
                ],
                max_concurrent_steps=max(2, cfg.num_stages),
            )(a_gmem.at[rows, :], b_gmem.at[:, cols])
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((cfg.block_m, cfg.block_n), jnp.float32))
        o_smem[...] = apply_activation(acc, activation).astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows, cols])
        plgpu.wait_smem_to_gmem(0)

    if cfg.warpgroups == 1:
        run = plgpu.kernel(
            body,
            out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
            grid=(num_m * num_n,),
            grid_names=("tiles",),
            scratch_types=[plgpu.SMEM((cfg.block_m, cfg.block_n), out_dtype, transforms=out_transforms)],
        )
    else:
        run = _warp_specialized(plgpu, cfg, mp, np_, num_k, activation, out_dtype, in_transforms, out_transforms)
    c = run(a, b)
    return c[:m, :n] if (mp, np_) != (m, n) else c


def _warp_specialized(plgpu, cfg, mp, np_, num_k, activation, out_dtype, in_transforms, out_transforms):
    """Producer warpgroup (TMA) + two consumer warpgroups (wgmma), one ``2*block_m x block_n`` tile."""
    from kernels.matmul import apply_activation, tile_coordinates

    cta_m = 2 * cfg.block_m
    num_m, num_n = mp // cta_m, np_ // cfg.block_n

    def body(a_gmem, b_gmem, o_gmem, o_smem):
        pid = lax.axis_index("tiles")
        i, j = tile_coordinates(pid, num_m=num_m, num_n=num_n, order=cfg.order, group_m=cfg.group_m)
        rows = pl.ds(pl.multiple_of(i * cta_m, cta_m), cta_m)
        cols = pl.ds(pl.multiple_of(j * cfg.block_n, cfg.block_n), cfg.block_n)
        wg = lax.axis_index("wg")
        wg_rows = pl.ds(pl.multiple_of(wg * cfg.block_m, cfg.block_m), cfg.block_m)

        def step(_, a_smem, b_smem, acc_ref):
            plgpu.wgmma(acc_ref, a_smem.at[wg_rows], b_smem)
            plgpu.wgmma_wait(0)
            return acc_ref

        def consumer(run_pipeline):
            def with_accumulator(acc_ref):
                run_pipeline(acc_ref)
                o_smem[wg] = apply_activation(acc_ref[...], activation).astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[rows, cols].at[wg_rows])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            pl.run_scoped(with_accumulator, plgpu.ACC((cfg.block_m, cfg.block_n), jnp.float32))

        plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(num_k,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, cfg.block_k), lambda kk: (0, kk), transforms=in_transforms),
                plgpu.BlockSpec((cfg.block_k, cfg.block_n), lambda kk: (kk, 0), transforms=in_transforms),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=max(2, cfg.num_stages),
            compute_context=consumer,
        )(a_gmem.at[rows, :], b_gmem.at[:, cols])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(num_m * num_n,),
        grid_names=("tiles",),
        num_threads=3,
        thread_name="wg",
        scratch_types=[plgpu.SMEM((2, cfg.block_m, cfg.block_n), out_dtype, transforms=out_transforms)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )


def matmul(a, b, *, bias, activation, out_dtype, epilogue, epilogue_operands, config):
    if bias is not None or epilogue is not None or epilogue_operands:
        raise ValueError("backend='mosaic' fuses only an activation; for bias or an epilogue use "
                         "Config(backend='portable')")
    problems = violations(config, a.dtype)
    if problems:
        raise ValueError("; ".join(problems))
    return _matmul(a, b, config=config, activation=activation, out_dtype=jnp.dtype(out_dtype))
