"""SwiGLU feed-forward input: silu(x @ W_gate) * (x @ W_up) in one pass over x and both weights.

Both projections accumulate in the same program (the W4A16 body of ``kernels.llm.w4a16``) and
the gate is applied in registers, so the (M, ffn) gate and up activations never reach memory.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.llm import common, w4a16
from kernels.llm.w4a16 import QuantizedWeight
from tuning import platform, tuned
from tuning.space import SearchSpace

Config = w4a16.Config  # same tiles: it is the W4A16 body run twice per tile (split_k must be 1: the
# gate is nonlinear, so it needs the whole K sum in one program)


def reference(x: jax.Array, w_gate: QuantizedWeight | jax.Array, w_up: QuantizedWeight | jax.Array, *,
              norm_weight: jax.Array | None = None, eps: float = 1e-5, dtype=None) -> jax.Array:
    """silu(y @ W_gate) * (y @ W_up) with y = x, or RMS-normalised x * norm_weight (see
    ``w4a16.reference``), in ``dtype`` (default x's)."""
    dtype = x.dtype if dtype is None else dtype
    gate = w4a16.reference(x, w_gate, norm_weight=norm_weight, eps=eps, dtype=dtype).astype(jnp.float32)
    up = w4a16.reference(x, w_up, norm_weight=norm_weight, eps=eps, dtype=dtype).astype(jnp.float32)
    return (jax.nn.silu(gate) * up).astype(dtype)


def xla_swiglu(x: jax.Array, w_gate, w_up) -> jax.Array:
    """``reference`` through ``w4a16.xla_matmul`` (the form XLA runs fast on the CPU)."""
    gate = w4a16.xla_matmul(x, w_gate).astype(jnp.float32)
    up = w4a16.xla_matmul(x, w_up).astype(jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def _swiglu_kernel(*refs, bits: int, n_extra: int, has_norm: bool, block_m: int, block_groups: int,
                   num_steps: int, eps: float, dim: int):
    refs = list(refs)
    x_ref = refs.pop(0)
    nw_ref = refs.pop(0) if has_norm else None
    o_ref = refs.pop()
    per_weight = 1 + n_extra
    accs = []
    for wi in range(2):
        w_ref, *extra = refs[wi * per_weight:(wi + 1) * per_weight]
        s_ref = extra[0] if n_extra > 0 else None
        m_ref = extra[1] if n_extra > 1 else None
        accs.append(w4a16.accumulate(x_ref, w_ref, s_ref, m_ref, nw_ref, bits=bits, block_m=block_m,
                                     block_groups=block_groups, num_steps=num_steps, eps=eps, dim=dim))

    def gate(g, u):
        return (g * jax.nn.sigmoid(g) * u).astype(o_ref.dtype)

    if block_m < 16:
        for r in range(block_m):
            o_ref[r, :] = gate(accs[0][r], accs[1][r])
    else:
        o_ref[...] = gate(accs[0], accs[1])


def heuristic_config(m: int, n: int, k: int, bits: int, group: int, on_gpu: bool | None = None) -> Config:
    """W4A16's tiles without split-K; two weights per step, so half the groups per step."""
    cfg = w4a16.heuristic_config(m, n, k, bits, group, on_gpu)
    groups = k // group
    block_groups = common.largest_pow2_divisor(groups, max(1, cfg.block_groups * cfg.split_k // 2))
    # Two weights' register tiles live at once in the GEMV body: twice the warps keep them in registers.
    warps = 8 if m < 16 and cfg.num_warps == 4 else cfg.num_warps
    return dataclasses.replace(cfg, split_k=1, block_groups=block_groups, num_warps=warps)


@functools.partial(jax.jit, static_argnames=("bits", "group", "config", "interpret", "eps", "dtype"))
def _swiglu(x2, norm_weight, gate_arrays, up_arrays, *, bits: int, group: int, config: Config, interpret: bool,
            eps: float, dtype):
    m, k = x2.shape
    n = gate_arrays[0].shape[-1]
    cfg = config
    m_pad = -m % cfg.block_m
    if m_pad:
        x2 = jnp.pad(x2, ((0, m_pad), (0, 0)))
    groups = k // group
    x3 = x2.reshape(x2.shape[0], groups, group)
    operands = [x3]
    specs = [pl.BlockSpec((cfg.block_m, groups, group), lambda i, j: (i, 0, 0))]
    if norm_weight is not None:
        operands.append(norm_weight.reshape(groups, group))
        specs.append(pl.BlockSpec((groups, group), lambda i, j: (0, 0)))
    w_spec = pl.BlockSpec((groups, gate_arrays[0].shape[1], cfg.block_n), lambda i, j: (0, 0, j))
    extra_specs = [pl.BlockSpec((groups, cfg.block_n), lambda i, j: (0, j)) for _ in gate_arrays[1:]]
    weight_bytes = 2 * sum(int(a.size) * a.dtype.itemsize for a in gate_arrays)
    out = pl.pallas_call(
        functools.partial(_swiglu_kernel, bits=bits, n_extra=len(gate_arrays) - 1, has_norm=norm_weight is not None,
                          block_m=cfg.block_m, block_groups=cfg.block_groups, num_steps=groups // cfg.block_groups,
                          eps=eps, dim=k),
        grid=(x2.shape[0] // cfg.block_m, n // cfg.block_n),
        in_specs=specs + ([w_spec] + extra_specs) * 2,
        out_specs=pl.BlockSpec((cfg.block_m, cfg.block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x2.shape[0], n), dtype),
        compiler_params=platform.compiler_params(cfg.num_warps, cfg.num_stages, interpret),
        interpret=interpret,
        name="swiglu_norm" if norm_weight is not None else "swiglu",
        cost_estimate=pl.CostEstimate(flops=4 * m * n * k, transcendentals=m * n,
                                      bytes_accessed=weight_bytes + (x2.size + m * n) * 4),
    )(*operands, *gate_arrays, *up_arrays)
    return out[:m]


def swiglu(x: jax.Array, w_gate: QuantizedWeight | jax.Array, w_up: QuantizedWeight | jax.Array, *,
           norm_weight: jax.Array | None = None, eps: float = 1e-5, dtype=None, config: Config | None = None,
           interpret: bool | None = None) -> jax.Array:
    """silu(y @ W_gate) * (y @ W_up): x (..., K), weights (K, N) packed or dense, in the same format.
    ``norm_weight``: y is x RMS-normalised (the RMSNorm runs in the kernel's prologue); else y = x."""
    bits, group, gate_arrays, k = w4a16.as_grouped(w_gate)
    bits_u, group_u, up_arrays, k_u = w4a16.as_grouped(w_up)
    if (bits, group, k, gate_arrays[0].shape) != (bits_u, group_u, k_u, up_arrays[0].shape):
        raise ValueError("gate and up weights must share shape and quantization format "
                         f"(got bits {bits}/{bits_u}, group {group}/{group_u}, K {k}/{k_u})")
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weights have K={k}")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight has shape {norm_weight.shape}, expected ({k},)")
    lead = x.shape[:-1]
    m, n = math.prod(lead), gate_arrays[0].shape[-1]
    if k == 0:
        raise ValueError("the weights have K=0 input features; swiglu needs K >= 1")
    if 0 in (m, n):  # no row or no output feature: the empty result
        return jnp.zeros((*lead, n), x.dtype)
    x2 = x.reshape(-1, k)
    if interpret is None:
        interpret = platform.interpret_default()
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    cfg = tuned.resolve("swiglu", w4a16.problem_key(m, n, k, bits, group, dtype), config, config_type=Config,
                        heuristic=lambda: heuristic_config(m, n, k, bits, group, on_gpu=not interpret))
    bad = w4a16.config_violations(cfg, m, n, k, group, on_gpu=not interpret, residual=False)
    if bad:
        raise ValueError(f"swiglu config {cfg} is illegal for M={m}, N={n}, K={k}: {'; '.join(bad)}")
    out = _swiglu(x2, norm_weight, gate_arrays, up_arrays, bits=bits, group=group, config=cfg, interpret=interpret,
                  eps=float(eps), dtype=dtype)
    return out.reshape(*lead, n)


DEFAULT_PROBLEMS = [w4a16.problem_key(1, 11008, 4096, 4, 32, "bfloat16")]
parse_shape = w4a16.parse_shape


def search_space(problem: dict) -> SearchSpace:
    base = w4a16.search_space(problem)
    m, n, k, bits, group = problem["m"], problem["n"], problem["k"], problem["bits"], problem["group"]
    dtype = jnp.dtype(problem["dtype"])

    def make_inputs(seed):
        kx, kg, ku = jax.random.split(jax.random.key(seed), 3)
        x = jax.random.normal(kx, (m, k), dtype)
        wg = w4a16.quantize(jax.random.normal(kg, (k, n)) * 0.02, bits=bits, group=group)
        wu = w4a16.quantize(jax.random.normal(ku, (k, n)) * 0.02, bits=bits, group=group)
        return x, wg, wu

    knobs = tuple(k for k in base.knobs if k.name != "split_k")
    return SearchSpace(kernel="swiglu", problem=problem, knobs=knobs, violations=base.violations,
                       to_config=base.to_config, fn=lambda cfg: functools.partial(swiglu, config=cfg),
                       make_inputs=make_inputs,
                       default=heuristic_config(m, n, k, bits, group).params(), interpreted=base.interpreted)

