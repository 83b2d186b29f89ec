"""The LLaMA forward pass, written once over a table of ops with several implementations:

``xla``: the kernels' plain-jnp references (what XLA fuses on its own; the correctness baseline);
``pallas``: the fused Pallas kernels of ``kernels.llm``;
``cpu``: the compiled C++ kernels of ``kernels.cpu``, called through XLA's FFI from inside the same
jitted step, with f32 activations: the xla path's arithmetic up to the order of f32 sums (so the
same greedy tokens);
``cpu-q8``: the same kernels with activations quantized to 8 bits per block as llama.cpp does
(integer block dot products: faster prefill, not exact).

The ops are the fused units of a layer: RMSNorm runs as the prologue of the product it feeds
(``norm_linear``, ``norm_swiglu``), the residual add as the epilogue of ``wo`` and ``w_down``
(``linear_residual``). The residual stream is float32 on every path. The ``xla`` and ``cpu`` paths
compose these units from their separate ops; the ``pallas`` path runs each as one kernel, and in
decode its q/k/v projection writes the new keys and values straight into the cache, so a decode
layer is five Pallas calls (q/k/v, attention, wo, gate/up, down).

``prepare`` lays the weights out once for a path: on the GPU the layers stay a list and the layer
loop is unrolled, so every matmul reads its weight buffer directly (a rolled loop over stacked
weights copies each layer's slice first); on the CPU they are stacked once, at load, and run as
``lax.scan`` (XLA:CPU compiles one rolled body several times faster than 30 unrolled ones). The
``cpu`` path also re-lays quantized weights out as llama.cpp-style row blocks.
The KV cache is preallocated (L, B, Hkv, S, D), donated and carried through the layer loop; each
layer writes its new keys and values at its index in place, and attention reads the stacked cache
at the layer's index. It holds keys before RoPE, which every attention op applies to the q and k
it reads (inside the kernel on the pallas and cpu paths).
``run_prefill`` and ``run_decode`` are the passes over any ops table: ``models.llama.sharding`` runs them
per device under ``shard_map``, with head counts taken from that device's weights and cache.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels.llm import (
    common,
    decode_attention,
    flash_attention,
    qkv_projection,
    rmsnorm,
    swiglu,
    w4a16,
)
from kernels.llm.rope import Rotary
from models.llama.config import LlamaConfig
from models.llama.params import split_qkv, stack_layers
from tuning import platform

PATHS = ("xla", "pallas", "cpu", "cpu-q8")
CPU_PATHS = ("cpu", "cpu-q8")  # the compiled kernels' paths: llama.cpp's row-block weight layout


def _jnp_prefill_attention(attention: Callable):
    """A (q, k, v)-attention op -> the ops-table form that also writes the cache."""
    def attend(q, k, v, cache, layer, rotary):
        starts = jnp.zeros((q.shape[0],), jnp.int32)
        cache = {"k": common.write_cache_rows(cache["k"], layer, k, starts),
                 "v": common.write_cache_rows(cache["v"], layer, v, starts)}
        return attention(q, k, v, causal=True, rotary=rotary), cache
    return attend


def _jnp_decode_attention(attention: Callable):
    """A decode attention op reading the stacked cache at a layer -> the ops-table form that writes
    the new row first."""
    def attend(q, k, v, cache, layer, positions, rotary):
        cache = {"k": common.write_cache_rows(cache["k"], layer, k, positions),
                 "v": common.write_cache_rows(cache["v"], layer, v, positions)}
        out = attention(q[:, 0], cache["k"], cache["v"], positions + 1, layer=layer, rotary=rotary)
        return out[:, None], cache
    return attend


def _keep(w):
    return w


def _slice_layer(layers: dict, i) -> dict:
    return jax.tree.map(lambda a: a[i], layers)


@dataclasses.dataclass(frozen=True)
class Ops:
    """One execution path, as the fused units of a layer (h: the float32 residual stream (B, T, dim);
    ``dtype``: the activations' dtype):

    ``norm_linear(h, norm_w, w, *, eps, dtype)`` -> rmsnorm(h) @ W;
    ``linear_residual(x, w, h)`` -> h + x @ W (float32); under tensor parallelism (``models.llama.sharding``)
    W is split along K and this unit also sums the devices' partial products (one all-reduce);
    ``norm_swiglu(h, norm_w, w_gate, w_up, *, eps, dtype)`` -> silu(y @ W_gate) * (y @ W_up), y = rmsnorm(h);
    ``decode_qkv(h, norm_w, wqkv, cache, layer, positions, *, cfg, dtype)`` -> (q, k, v, cache), each
    (B, 1, heads * head_dim); k, v are None when the projection wrote them into the cache itself;
    ``prefill_attention(q, k, v, cache, layer, rotary) -> (out, cache)`` (positions 0..T-1, writes k, v);
    ``decode_attention(q, k, v, cache, layer, positions, rotary) -> (out, cache)`` (writes k, v unless
    None, then attends over the stacked cache at ``layer``).
    ``layout`` maps a linear weight to the form the products read; ``select_layer(stacked layers,
    i)`` -> layer i's weights inside the layer loop."""

    norm_linear: Callable
    linear_residual: Callable
    norm_swiglu: Callable
    decode_qkv: Callable
    prefill_attention: Callable
    decode_attention: Callable
    embedding: Callable = w4a16.embedding_lookup
    layout: Callable = _keep
    select_layer: Callable = _slice_layer


def composed(rmsnorm_op: Callable, linear: Callable, swiglu_op: Callable, **rest) -> Ops:
    """The fused units composed from separate ops: ``rmsnorm_op(x, w, eps=) -> (y, _)``,
    ``linear(x, w)``, ``swiglu_op(x, w_gate, w_up)`` (the ``xla`` and ``cpu`` paths)."""
    def norm_linear(h, norm_w, w, *, eps, dtype):
        return linear(rmsnorm_op(h, norm_w, eps=eps)[0].astype(dtype), w)

    def linear_residual(x, w, h):
        return h + linear(x, w).astype(jnp.float32)

    def norm_swiglu(h, norm_w, w_gate, w_up, *, eps, dtype):
        return swiglu_op(rmsnorm_op(h, norm_w, eps=eps)[0].astype(dtype), w_gate, w_up)

    def decode_qkv(h, norm_w, wqkv, cache, layer, positions, *, cfg, dtype):
        q, k, v = split_qkv(norm_linear(h, norm_w, wqkv, eps=cfg.norm_eps, dtype=dtype), cfg)
        return q, k, v, cache

    return Ops(norm_linear, linear_residual, norm_swiglu, decode_qkv, **rest)


def _pallas_decode_qkv(h, norm_w, wqkv, cache, layer, positions, *, cfg, dtype):
    # Head counts from the cache: under tensor parallelism a device holds a slice of the KV heads
    # (and their query heads), and its cache and wqkv block are that slice's.
    n_kv_heads = cache["k"].shape[2]
    q, kc, vc = qkv_projection.qkv_projection(h[:, 0], norm_w, wqkv, cache["k"], cache["v"], layer, positions,
                                              n_heads=n_kv_heads * (cfg.n_heads // cfg.n_kv_heads),
                                              n_kv_heads=n_kv_heads, eps=cfg.norm_eps, dtype=dtype)
    return q[:, None], None, None, {"k": kc, "v": vc}


def _pallas_decode_attention(q, k, v, cache, layer, positions, rotary):
    """The new k, v are in the cache already (``_pallas_decode_qkv`` wrote them)."""
    out = decode_attention.decode_attention(q[:, 0], cache["k"], cache["v"], positions + 1, layer=layer,
                                            rotary=rotary)
    return out[:, None], cache


def _pallas_ops() -> Ops:
    def norm_linear(h, norm_w, w, *, eps, dtype):
        return w4a16.quantized_matmul(h, w, norm_weight=norm_w, eps=eps, dtype=dtype)

    def linear_residual(x, w, h):
        return w4a16.quantized_matmul(x, w, residual=h)

    def norm_swiglu(h, norm_w, w_gate, w_up, *, eps, dtype):
        return swiglu.swiglu(h, w_gate, w_up, norm_weight=norm_w, eps=eps, dtype=dtype)

    return Ops(norm_linear, linear_residual, norm_swiglu, _pallas_decode_qkv,
               _jnp_prefill_attention(flash_attention.flash_attention), _pallas_decode_attention)


def _cpu_ops(activations: str) -> Ops:
    from kernels.cpu import attention, qmatmul
    from kernels.cpu import rmsnorm as cpu_rmsnorm

    return composed(cpu_rmsnorm.rmsnorm, functools.partial(qmatmul.linear, activations=activations),
                    functools.partial(qmatmul.swiglu_op, activations=activations),
                    prefill_attention=attention.prefill_attention, decode_attention=attention.decode_attention,
                    embedding=qmatmul.embedding_lookup, layout=qmatmul.cpu_layout, select_layer=qmatmul.select_layer)


OPS = {
    "xla": lambda: composed(rmsnorm.reference, w4a16.xla_matmul, swiglu.xla_swiglu,
                            prefill_attention=_jnp_prefill_attention(flash_attention.reference),
                            decode_attention=_jnp_decode_attention(decode_attention.reference)),
    "pallas": _pallas_ops,
    "cpu": lambda: _cpu_ops("f32"),
    "cpu-q8": lambda: _cpu_ops("q8"),
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
    if path not in CPU_PATHS and any(type(leaf).__name__ == "BlockWeight" for leaf in jax.tree.leaves(
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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zeroed_cache(shape: tuple[int, ...], dtype) -> dict:
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zeroed K and V caches, (layers, batch, kv_heads, max_len, head_dim) each (one compiled function:
    op by op, each op would be one more executable held in memory)."""
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return _zeroed_cache(shape, jnp.dtype(dtype))


def rotary_of(cfg: LlamaConfig) -> Rotary:
    return Rotary(theta=float(cfg.rope_theta), scaling=float(cfg.rope_scaling), llama3=cfg.rope_llama3)


def _run_layers(params, cfg: LlamaConfig, ops: Ops, tokens, cache, project, attend, last=None):
    """Shared layer loop. ``project(h, layer weights, cache, i)`` -> (q, k, v, cache) and
    ``attend(q, k, v, cache, i)`` -> (attention output, cache), q and k not yet rotated.
    Returns (logits, cache); with ``last`` (B,) only the logits at those positions (the output
    projection is the largest matmul of a prefill)."""
    b, t = tokens.shape
    hd = cfg.head_dim  # head counts come from the weights: a device holding some heads runs this unchanged
    dtype = cache["k"].dtype  # the activations' dtype
    h = ops.embedding(params["embed"], tokens, dtype).astype(jnp.float32)  # (B, T, dim): the residual stream

    def layer(carry, i):
        h, cache = carry
        lp = params["layers"][i] if isinstance(params["layers"], list) else ops.select_layer(params["layers"], i)
        q, k, v, cache = project(h, lp, cache, i)
        q = q.reshape(b, t, -1, hd)
        if k is not None:
            k, v = k.reshape(b, t, -1, hd), v.reshape(b, t, -1, hd)
        attn, cache = attend(q, k, v, cache, i)
        h = ops.linear_residual(attn.reshape(b, t, -1), lp["wo"], h)
        act = ops.norm_swiglu(h, lp["ffn_norm"], lp["w_gate"], lp["w_up"], eps=cfg.norm_eps, dtype=dtype)
        h = ops.linear_residual(act, lp["w_down"], h)
        return (h, cache), None

    carry = (h, cache)
    if isinstance(params["layers"], list):  # unrolled (GPU): each layer reads its own buffers
        for i in range(len(params["layers"])):
            carry, _ = layer(carry, i)
    else:  # the stacked weights are closed over and indexed, never sliced into the loop's inputs
        carry, _ = jax.lax.scan(layer, carry, np.arange(cfg.n_layers, dtype=np.int32))
    h, cache = carry
    if last is not None:
        h = jnp.take_along_axis(h, last[:, None, None], axis=1)
    out_w = params["embed"] if params["output"] is None else params["output"]
    logits = ops.norm_linear(h, params["norm"], out_w, eps=cfg.norm_eps, dtype=dtype)
    return logits.astype(jnp.float32), cache


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
    dtype = cache["k"].dtype

    def project(h, lp, cache, i):
        q, k, v = split_qkv(ops.norm_linear(h, lp["attn_norm"], lp["wqkv"], eps=cfg.norm_eps, dtype=dtype), cfg)
        return q, k, v, cache

    def attend(q, k, v, cache, i):
        return ops.prefill_attention(q, k, v, cache, i, rotary_of(cfg))

    last = None if lengths is None else (lengths - 1).astype(jnp.int32)
    return _run_layers(params, cfg, ops, tokens, cache, project, attend, last)


def run_decode(ops: Ops, params: dict, tokens: jax.Array, positions: jax.Array, cache: dict, cfg: LlamaConfig):
    """``decode``'s body over any ops table."""
    dtype = cache["k"].dtype

    def project(h, lp, cache, i):
        return ops.decode_qkv(h, lp["attn_norm"], lp["wqkv"], cache, i, positions, cfg=cfg, dtype=dtype)

    def attend(q, k, v, cache, i):
        return ops.decode_attention(q, k, v, cache, i, positions, rotary_of(cfg))

    logits, cache = _run_layers(params, cfg, ops, tokens[:, None], cache, project, attend)
    return logits[:, 0], cache
