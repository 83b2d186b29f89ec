"""What every LLM kernel module does the same way: config params, attention problem keys."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tuning.space import parse_dims


def params_of(config) -> dict:
    return dataclasses.asdict(config)


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (1 when n is odd)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def attention_problem_key(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """The cache/study key of an attention problem (prefill: seq = tokens; decode: cache length)."""
    return {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "dtype": jnp.dtype(dtype).name}


def parse_attention_shape(text: str, form: str, example: str) -> dict:
    """``--shape`` of an attention kernel: five ``x``-separated sizes in ``form`` (e.g. BxTxHQxHKVxD)."""
    b, s, hq, hkv, d = parse_dims(text, form, example)
    if hq % hkv:
        raise ValueError(f"shape {text!r}: HKV must divide HQ, e.g. {example}")
    return attention_problem_key(b, s, hq, hkv, d, "bfloat16")


def write_cache_rows(cache: jax.Array, layer, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Stacked KV cache (L, B, Hkv, S, D) <- new (B, T, Hkv, D) at [layer, b, :, starts[b]:+T].

    One small dynamic-update-slice per batch row: in place on a buffer carried through the layer loop
    (the cache is never copied, whatever its length)."""
    new = new.transpose(0, 2, 1, 3).astype(cache.dtype)[None]  # (1, B, Hkv, T, D)
    zero = jnp.zeros((), jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    for b in range(new.shape[1]):
        cache = jax.lax.dynamic_update_slice(cache, new[:, b:b + 1],
                                             (layer, jnp.int32(b), zero, starts[b].astype(jnp.int32), zero))
    return cache
