"""The LLaMA forward pass, written once over a table of ops with two implementations:

``xla``: the kernels' plain-jnp references (what XLA fuses on its own; the correctness baseline);
``pallas``: the fused Pallas kernels of ``kernels.llm``.
Weights are a list of per-layer dicts. On the GPU the layer loop is unrolled, so every matmul reads
its weight buffer directly (a rolled loop over stacked weights copies each layer's slice first,
tripling the bytes a decode step moves); on the CPU the layers are stacked in the jitted program and
run as ``lax.scan`` (XLA:CPU compiles one rolled body several times faster than 30 unrolled ones,
which pays for the copy). The KV cache is preallocated (L, B, Hkv, S, D) and donated; it holds keys
before RoPE, which both attention ops apply to the q and k they read (inside the kernel on the pallas path).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels import platform
from kernels.llm import decode_attention, flash_attention, rmsnorm, swiglu, w4a16
from kernels.llm.rope import Rotary
from models.llama.config import LlamaConfig
from models.llama.params import split_qkv, stack_layers

PATHS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Ops:
    rmsnorm: Callable
    linear: Callable
    swiglu: Callable
    prefill_attention: Callable
    decode_attention: Callable


OPS = {
    "xla": Ops(rmsnorm.reference, w4a16.xla_matmul, swiglu.xla_swiglu, flash_attention.reference,
               decode_attention.reference),
    "pallas": Ops(rmsnorm.rmsnorm, w4a16.quantized_matmul, swiglu.swiglu, flash_attention.flash_attention,
                  decode_attention.decode_attention),
}


def ops_for(path: str) -> Ops:
    if path not in OPS:
        raise ValueError(f"unknown execution path {path!r}; choose one of {PATHS}")
    return OPS[path]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zeroed K and V caches, (layers, batch, kv_heads, max_len, head_dim) each."""
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _logits(params, cfg: LlamaConfig, ops: Ops, h, delta):
    x, _ = ops.rmsnorm(delta, params["norm"], eps=cfg.norm_eps, residual=h)
    out_w = params["embed"] if params["output"] is None else params["output"]
    return ops.linear(x, out_w).astype(jnp.float32)


def rotary_of(cfg: LlamaConfig) -> Rotary:
    return Rotary(theta=float(cfg.rope_theta), scaling=float(cfg.rope_scaling))


def _run_layers(params, cfg: LlamaConfig, ops: Ops, tokens, cache, attend, write):
    """Shared layer loop. ``attend(q, k, v, k_layer, v_layer)`` -> attention output (q, k not yet
    rotated); ``write(cache_layer, new)`` -> updated cache layer. Returns (logits, cache)."""
    b, t = tokens.shape
    hd = cfg.head_dim
    x = w4a16.embedding_lookup(params["embed"], tokens, cache["k"].dtype)  # (B, T, dim)

    def layer(carry, xs):
        h, delta = carry
        lp, k_layer, v_layer = xs
        xn, h = ops.rmsnorm(delta, lp["attn_norm"], eps=cfg.norm_eps, residual=h)
        q, k, v = split_qkv(ops.linear(xn, lp["wqkv"]), cfg)
        q = q.reshape(b, t, cfg.n_heads, hd)
        k, v = k.reshape(b, t, cfg.n_kv_heads, hd), v.reshape(b, t, cfg.n_kv_heads, hd)
        k_layer, v_layer = write(k_layer, k), write(v_layer, v)
        attn = attend(q, k, v, k_layer, v_layer).reshape(b, t, cfg.n_heads * hd)
        attn = ops.linear(attn, lp["wo"])
        xn, h = ops.rmsnorm(attn, lp["ffn_norm"], eps=cfg.norm_eps, residual=h)
        mlp = ops.linear(ops.swiglu(xn, lp["w_gate"], lp["w_up"]), lp["w_down"])
        return (h, mlp), (k_layer, v_layer)

    carry = (jnp.zeros_like(x), x)
    if platform.backend() == "gpu":
        k_all, v_all = cache["k"], cache["v"]
        for i, lp in enumerate(params["layers"]):
            carry, (k_layer, v_layer) = layer(carry, (lp, k_all[i], v_all[i]))
            k_all, v_all = k_all.at[i].set(k_layer), v_all.at[i].set(v_layer)
    else:
        # The cache layers go through the scan as inputs/outputs, not the carry: updating a carried
        # cache makes XLA copy every layer at every layer.
        stacked = stack_layers(params["layers"])
        carry, (k_all, v_all) = jax.lax.scan(layer, carry, (stacked, cache["k"], cache["v"]))
    h, delta = carry
    cache = {"k": k_all, "v": v_all}
    return _logits(params, cfg, ops, h, delta), cache


@functools.partial(jax.jit, static_argnames=("cfg", "path"), donate_argnames=("cache",))
def prefill(params: dict, tokens: jax.Array, cache: dict, *, cfg: LlamaConfig, path: str = "xla"):
    """Run a prompt (B, T) from position 0 into an empty cache -> (logits (B, T, vocab), cache).

    Rows shorter than T may be right-padded: causal attention keeps padding from reaching real tokens,
    and decode overwrites the padded cache slots.
    """
    ops = ops_for(path)

    def attend(q, k, v, k_layer, v_layer):
        return ops.prefill_attention(q, k, v, causal=True, rotary=rotary_of(cfg))

    def write(cache_layer, new):  # (B, Hkv, S, D) <- (B, T, Hkv, D) at 0
        return jax.lax.dynamic_update_slice_in_dim(cache_layer, new.transpose(0, 2, 1, 3).astype(cache_layer.dtype),
                                                   0, axis=2)

    return _run_layers(params, cfg, ops, tokens, cache, attend, write)


@functools.partial(jax.jit, static_argnames=("cfg", "path"), donate_argnames=("cache",))
def decode(params: dict, tokens: jax.Array, positions: jax.Array, cache: dict, *, cfg: LlamaConfig,
           path: str = "xla"):
    """One token per sequence: tokens (B,), positions (B,) -> (logits (B, vocab), cache)."""
    ops = ops_for(path)

    def attend(q, k, v, k_layer, v_layer):
        return ops.decode_attention(q[:, 0], k_layer, v_layer, positions + 1, rotary=rotary_of(cfg))[:, None]

    def write(cache_layer, new):  # (B, Hkv, S, D) <- (B, 1, Hkv, D) at positions[b]
        def one(c, n, p):
            return jax.lax.dynamic_update_slice_in_dim(c, n.transpose(1, 0, 2).astype(c.dtype), p, axis=1)

        return jax.vmap(one)(cache_layer, new, positions)

    logits, cache = _run_layers(params, cfg, ops, tokens[:, None], cache, attend, write)
    return logits[:, 0], cache
