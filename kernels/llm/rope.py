"""Rotary position embedding (rotate-half layout, as in Hugging Face LLaMA), angles computed in-kernel.

out[..., :d/2] = x1 cos - x2 sin,  out[..., d/2:] = x2 cos + x1 sin,  angle_i = pos / scaling *
theta^(-2i/d)  (Su et al., RoFormer, eq. 34). No cos/sin tables are read from memory.
Llama-3's frequency-dependent scaling (``Rotary.llama3``) divides the low frequencies by a factor and
blends the middle band smoothly (Meta's Llama 3.1 reference code; transformers' ``rope_type="llama3"``).
``rotate`` and ``load_rotated`` are the in-kernel rotation; the attention kernels call them on the q and k
tiles they load (so a LLaMA forward runs no separate RoPE pass), and the standalone ``rope`` op here too.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.llm import common
from tuning import platform, tuned
from tuning.space import Knob, SearchSpace, parse_dims


@dataclasses.dataclass(frozen=True)
class Rotary:
    """The RoPE of a model, handed to the attention kernels: base ``theta``, linear position ``scaling``
    and, for Llama-3-style scaling, ``llama3 = (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings)``."""

    theta: float = 10000.0
    scaling: float = 1.0
    llama3: tuple[float, float, float, float] | None = None

    def frequencies(self, index: jax.Array, head_dim: int) -> jax.Array:
        """Inverse frequencies theta^(-2i/d), Llama-3-adjusted, at float indices i (any shape; usable
        inside a kernel: elementwise ops only)."""
        inv = jnp.exp(index * (-2.0 * math.log(self.theta) / head_dim))
        if self.llama3 is None:
            return inv
        factor, low, high, original = self.llama3
        wavelen = 2.0 * math.pi / inv
        scaled = jnp.where(wavelen > original / low, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return jnp.where(medium, (1.0 - smooth) * scaled / factor + smooth * scaled, scaled)

    def angles(self, positions: jax.Array, head_dim: int) -> jax.Array:
        """positions (...,) -> angles (..., head_dim/2) in f32."""
        index = jnp.arange(head_dim // 2, dtype=jnp.float32)
        return (positions.astype(jnp.float32) / self.scaling)[..., None] * self.frequencies(index, head_dim)


@dataclasses.dataclass(frozen=True)
class Config:
    block_rows: int = 16
    num_warps: int = 4
    num_stages: int = 1

    def params(self) -> dict:
        return common.params_of(self)


def reference(x: jax.Array, positions: jax.Array, *, theta: float, scaling: float = 1.0,
              llama3: tuple | None = None) -> jax.Array:
    """x (B, T, H, D), positions (B, T) int -> x rotated; f32 math, x's dtype out."""
    d = x.shape[-1]
    angle = Rotary(theta, scaling, llama3).angles(positions, d)  # (B, T, d/2)
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply(x: jax.Array, positions: jax.Array, rotary: Rotary) -> jax.Array:
    """``reference`` with a model's ``Rotary``."""
    return reference(x, positions, theta=rotary.theta, scaling=rotary.scaling, llama3=rotary.llama3)


def rotate(x1: jax.Array, x2: jax.Array, positions: jax.Array, *, theta: float, scaling: float,
           llama3: tuple | None = None):
    """Inside a kernel: the two halves (rows, d/2) of a tile in f32, positions broadcastable to (rows, 1)
    -> the rotated halves. The angles come from an iota, not from a table in memory."""
    half = x1.shape[-1]
    i = jax.lax.broadcasted_iota(jnp.int32, (1, half), 1).astype(jnp.float32)
    angle = (positions.astype(jnp.float32) / scaling) * Rotary(theta, scaling, llama3).frequencies(i, 2 * half)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def load_rotated(ref, rows, positions: jax.Array | None, rotary: Rotary | None, *,
                 prefix: tuple = ()) -> list[jax.Array]:
    """Inside a kernel: ``ref[*prefix, rows, :]`` as the operand list of a split dot product
    (``prefix``: leading indices, e.g. (layer, batch, head) into a stacked KV cache).

    Without ``rotary``: ``[tile]``. With it: the two RoPE-rotated halves ``[x1', x2']`` in the ref's
    dtype (rounded as the reference rounds its rotated tensor), so q.k = q1'.k1' + q2'.k2' needs no
    concatenation in registers.
    """
    d = ref.shape[-1]
    if rotary is None:
        return [ref[(*prefix, rows, pl.ds(0, d))]]
    half = d // 2
    x1 = ref[(*prefix, rows, pl.ds(0, half))].astype(jnp.float32)
    x2 = ref[(*prefix, rows, pl.ds(half, half))].astype(jnp.float32)
    r1, r2 = rotate(x1, x2, positions, theta=rotary.theta, scaling=rotary.scaling, llama3=rotary.llama3)
    return [r1.astype(ref.dtype), r2.astype(ref.dtype)]


def split_dot(a_parts: list[jax.Array], b_parts: list[jax.Array]) -> jax.Array:
    """sum_i a_i @ b_i^T in f32: attention scores from ``load_rotated`` operands."""
    return sum(jnp.dot(a, b.T, preferred_element_type=jnp.float32) for a, b in zip(a_parts, b_parts))


def _rope_kernel(x_ref, pos_ref, o_ref, *, half: int, theta: float, scaling: float):
    x1 = x_ref[:, pl.ds(0, half)].astype(jnp.float32)
    x2 = x_ref[:, pl.ds(half, half)].astype(jnp.float32)
    r1, r2 = rotate(x1, x2, pos_ref[...][:, None], theta=theta, scaling=scaling)
    o_ref[:, pl.ds(0, half)] = r1.astype(o_ref.dtype)
    o_ref[:, pl.ds(half, half)] = r2.astype(o_ref.dtype)


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
        name="rope",
    )(x2, pos2)


def rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling: float = 1.0, config: Config | None = None,
         interpret: bool | None = None) -> jax.Array:
    """Pallas RoPE; same contract as ``reference``. Every (token, head) row is one kernel row."""
    b, t, h, d = x.shape
    if positions.shape != (b, t):
        raise ValueError(f"positions has shape {positions.shape}, expected (batch, seq) = {(b, t)}")
    if d % 2 or not common.is_pow2(d // 2):
        raise ValueError(f"head_dim={d} must be twice a power of 2 for the Pallas RoPE kernel")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions are {positions.dtype}; pass integer token positions (e.g. int32)")
    rows = b * t * h
    if rows == 0:  # an empty batch, sequence or head axis: nothing to rotate
        return x
    if interpret is None:
        interpret = platform.interpret_default()
    cfg = tuned.resolve("rope", problem_key(rows, d, x.dtype), config, config_type=Config,
                        heuristic=lambda: heuristic_config(rows))
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
    rows, d = parse_dims(text, "ROWSxHEAD_DIM", "32x128")
    if d % 2:
        raise ValueError(f"shape {text!r}: HEAD_DIM must be even, e.g. 32x128")
    return problem_key(rows, d, "bfloat16")


def search_space(problem: dict) -> SearchSpace:
    rows, d, dtype = problem["rows"], problem["head_dim"], jnp.dtype(problem["dtype"])
    knobs = [Knob("block_rows", tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if rows % b == 0))]
    if platform.backend() == "gpu":
        knobs += [Knob("num_warps", (1, 2, 4, 8))]

    def make_inputs(seed):
        x = jax.random.normal(jax.random.key(seed), (1, rows, 1, d), dtype)
        return x, jnp.arange(rows, dtype=jnp.int32)[None] + seed


    return SearchSpace(kernel="rope", problem=problem, knobs=tuple(knobs),
                       violations=lambda p: [] if rows % p["block_rows"] == 0 else ["block_rows must divide rows"],
                       to_config=lambda p: Config(**{**Config().params(), **p}),
                       fn=lambda cfg: functools.partial(rope, theta=10000.0, config=cfg), make_inputs=make_inputs,
                       default=heuristic_config(rows).params(), interpreted=platform.interpret_default())
