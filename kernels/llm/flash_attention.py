"""Causal flash attention for prefill, with grouped-query attention (GQA).

Online softmax over key blocks (Dao et al., FlashAttention, Alg. 1); query head h reads key/value
head h // (n_heads / n_kv_heads) straight from the index map, so K/V are never repeated in memory.
With ``rotary``, q and k arrive un-rotated and RoPE is applied to each tile as it is loaded (position =
index in the sequence), so the model runs no separate RoPE pass and caches un-rotated keys.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.llm import common, rope
from tuning import platform, tuned
from tuning.space import Knob, SearchSpace

_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) is 0 without inf - inf = nan


@dataclasses.dataclass(frozen=True)
class Config:
    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def params(self) -> dict:
        return common.params_of(self)


def reference(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              rotary: rope.Rotary | None = None) -> jax.Array:
    """q (B, T, Hq, D), k/v (B, S, Hkv, D) -> (B, T, Hq, D); softmax(q k^T / sqrt(D)) v in f32.
    ``rotary``: q and k are first rotated by RoPE at their sequence index."""
    b, t, hq, d = q.shape
    if rotary is not None:
        q = rope.apply(q, jnp.broadcast_to(jnp.arange(t), (b, t)), rotary)
        s_len = k.shape[1]
        k = rope.apply(k, jnp.broadcast_to(jnp.arange(s_len), (b, s_len)), rotary)
    group = hq // k.shape[2]
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) / math.sqrt(d)
    if causal:
        mask = jnp.arange(t)[:, None] >= jnp.arange(k.shape[1])[None, :]
        s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), vf).astype(q.dtype)


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, *, sm_scale: float, block_q: int, block_k: int, causal: bool,
                  seq_len: int, rotary: rope.Rotary | None):
    qi = pl.program_id(2)
    d = q_ref.shape[-1]
    q_index = qi * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    q = rope.load_rotated(q_ref, slice(None), q_index, rotary)  # [(block_q, D)], or its two rotated halves

    def body(j, carry):
        acc, m, l = carry
        k_index = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        k = rope.load_rotated(k_ref, pl.ds(j * block_k, block_k), k_index, rotary)
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = rope.split_dot(q, k) * sm_scale  # (block_q, block_k)
        if causal:
            q_pos = qi * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
            k_pos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
            s = jnp.where(q_pos >= k_pos, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    num_k = pl.cdiv((qi + 1) * block_q, block_k) if causal else seq_len // block_k
    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), _NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, l = jax.lax.fori_loop(0, num_k, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def heuristic_config(seq_len: int, head_dim: int) -> Config:
    block = 64 if seq_len >= 64 else max(16, pl.next_power_of_2(seq_len))
    return Config(block_q=block, block_k=block, num_warps=4 if head_dim <= 64 else 8, num_stages=2)


@functools.partial(jax.jit, static_argnames=("causal", "rotary", "config", "interpret"))
def _flash(q, k, v, *, causal: bool, rotary: rope.Rotary | None, config: Config, interpret: bool):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    cfg = config
    # Causal: padded queries sit after every real one and padded keys after every real query,
    # so zero padding at the end changes no real output.
    pad = -t % max(cfg.block_q, cfg.block_k)
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    tp = t + pad
    out = pl.pallas_call(
        functools.partial(_flash_kernel, sm_scale=1.0 / math.sqrt(d), block_q=cfg.block_q, block_k=cfg.block_k,
                          causal=causal, seq_len=tp, rotary=rotary),
        grid=(b, hq, tp // cfg.block_q),
        in_specs=[
            pl.BlockSpec((None, cfg.block_q, None, d), lambda bi, h, i: (bi, i, h, 0)),
            pl.BlockSpec((None, tp, None, d), lambda bi, h, i: (bi, 0, h // group, 0)),
            pl.BlockSpec((None, tp, None, d), lambda bi, h, i: (bi, 0, h // group, 0)),
        ],
        out_specs=pl.BlockSpec((None, cfg.block_q, None, d), lambda bi, h, i: (bi, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=platform.compiler_params(cfg.num_warps, cfg.num_stages, interpret),
        interpret=interpret,
        name="flash_attention",
    )(q, k, v)
    return out[:, :t]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    rotary: rope.Rotary | None = None, config: Config | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Pallas flash attention; same contract as ``reference`` (self-attention: S == T)."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q (B, T, Hq, D) and k, v (B, T, Hkv, D); got {q.shape}, {k.shape}, {v.shape}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"k/v shape {k.shape} does not match q shape {q.shape} (prefill needs S == T)")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {k.shape[2]} (at least one)")
    if not common.is_pow2(d):
        raise ValueError(f"head_dim={d} must be a power of 2 for the Pallas attention kernels")
    if 0 in (b, t, hq):  # an empty batch, sequence or head axis: the empty result
        return jnp.zeros(q.shape, q.dtype)
    if interpret is None:
        interpret = platform.interpret_default()
    cfg = tuned.resolve("flash_attention", problem_key(b, t, hq, k.shape[2], d, q.dtype), config,
                        config_type=Config,
                        heuristic=lambda: heuristic_config(t, d))
    for name in ("block_q", "block_k"):
        if not common.is_pow2(getattr(cfg, name)) or getattr(cfg, name) < 16:
            raise ValueError(f"{name}={getattr(cfg, name)} must be a power of 2 >= 16")
    return _flash(q, k, v, causal=causal, rotary=rotary, config=cfg, interpret=interpret)


problem_key = common.attention_problem_key


DEFAULT_PROBLEMS = [problem_key(1, 512, 32, 32, 128, "bfloat16"), problem_key(1, 2048, 32, 8, 128, "bfloat16")]


def parse_shape(text: str) -> dict:
    """``BxTxHQxHKVxD``, e.g. ``1x2048x32x8x128``."""
    return common.parse_attention_shape(text, "BxTxHQxHKVxD", "1x2048x32x8x128")


def search_space(problem: dict) -> SearchSpace:
    b, t, hq, hkv, d = (problem[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim"))
    dtype = jnp.dtype(problem["dtype"])
    knobs = [Knob("block_q", (16, 32, 64, 128)), Knob("block_k", (16, 32, 64, 128))]
    if platform.backend() == "gpu":
        knobs += [Knob("num_warps", (2, 4, 8)), Knob("num_stages", (1, 2, 3, 4))]

    def violations(p):
        bq, bk = p["block_q"], p["block_k"]
        out = []
        if 4 * (bq * d + 2 * bk * d) > platform.SHARED_MEMORY_BYTES:
            out.append("q + k + v tiles exceed shared memory")
        if max(bq, bk) > max(16, pl.next_power_of_2(t)):
            out.append(f"blocks larger than the sequence ({t})")
        return out

    def make_inputs(seed):
        kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
        return (jax.random.normal(kq, (b, t, hq, d), dtype), jax.random.normal(kk, (b, t, hkv, d), dtype),
                jax.random.normal(kv, (b, t, hkv, d), dtype))

    return SearchSpace(kernel="flash_attention", problem=problem, knobs=tuple(knobs), violations=violations,
                       to_config=lambda p: Config(**{**Config().params(), **p}),
                       fn=lambda cfg: functools.partial(flash_attention, config=cfg), make_inputs=make_inputs,
                       default=heuristic_config(t, d).params(), interpreted=platform.interpret_default())
