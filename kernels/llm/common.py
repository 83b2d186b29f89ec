"""What every LLM kernel module does the same way: config params, attention problem keys."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


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
    try:
        b, s, hq, hkv, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} is not {form}, e.g. {example}") from None
    return attention_problem_key(b, s, hq, hkv, d, "bfloat16")
