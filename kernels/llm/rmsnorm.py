"""RMSNorm fused with the residual add: h = x + residual; y = h / rms(h) * weight, one pass.

Returns both y (the sublayer input) and h (the new residual stream), so the add costs no extra
round trip through memory.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.llm import common
from tuning import platform, tuned
from tuning.space import Knob, SearchSpace, parse_dims


@dataclasses.dataclass(frozen=True)
class Config:
    block_rows: int = 8
    num_warps: int = 4
    num_stages: int = 1

    def params(self) -> dict:
        return common.params_of(self)


def reference(x: jax.Array, weight: jax.Array, *, eps: float, residual: jax.Array | None = None):
    """(y, h): h = x + residual (or x), y = h * rsqrt(mean(h^2) + eps) * weight; f32 inside."""
    h = x.astype(jnp.float32) if residual is None else x.astype(jnp.float32) + residual.astype(jnp.float32)
    y = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps) * weight.astype(jnp.float32)
    return y.astype(x.dtype), h.astype(x.dtype)


def _rmsnorm_kernel(*refs, eps: float, dim: int, has_residual: bool):
    if has_residual:
        x_ref, r_ref, w_ref, y_ref, h_ref = refs
        h = x_ref[...].astype(jnp.float32) + r_ref[...].astype(jnp.float32)
    else:
        x_ref, w_ref, y_ref, h_ref = refs
        h = x_ref[...].astype(jnp.float32)
    # Padding columns are zero, so the sum over the padded row equals the sum over the true row.
    mean_sq = jnp.sum(h * h, axis=1) / dim
    y = h * jax.lax.rsqrt(mean_sq + eps)[:, None] * w_ref[...].astype(jnp.float32)[None, :]
    y_ref[...] = y.astype(y_ref.dtype)
    h_ref[...] = h.astype(h_ref.dtype)


def heuristic_config(rows: int, dim: int) -> Config:
    return Config(block_rows=common.largest_pow2_divisor(rows, 8), num_warps=4 if dim <= 4096 else 8)


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def _rmsnorm(x2, w, r2, *, eps: float, config: Config, interpret: bool):
    rows, dim = x2.shape
    padded = pl.next_power_of_2(dim)  # Triton blocks are powers of 2: pad the row, divide by true dim
    pad = ((0, 0), (0, padded - dim))
    operands = [jnp.pad(x2, pad)] + ([] if r2 is None else [jnp.pad(r2, pad)]) + [jnp.pad(w, (0, padded - dim))]
    row_spec = pl.BlockSpec((config.block_rows, padded), lambda i: (i, 0))
    in_specs = [row_spec] * (1 if r2 is None else 2) + [pl.BlockSpec((padded,), lambda i: (0,))]
    y, h = pl.pallas_call(
        functools.partial(_rmsnorm_kernel, eps=eps, dim=dim, has_residual=r2 is not None),
        grid=(rows // config.block_rows,),
        in_specs=in_specs,
        out_specs=[row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((rows, padded), x2.dtype)] * 2,
        compiler_params=platform.compiler_params(config.num_warps, config.num_stages, interpret),
        interpret=interpret,
        name="rmsnorm",
    )(*operands)
    return y[:, :dim], h[:, :dim]


def rmsnorm(x: jax.Array, weight: jax.Array, *, eps: float, residual: jax.Array | None = None,
            config: Config | None = None, interpret: bool | None = None):
    """Pallas RMSNorm over the last axis with the residual add fused; same contract as ``reference``."""
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight has shape {weight.shape}, expected ({dim},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {residual.shape} differs from x shape {x.shape}")
    if dim == 0:
        raise ValueError(f"x {x.shape} has an empty last axis (dim=0); RMSNorm normalizes over at least one feature")
    if x.size == 0:  # no row to normalize: the empty result
        return reference(x, weight, eps=eps, residual=residual)
    x2 = x.reshape(-1, dim)
    rows = x2.shape[0]
    if interpret is None:
        interpret = platform.interpret_default()
    cfg = tuned.resolve("rmsnorm", problem_key(rows, dim, x.dtype), config, config_type=Config,
                        heuristic=lambda: heuristic_config(rows, dim))
    if rows % cfg.block_rows or not common.is_pow2(cfg.block_rows):
        raise ValueError(f"block_rows={cfg.block_rows} must be a power of 2 dividing rows={rows}")
    y, h = _rmsnorm(x2, weight, None if residual is None else residual.reshape(-1, dim), eps=float(eps),
                    config=cfg, interpret=interpret)
    return y.reshape(x.shape), h.reshape(x.shape)


def problem_key(rows: int, dim: int, dtype) -> dict:
    return {"rows": rows, "dim": dim, "dtype": jnp.dtype(dtype).name}


DEFAULT_PROBLEMS = [problem_key(1, 4096, "bfloat16"), problem_key(512, 4096, "bfloat16")]


def parse_shape(text: str) -> dict:
    """``ROWSxDIM``, e.g. ``1x4096``."""
    return problem_key(*parse_dims(text, "ROWSxDIM", "1x4096"), "bfloat16")


def search_space(problem: dict) -> SearchSpace:
    rows, dim, dtype = problem["rows"], problem["dim"], jnp.dtype(problem["dtype"])
    knobs = [Knob("block_rows", tuple(b for b in (1, 2, 4, 8, 16, 32) if rows % b == 0))]
    if platform.backend() == "gpu":
        knobs += [Knob("num_warps", (1, 2, 4, 8, 16))]

    def make_inputs(seed):
        kx, kr = jax.random.split(jax.random.key(seed))
        return (jax.random.normal(kx, (rows, dim), dtype), jnp.ones((dim,), dtype),
                jax.random.normal(kr, (rows, dim), dtype))

    def fn(cfg: Config):
        return lambda x, weight, residual: rmsnorm(x, weight, eps=1e-5, residual=residual, config=cfg)

    def to_config(p):
        return Config(**{**Config().params(), **p})

    return SearchSpace(kernel="rmsnorm", problem=problem, knobs=tuple(knobs),
                       violations=lambda p: [] if rows % p["block_rows"] == 0 else ["block_rows must divide rows"],
                       to_config=to_config, fn=fn, make_inputs=make_inputs, default=heuristic_config(rows, dim).params(),
                       interpreted=platform.interpret_default())
