"""Attention over the stacked KV cache on the CPU, for decode (one query per sequence) and prefill.

One call writes the layer's new keys and values into the cache (L, B, Hkv, S, D) in place (the
buffer is aliased from input to output) and attends: query t of row b sits at position
start[b] + t and sees keys 0..start[b] + t. The cache holds keys before RoPE; the kernel rotates q
and each key it reads, with cos/sin from a table the trace builds once per cache length.
Work is split over (batch, kv head, key chunk) and the chunks' softmaxes merged by log-sum-exp, so
a model with 3 kv heads still keeps every thread busy (flash-decoding; Dao et al., 2023).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu import build
from kernels.llm import common, rope
from tuning import tuned
from tuning.space import Knob, SearchSpace, parse_dims


@dataclasses.dataclass(frozen=True)
class Config:
    """isa: the build; threads; splits: key chunks per (batch, kv head), merged afterwards."""

    isa: str = "scalar"
    threads: int = 1
    splits: int = 1

    def __post_init__(self):
        if self.isa not in build.ISAS:
            raise ValueError(f"isa={self.isa!r} is not one of {build.ISAS}")
        if self.threads < 1 or self.splits < 1:
            raise ValueError(f"threads={self.threads} and splits={self.splits} must be >= 1")

    def params(self) -> dict:
        return common.params_of(self)


def heuristic_config(batch: int, kv_heads: int, seq: int) -> Config:
    threads = build.default_threads()
    splits = max(1, min(-(-2 * threads // (batch * kv_heads)), seq // 64))
    return Config(isa=build.best_isa(), threads=threads, splits=splits)


def problem_key(batch: int, tokens: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    return {"batch": batch, "tokens": tokens, "seq": seq, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "cpu": build.cpu_name()}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _angles(seq: int, head_dim: int, rotary: rope.Rotary) -> jax.Array:
    return rotary.angles(jnp.arange(seq), head_dim)


@functools.lru_cache(maxsize=32)
def rope_table(seq: int, head_dim: int, rotary: rope.Rotary) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (seq, head_dim/2) f32 of positions 0..seq-1: the angles of ``rope.reference``, computed
    as one compiled function (op by op, each op would be one more executable held in memory)."""
    # compiled and run here, also while an outer function is being traced (its arguments are static)
    angles = np.asarray(_angles.lower(seq, head_dim, rotary).compile()(), np.float32)
    return np.cos(angles), np.sin(angles)


def reference(q, k_new, v_new, k_cache, v_cache, layer, starts, *, rotary: rope.Rotary):
    """The op in jnp: (out (B, T, Hq, D), k_cache, v_cache) after writing k_new/v_new at starts."""
    k_cache = common.write_cache_rows(k_cache, layer, k_new, starts)
    v_cache = common.write_cache_rows(v_cache, layer, v_new, starts)
    b, t, hq, d = q.shape
    keys, values = k_cache[layer], v_cache[layer]  # (B, Hkv, S, D)
    hkv, s = keys.shape[1], keys.shape[2]
    pos = starts[:, None] + jnp.arange(t)[None, :]  # (B, T)
    qr = rope.apply(q.astype(jnp.float32), pos, rotary).reshape(b, t, hkv, hq // hkv, d)
    kr = rope.apply(keys.transpose(0, 2, 1, 3).astype(jnp.float32), jnp.broadcast_to(jnp.arange(s), (b, s)), rotary)
    scores = jnp.einsum("bthgd,bshd->bhgts", qr, kr) / math.sqrt(d)
    visible = jnp.arange(s)[None, None, :] <= pos[:, :, None]  # (B, T, S)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    out = jnp.einsum("bhgts,bhsd->bthgd", jax.nn.softmax(scores, axis=-1), values.astype(jnp.float32))
    return out.reshape(b, t, hq, d), k_cache, v_cache


def attention(q, k_new, v_new, k_cache, v_cache, layer, starts, *, rotary: rope.Rotary,
              config: Config | None = None):
    """Write, then attend (see the module docstring); float32. Returns (out, k_cache, v_cache), the
    caches updated in place when donated."""
    b, t, hq, d = q.shape
    _, bc, hkv, s, dc = k_cache.shape
    if q.dtype != jnp.float32 or k_cache.dtype != jnp.float32 or v_cache.dtype != jnp.float32:
        raise ValueError("the cpu attention takes float32 q and caches (use --dtype float32 on the cpu path)")
    if (bc, dc) != (b, d) or k_new.shape != (b, t, hkv, d) or v_new.shape != k_new.shape or hq % hkv or d % 2:
        raise ValueError(f"shapes do not fit: q {q.shape}, k/v new {k_new.shape}/{v_new.shape}, "
                         f"caches {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k cache {k_cache.shape} and v cache {v_cache.shape} differ")
    cfg = tuned.resolve("cpu_attention", problem_key(b, t, s, hq, hkv, d), config, config_type=Config,
                       heuristic=lambda: heuristic_config(b, hkv, s))
    cos, sin = rope_table(s, d, rotary)
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k_cache.shape, jnp.float32),
              jax.ShapeDtypeStruct(v_cache.shape, jnp.float32))
    call = jax.ffi.ffi_call(build.target("attention", cfg.isa), shapes, input_output_aliases={3: 1, 4: 2})
    return call(q, k_new.astype(jnp.float32), v_new.astype(jnp.float32), k_cache, v_cache,
                jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), starts.astype(jnp.int32), cos, sin,
                splits=np.int64(cfg.splits), threads=np.int64(build.cap_threads(cfg.threads)))


# The forward pass's ops-table forms (models.llama.forward).
def prefill_attention(q, k, v, cache, layer, rotary):
    out, kc, vc = attention(q, k, v, cache["k"], cache["v"], layer, jnp.zeros((q.shape[0],), jnp.int32),
                            rotary=rotary)
    return out, {"k": kc, "v": vc}


def decode_attention(q, k, v, cache, layer, positions, rotary):
    out, kc, vc = attention(q, k, v, cache["k"], cache["v"], layer, positions, rotary=rotary)
    return out, {"k": kc, "v": vc}


# SmolLM2-135M: decode at a 256-token cache, and a 256-token prefill.
DEFAULT_PROBLEMS = [problem_key(1, 1, 256, 9, 3, 64), problem_key(1, 256, 256, 9, 3, 64)]


def parse_shape(text: str) -> dict:
    """``BxTxSxHQxHKVxD`` (T new tokens, S cache length), e.g. ``1x1x256x9x3x64``."""
    b, t, s, hq, hkv, d = parse_dims(text, "BxTxSxHQxHKVxD", "1x1x256x9x3x64")
    if t > s or hq % hkv or d % 2:
        raise ValueError(f"shape {text!r}: need T <= S, HKV dividing HQ and an even D")
    return problem_key(b, t, s, hq, hkv, d)


def search_space(problem: dict) -> SearchSpace:
    b, t, s, hq, hkv, d = (problem[k] for k in ("batch", "tokens", "seq", "heads", "kv_heads", "head_dim"))
    start = s - t  # the worst case: the cache full after this call

    def make_inputs(seed):
        ks = jax.random.split(jax.random.key(seed), 5)
        return (jax.random.normal(ks[0], (b, t, hq, d), jnp.float32),
                jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32),
                jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32),
                jax.random.normal(ks[3], (1, b, hkv, s, d), jnp.float32),
                jax.random.normal(ks[4], (1, b, hkv, s, d), jnp.float32), jnp.full((b,), start, jnp.int32))

    def fn(cfg: Config):
        return lambda q, kn, vn, kc, vc, starts: attention(q, kn, vn, kc, vc, 0, starts, rotary=rope.Rotary(),
                                                           config=cfg)[0]

    threads = tuple(n for n in (1, 2, 4, 8, 16) if n <= build.default_threads())
    return SearchSpace(kernel="cpu_attention", problem=problem,
                       knobs=(Knob("isa", build.supported_isas()), Knob("threads", threads),
                              Knob("splits", tuple(n for n in (1, 2, 4, 8, 16) if n <= max(1, s // 32)))),
                       violations=lambda p: [], fn=fn, make_inputs=make_inputs,
                       to_config=lambda p: Config(**{**heuristic_config(b, hkv, s).params(), **p}),
                       default=heuristic_config(b, hkv, s).params())
