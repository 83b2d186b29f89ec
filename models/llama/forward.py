"""The LLaMA forward pass, written once over a table of ops with several implementations:

``xla``: the kernels' plain-jnp references (what XLA fuses on its own; the correctness baseline);
``pallas``: the fused Pallas kernels of ``kernels.llm``;
``cpu``: the compiled C++ kernels of ``kernels.cpu`` (8-bit-activation integer dot products), called
through XLA's FFI from inside the same jitted step.

``prepare`` lays the weights out once for a path: on the GPU the layers stay a list and the layer
loop is unrolled, so every matmul reads its weight buffer directly (a rolled loop over stacked
weights copies each layer's slice first); on the CPU they are stacked once, at load, and run as
``lax.scan`` (XLA:CPU compiles one rolled body several times faster than 30 unrolled ones). The
``cpu`` path also re-lays quantized weights out as llama.cpp-style row blocks.
The KV cache is preallocated (L, B, Hkv, S, D), donated and carried through the layer loop; each
layer writes its new keys and values at its index in place. It holds keys before RoPE, which every
attention op applies to the q and k it reads (inside the kernel on the pallas and cpu paths).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels import platform
from kernels.llm import (
    common,
    decode_attention,
    flash_attention,
    rmsnorm,
    swiglu,
    w4a16,
)
from kernels.llm.rope import Rotary
from models.llama.config import LlamaConfig
from models.llama.params import split_qkv, stack_layers

PATHS = ("xla", "pallas", "cpu")


def _jnp_prefill_attention(attention: Callable):
    """A (q, k, v)-attention op -> the ops-table form that also writes the cache."""
    def attend(q, k, v, cache, layer, rotary):
        starts = jnp.zeros((q.shape[0],), jnp.int32)
        cache = {"k": common.write_cache_rows(cache["k"], layer, k, starts),
                 "v": common.write_cache_rows(cache["v"], layer, v, starts)}
        return attention(q, k, v, causal=True, rotary=rotary), cache
    return attend


def _jnp_decode_attention(attention: Callable):
    """A cache-reading decode attention op -> the ops-table form that writes the new row first."""
    def attend(q, k, v, cache, layer, positions, rotary):
        cache = {"k": common.write_cache_rows(cache["k"], layer, k, positions),
                 "v": common.write_cache_rows(cache["v"], layer, v, positions)}
        out = attention(q[:, 0], cache["k"][layer], cache["v"][layer], positions + 1, rotary=rotary)
        return out[:, None], cache
    return attend


def _keep(w):
    return w


def _slice_layer(layers: dict, i) -> dict:
    return jax.tree.map(lambda a: a[i], layers)


@dataclasses.dataclass(frozen=True)
class Ops:
    """One execution path. ``layout`` maps a linear weight to the form ``linear``/``swiglu`` read;
    the attention ops write the layer's new k, v into the stacked cache and attend:
    ``prefill_attention(q, k, v, cache, layer, rotary) -> (out, cache)`` (positions 0..T-1) and
    ``decode_attention(q, k, v, cache, layer, positions, rotary) -> (out, cache)``.
    ``select_layer(stacked layers, i)`` -> layer i's weights inside the layer loop.
    ``all_reduce(partial)`` sums the partial outputs of a projection whose K is split across devices
    (``wo``, ``w_down``; ``models.llama.sharding``): the identity on one device."""

    rmsnorm: Callable
    linear: Callable
    swiglu: Callable
    prefill_attention: Callable
    decode_attention: Callable
    embedding: Callable = w4a16.embedding_lookup
    layout: Callable = _keep
    select_layer: Callable = _slice_layer
    all_reduce: Callable = _keep


def _cpu_ops() -> Ops:
    from kernels.cpu import attention, qmatmul
    from kernels.cpu import rmsnorm as cpu_rmsnorm

    return Ops(cpu_rmsnorm.rmsnorm, qmatmul.linear, qmatmul.swiglu_op, attention.prefill_attention,
               attention.decode_attention, qmatmul.embedding_lookup, qmatmul.cpu_layout, qmatmul.select_layer)


OPS = {
    "xla": lambda: Ops(rmsnorm.reference, w4a16.xla_matmul, swiglu.xla_swiglu,
                       _jnp_prefill_attention(flash_attention.reference),
                       _jnp_decode_attention(decode_attention.reference)),
    "pallas": lambda: Ops(rmsnorm.rmsnorm, w4a16.quantized_matmul, swiglu.swiglu,
                          _jnp_prefill_attention(flash_attention.flash_attention),
                          _jnp_decode_attention(decode_attention.decode_attention)),
    "cpu": _cpu_ops,
}


@functools.cache
def ops_for(path: str) -> Ops:
    if path not in OPS:
        raise ValueError(f"unknown execution path {path!r}; choose one of {PATHS}")
    return OPS[path]()


LINEAR_WEIGHTS = ("wqkv", "wo", "w_gate", "w_up", "w_down")


def prepare(params: dict, cfg: LlamaConfig, path: str = "xla") -> dict:
    """Lay the weights out for ``path`` on this backend, once: stack the layers (CPU), re-lay
    quantized weights for the path's kernels, and place everything on the device. Idempotent."""
    return jax.device_put(lay_out(params, cfg, path))


def lay_out(params: dict, cfg: LlamaConfig, path: str = "xla") -> dict:
    """``prepare`` without the placement: host arrays stay on the host (``models.llama.sharding``
    places them across a mesh instead)."""
    ops = ops_for(path)
    if path != "cpu" and any(type(leaf).__name__ == "BlockWeight" for leaf in jax.tree.leaves(
            params, is_leaf=lambda x: type(x).__name__ == "BlockWeight")):
        raise ValueError(f"these weights are laid out for the cpu path; load the model again for path {path!r}")
    layers = params["layers"]
    if isinstance(layers, list) and platform.backend() != "gpu":
        layers = stack_layers(layers)

    def lay_out(layer: dict) -> dict:
        return {name: ops.layout(w) if name in LINEAR_WEIGHTS else w for name, w in layer.items()}

    layers = [lay_out(lp) for lp in layers] if isinstance(layers, list) else lay_out(layers)
    embed = ops.layout(params["embed"])
    output = None if params["output"] is None else ops.layout(params["output"])
    return {**params, "embed": embed, "output": output, "layers": layers}


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zeroed K and V caches, (layers, batch, kv_heads, max_len, head_dim) each."""
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def rotary_of(cfg: LlamaConfig) -> Rotary:
    return Rotary(theta=float(cfg.rope_theta), scaling=float(cfg.rope_scaling), llama3=cfg.rope_llama3)


def _logits(params, cfg: LlamaConfig, ops: Ops, h, delta):
    x, _ = ops.rmsnorm(delta, params["norm"], eps=cfg.norm_eps, residual=h)
    out_w = params["embed"] if params["output"] is None else params["output"]
    return ops.linear(x, out_w).astype(jnp.float32)


def _run_layers(params, cfg: LlamaConfig, ops: Ops, tokens, cache, attend, last=None):
    """Shared layer loop. ``attend(q, k, v, cache, layer)`` -> (attention output, cache) with q, k
    not yet rotated. Returns (logits, cache); with ``last`` (B,) only the logits at those positions
    (the output projection is the largest matmul of a prefill)."""
    b, t = tokens.shape
    hd = cfg.head_dim  # head counts come from the weights: a device holding some heads runs this unchanged
    x = ops.embedding(params["embed"], tokens, cache["k"].dtype)  # (B, T, dim)

    def layer(carry, i):
        h, delta, cache = carry
        lp = params["layers"][i] if isinstance(params["layers"], list) else ops.select_layer(params["layers"], i)
        xn, h = ops.rmsnorm(delta, lp["attn_norm"], eps=cfg.norm_eps, residual=h)
        q, k, v = split_qkv(ops.linear(xn, lp["wqkv"]), cfg)
        q, k, v = q.reshape(b, t, -1, hd), k.reshape(b, t, -1, hd), v.reshape(b, t, -1, hd)
        attn, cache = attend(q, k, v, cache, i)
        attn = ops.all_reduce(ops.linear(attn.reshape(b, t, -1), lp["wo"]))
        xn, h = ops.rmsnorm(attn, lp["ffn_norm"], eps=cfg.norm_eps, residual=h)
        mlp = ops.all_reduce(ops.linear(ops.swiglu(xn, lp["w_gate"], lp["w_up"]), lp["w_down"]))
        return (h, mlp, cache), None

    carry = (jnp.zeros_like(x), x, cache)
    if isinstance(params["layers"], list):  # unrolled (GPU): each layer reads its own buffers
        for i in range(len(params["layers"])):
            carry, _ = layer(carry, i)
    else:  # the stacked weights are closed over and indexed, never sliced into the loop's inputs
        carry, _ = jax.lax.scan(layer, carry, np.arange(cfg.n_layers, dtype=np.int32))
    h, delta, cache = carry
    if last is not None:
        pick = lambda a: jnp.take_along_axis(a, last[:, None, None], axis=1)
        h, delta = pick(h), pick(delta)
    return _logits(params, cfg, ops, h, delta), cache


@functools.partial(jax.jit, static_argnames=("cfg", "path"), donate_argnames=("cache",))
def prefill(params: dict, tokens: jax.Array, cache: dict, *, cfg: LlamaConfig, path: str = "xla",
            lengths: jax.Array | None = None):
    """Run a prompt (B, T) from position 0 into an empty cache -> (logits (B, T, vocab), cache); with
    ``lengths`` (B,), only each row's last logits (B, 1, vocab).

    Rows shorter than T may be right-padded: causal attention keeps padding from reaching real tokens,
    and decode overwrites the padded cache slots.
    """
    return run_prefill(ops_for(path), params, tokens, cache, cfg, lengths)


@functools.partial(jax.jit, static_argnames=("cfg", "path"), donate_argnames=("cache",))
def decode(params: dict, tokens: jax.Array, positions: jax.Array, cache: dict, *, cfg: LlamaConfig,
           path: str = "xla"):
    """One token per sequence: tokens (B,), positions (B,) -> (logits (B, vocab), cache)."""
    return run_decode(ops_for(path), params, tokens, positions, cache, cfg)


def run_prefill(ops: Ops, params: dict, tokens: jax.Array, cache: dict, cfg: LlamaConfig,
                lengths: jax.Array | None = None):
    """``prefill``'s body over any ops table (traced inside a jit or a ``shard_map``)."""
    def attend(q, k, v, cache, i):
        return ops.prefill_attention(q, k, v, cache, i, rotary_of(cfg))

    last = None if lengths is None else (lengths - 1).astype(jnp.int32)
    return _run_layers(params, cfg, ops, tokens, cache, attend, last)


def run_decode(ops: Ops, params: dict, tokens: jax.Array, positions: jax.Array, cache: dict, cfg: LlamaConfig):
    """``decode``'s body over any ops table."""
    def attend(q, k, v, cache, i):
        return ops.decode_attention(q, k, v, cache, i, positions, rotary_of(cfg))

    logits, cache = _run_layers(params, cfg, ops, tokens[:, None], cache, attend)
    return logits[:, 0], cache
