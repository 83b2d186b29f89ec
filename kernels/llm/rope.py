"""Rotary position embedding (rotate-half layout, as in Hugging Face LLaMA), angles computed in-kernel.

out[..., :d/2] = x1 cos - x2 sin,  out[..., d/2:] = x2 cos + x1 sin,  angle_i = pos / scaling *
theta^(-2i/d)  (Su et al., RoFormer, eq. 34). No cos/sin tables are read from memory.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import platform
from kernels.llm import common
from kernels.space import Knob, SearchSpace


@dataclasses.dataclass(frozen=True)
class Config:
    block_rows: int = 16
    num_warps: int = 4
    num_stages: int = 1

    def params(self) -> dict:
        return common.params_of(self)


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    return jnp.exp(jnp.arange(0, head_dim // 2, dtype=jnp.float32) * (-2.0 * math.log(theta) / head_dim))


def reference(x: jax.Array, positions: jax.Array, *, theta: float, scaling: float = 1.0) -> jax.Array:
    """x (B, T, H, D), positions (B, T) int -> x rotated; f32 math, x's dtype out."""
    d = x.shape[-1]
    angle = (positions.astype(jnp.float32) / scaling)[..., None] * inverse_frequencies(d, theta)  # (B, T, d/2)
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rope_kernel(x_ref, pos_ref, o_ref, *, half: int, theta: float, scaling: float):
    pos = pos_ref[...].astype(jnp.float32) / scaling  # (rows,)
    i = jax.lax.broadcasted_iota(jnp.int32, (1, half), 1).astype(jnp.float32)
    angle = pos[:, None] * jnp.exp(i * (-math.log(theta) / half))  # theta^(-2i/d), d = 2 * half
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1 = x_ref[:, pl.ds(0, half)].astype(jnp.float32)
    x2 = x_ref[:, pl.ds(half, half)].astype(jnp.float32)
    o_ref[:, pl.ds(0, half)] = (x1 * cos - x2 * sin).astype(o_ref.dtype)
    o_ref[:, pl.ds(half, half)] = (x2 * cos + x1 * sin).astype(o_ref.dtype)


def heuristic_config(rows: int) -> Config:
    return Config(block_rows=common.largest_pow2_divisor(rows, 64))


@functools.partial(jax.jit, static_argnames=("theta", "scaling", "config", "interpret"))
def _rope(x2, pos2, *, theta: float, scaling: float, config: Config, interpret: bool):
    rows, d = x2.shape
    spec = pl.BlockSpec((config.block_rows, d), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_rope_kernel, half=d // 2, theta=theta, scaling=scaling),
        grid=(rows // config.block_rows,),
        in_specs=[spec, pl.BlockSpec((config.block_rows,), lambda i: (i,))],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        compiler_params=platform.compiler_params(config.num_warps, config.num_stages, interpret),
        interpret=interpret,
    )(x2, pos2)


def rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling: float = 1.0, config: Config | None = None,
         interpret: bool | None = None) -> jax.Array:
    """Pallas RoPE; same contract as ``reference``. Every (token, head) row is one kernel row."""
    b, t, h, d = x.shape
    if positions.shape != (b, t):
        raise ValueError(f"positions has shape {positions.shape}, expected (batch, seq) = {(b, t)}")
    if d % 2 or not common.is_pow2(d // 2):
        raise ValueError(f"head_dim={d} must be twice a power of 2 for the Pallas RoPE kernel")
    rows = b * t * h
    if interpret is None:
        interpret = platform.interpret_default()
    cfg = common.resolve_config("rope", problem_key(rows, d, x.dtype), config, Config, lambda: heuristic_config(rows))
    if rows % cfg.block_rows:
        raise ValueError(f"block_rows={cfg.block_rows} must divide batch*seq*heads={rows}")
    pos2 = jnp.broadcast_to(positions[:, :, None], (b, t, h)).reshape(rows).astype(jnp.int32)
    out = _rope(x.reshape(rows, d), pos2, theta=float(theta), scaling=float(scaling), config=cfg, interpret=interpret)
    return out.reshape(x.shape)


def problem_key(rows: int, head_dim: int, dtype) -> dict:
    return {"rows": rows, "head_dim": head_dim, "dtype": jnp.dtype(dtype).name}


DEFAULT_PROBLEMS = [problem_key(32, 128, "bfloat16"), problem_key(32 * 512, 128, "bfloat16")]


def parse_shape(text: str) -> dict:
    """``ROWSxHEAD_DIM`` with rows = tokens * heads, e.g. ``32x128``."""
    try:
        rows, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} is not ROWSxHEAD_DIM, e.g. 32x128") from None
    return problem_key(rows, d, "bfloat16")


def search_space(problem: dict) -> SearchSpace:
    rows, d, dtype = problem["rows"], problem["head_dim"], jnp.dtype(problem["dtype"])
    knobs = [Knob("block_rows", tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if rows % b == 0))]
    if platform.backend() == "gpu":
        knobs += [Knob("num_warps", (1, 2, 4, 8))]

    def runner(cfg: Config):
        x = jax.random.normal(jax.random.key(0), (1, rows, 1, d), dtype)
        pos = jnp.arange(rows, dtype=jnp.int32)[None]
        return functools.partial(rope, x, pos, theta=10000.0, config=cfg)

    return SearchSpace(kernel="rope", problem=problem, knobs=tuple(knobs),
                       violations=lambda p: [] if rows % p["block_rows"] == 0 else ["block_rows must divide rows"],
                       to_config=lambda p: Config(**{**Config().params(), **p}), runner=runner,
                       default=heuristic_config(rows).params())
