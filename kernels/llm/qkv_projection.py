"""The decode step's attention input in one kernel: RMSNorm in the prologue, the fused q/k/v GEMV,
and an epilogue that writes q out and the new keys and values straight into the stacked KV cache.

The caches (L, B, Hkv, S, D) are aliased from input to output and written in place at (layer, b,
head, positions[b]): one row per sequence and head, nothing else of the cache is touched, and no
separate scatter, slice or copy of the cache runs. The GEMV body is ``kernels.llm.w4a16``'s (same
``Config``); an output tile never straddles two heads (``block_n`` divides ``head_dim``), so its
destination is one contiguous run of a q row or of a cache row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.llm import common, w4a16
from kernels.llm.w4a16 import QuantizedWeight
from tuning import platform, tuned

Config = w4a16.Config


def reference(h: jax.Array, norm_weight: jax.Array, wqkv: QuantizedWeight | jax.Array, k_cache: jax.Array,
              v_cache: jax.Array, layer, positions: jax.Array, *, n_heads: int, n_kv_heads: int, eps: float,
              dtype=None):
    """h (B, K) residual stream -> (q (B, Hq*D) in ``dtype``, k_cache, v_cache) with the new k and v
    rows written at [layer, b, :, positions[b]]."""
    dtype = h.dtype if dtype is None else dtype
    b = h.shape[0]
    d = k_cache.shape[-1]
    qkv = w4a16.reference(h, wqkv, norm_weight=norm_weight, eps=eps, dtype=dtype)
    nq, nkv = n_heads * d, n_kv_heads * d
    k = qkv[:, nq:nq + nkv].reshape(b, 1, n_kv_heads, d)
    v = qkv[:, nq + nkv:].reshape(b, 1, n_kv_heads, d)
    return (qkv[:, :nq], common.write_cache_rows(k_cache, layer, k, positions),
            common.write_cache_rows(v_cache, layer, v, positions))


def _qkv_kernel(*refs, bits: int, n_extra: int, block_m: int, block_n: int, block_groups: int, num_steps: int,
                eps: float, dim: int, nq: int, nkv: int, head_dim: int):
    layer_ref, pos_ref, x_ref, nw_ref, w_ref, *rest = refs
    s_ref = rest.pop(0) if n_extra > 0 else None
    m_ref = rest.pop(0) if n_extra > 1 else None
    _, _, q_ref, k_ref, v_ref = rest  # the cache inputs (aliased) are read through the outputs
    acc = w4a16.accumulate(x_ref, w_ref, s_ref, m_ref, nw_ref, bits=bits, block_m=block_m,
                           block_groups=block_groups, num_steps=num_steps, eps=eps, dim=dim)
    col = pl.program_id(1) * block_n
    layer = layer_ref[0]
    for r in range(block_m):  # pl.when runs its body at once: the loop variables are bound as it runs
        row = pl.program_id(0) * block_m + r

        @pl.when(col < nq)
        def _(row=row, value=acc[r]):
            q_ref[row, pl.ds(col, block_n)] = value.astype(q_ref.dtype)

        for cache_ref, base in ((k_ref, nq), (v_ref, nq + nkv)):
            @pl.when((col >= base) & (col < base + nkv))
            def _(cache_ref=cache_ref, base=base, row=row, value=acc[r]):
                head = (col - base) // head_dim
                offset = col - base - head * head_dim
                cache_ref[layer, row, head, pos_ref[row], pl.ds(offset, block_n)] = value.astype(cache_ref.dtype)


def heuristic_config(m: int, n: int, k: int, bits: int, group: int, head_dim: int,
                     on_gpu: bool | None = None) -> Config:
    """W4A16's GEMV tiles (no split-K: the outputs are written, not added), a tile within one head."""
    import dataclasses

    cfg = w4a16.heuristic_config(m, n, k, bits, group, on_gpu)
    return dataclasses.replace(cfg, block_m=common.largest_pow2_divisor(m, 8),
                               block_n=min(cfg.block_n, common.largest_pow2_divisor(head_dim, cfg.block_n)),
                               split_k=1)


def violations(cfg: Config, m: int, n: int, k: int, group: int, head_dim: int, on_gpu: bool) -> list[str]:
    bad = w4a16.config_violations(cfg, m, n, k, group, on_gpu, residual=False)
    if head_dim % cfg.block_n:
        bad.append(f"block_n={cfg.block_n} must divide head_dim={head_dim} (a tile stays within one head)")
    if m % cfg.block_m:
        bad.append(f"block_m={cfg.block_m} must divide the batch {m} (padded rows have no cache row)")
    if cfg.block_m >= 16:
        bad.append(f"block_m={cfg.block_m}: the decode projection is a GEMV, block_m < 16")
    return bad


@functools.partial(jax.jit, static_argnames=("bits", "group", "config", "interpret", "eps", "dtype", "n_heads",
                                             "n_kv_heads"))
def _qkv(h, norm_weight, arrays, k_cache, v_cache, layer, positions, *, bits: int, group: int, config: Config,
         interpret: bool, eps: float, dtype, n_heads: int, n_kv_heads: int):
    m, k = h.shape
    n = arrays[0].shape[-1]
    d = k_cache.shape[-1]
    cfg = config
    groups = k // group
    whole = pl.BlockSpec()  # the operand as it is in memory, indexed in the kernel
    specs = [whole, whole,
             pl.BlockSpec((cfg.block_m, groups, group), lambda i, j: (i, 0, 0)),
             pl.BlockSpec((groups, group), lambda i, j: (0, 0)),
             pl.BlockSpec((groups, arrays[0].shape[1], cfg.block_n), lambda i, j: (0, 0, j))]
    specs += [pl.BlockSpec((groups, cfg.block_n), lambda i, j: (0, j)) for _ in arrays[1:]]
    operands = [jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), positions.astype(jnp.int32),
                h.reshape(m, groups, group), norm_weight.reshape(groups, group), *arrays]
    first_cache = len(operands)
    weight_bytes = sum(int(a.size) * a.dtype.itemsize for a in arrays)
    kernel = functools.partial(
        _qkv_kernel, bits=bits, n_extra=len(arrays) - 1, block_m=cfg.block_m, block_n=cfg.block_n,
        block_groups=cfg.block_groups, num_steps=groups // cfg.block_groups, eps=eps, dim=k,
        nq=n_heads * d, nkv=n_kv_heads * d, head_dim=d)
    return pl.pallas_call(
        kernel,
        grid=(m // cfg.block_m, n // cfg.block_n),
        in_specs=specs + [whole, whole],
        out_specs=[whole, whole, whole],
        out_shape=[jax.ShapeDtypeStruct((m, n_heads * d), dtype),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={first_cache: 1, first_cache + 1: 2},
        compiler_params=platform.compiler_params(cfg.num_warps, cfg.num_stages, interpret),
        interpret=interpret,
        name="qkv_norm_gemv_cache_write",
        cost_estimate=pl.CostEstimate(flops=2 * m * n * k, transcendentals=0,
                                      bytes_accessed=weight_bytes + (m * k + m * n) * 4),
    )(*operands, k_cache, v_cache)


def qkv_projection(h: jax.Array, norm_weight: jax.Array, wqkv: QuantizedWeight | jax.Array, k_cache: jax.Array,
                   v_cache: jax.Array, layer, positions: jax.Array, *, n_heads: int, n_kv_heads: int, eps: float,
                   dtype=None, config: Config | None = None, interpret: bool | None = None):
    """Pallas RMSNorm -> q/k/v GEMV -> (q, k_cache, v_cache); same contract as ``reference``.
    Donate (or carry in a loop) the caches so that the in-place write is not preceded by a copy."""
    bits, group, arrays, k = w4a16.as_grouped(wqkv)
    m = h.shape[0]
    n = arrays[0].shape[-1]
    d = k_cache.shape[-1]
    if h.ndim != 2 or h.shape[1] != k or norm_weight.shape != (k,):
        raise ValueError(f"expected h (B, {k}) and norm_weight ({k},); got {h.shape}, {norm_weight.shape}")
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape or k_cache.shape[1] != m:
        raise ValueError(f"expected stacked caches (L, {m}, Hkv, S, D); got {k_cache.shape}, {v_cache.shape}")
    if n != (n_heads + 2 * n_kv_heads) * d or k_cache.shape[2] != n_kv_heads or positions.shape != (m,):
        raise ValueError(f"wqkv has N={n}, expected ({n_heads} + 2 * {n_kv_heads}) * head_dim {d}; "
                         f"positions {positions.shape} must be ({m},)")
    if interpret is None:
        interpret = platform.interpret_default()
    dtype = jnp.dtype(h.dtype if dtype is None else dtype)
    cfg = tuned.resolve("qkv_projection", w4a16.problem_key(m, n, k, bits, group, dtype), config, config_type=Config,
                        heuristic=lambda: heuristic_config(m, n, k, bits, group, d, on_gpu=not interpret))
    bad = violations(cfg, m, n, k, group, d, on_gpu=not interpret)
    if bad:
        raise ValueError(f"qkv_projection config {cfg} is illegal for B={m}, N={n}, K={k}: {'; '.join(bad)}")
    q, k_cache, v_cache = _qkv(h, norm_weight, arrays, k_cache, v_cache, layer, positions, bits=bits, group=group,
                               config=cfg, interpret=interpret, eps=float(eps), dtype=dtype, n_heads=n_heads,
                               n_kv_heads=n_kv_heads)
    return q, k_cache, v_cache
