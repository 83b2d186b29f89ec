"""LLaMA parameters as a pytree: ``{"embed", "output", "norm", "layers": [one dict per layer]}``.

Linear weights are (K, N) (``x @ W``), dense or ``QuantizedWeight``; the embedding is stored as
(dim, vocab) so the same array serves as the tied output projection. A layer holds ``wqkv``: the q, k
and v projections side by side along N (``fuse_qkv``), so a decode step reads them in one GEMV.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.llm.w4a16 import QuantizedWeight, dequantize, quantize
from models.llama.config import LlamaConfig

LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def matrix_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    hd = cfg.head_dim
    return {
        "wq": (cfg.dim, cfg.n_heads * hd),
        "wk": (cfg.dim, cfg.n_kv_heads * hd),
        "wv": (cfg.dim, cfg.n_kv_heads * hd),
        "wo": (cfg.n_heads * hd, cfg.dim),
        "w_gate": (cfg.dim, cfg.ffn_dim),
        "w_up": (cfg.dim, cfg.ffn_dim),
        "w_down": (cfg.ffn_dim, cfg.dim),
    }


def fuse_qkv(layer: dict, dtype=jnp.float32) -> dict:
    """A layer with ``wq``, ``wk``, ``wv`` -> the same layer with one ``wqkv`` (K, Nq + 2 Nkv).

    Quantization groups run along K, so projections stored in one form (bits, group, with or without
    mins: GGUF Q4_0 and Q4_1 agree) concatenate along N unchanged and stay packed. Projections stored
    in different forms are dequantized to ``dtype`` first: exact, at the cost of memory for that file.
    """
    parts = [layer[name] for name in ("wq", "wk", "wv")]
    rest = {name: w for name, w in layer.items() if name not in ("wq", "wk", "wv")}
    if all(type(w).__name__ == "BlockWeight" for w in parts):  # row blocks: N is the leading axis
        if len({w.format for w in parts}) == 1:
            return {"wqkv": type(parts[0])(np.concatenate([w.blocks for w in parts]), parts[0].format), **rest}
        from kernels.cpu.qmatmul import dequantize as block_dequantize

        parts = [np.asarray(block_dequantize(w)).astype(dtype) for w in parts]
    forms = {(w.bits, w.group, w.mins is None) if isinstance(w, QuantizedWeight) else "dense" for w in parts}
    xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(parts)) else jnp  # host arrays stay on host
    if len(forms) == 1 and forms != {"dense"}:
        fused = QuantizedWeight(
            xp.concatenate([w.packed for w in parts], axis=-1), xp.concatenate([w.scales for w in parts], axis=-1),
            None if parts[0].mins is None else xp.concatenate([w.mins for w in parts], axis=-1),
            parts[0].bits, parts[0].group)
    else:
        fused = xp.concatenate([xp.asarray(dequantize(w, dtype)) if isinstance(w, QuantizedWeight) else w.astype(dtype)
                                for w in parts], axis=-1)
    return {"wqkv": fused, **rest}


def split_qkv(x: jax.Array, cfg: LlamaConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The output (..., Nq + 2 Nkv) of the fused projection -> q, k, v along the last axis.

    The sizes follow from x's width and the config's query heads per KV head, so the same split
    serves a device holding a slice of the heads (``models.llama.sharding``)."""
    nkv = x.shape[-1] // (cfg.n_heads // cfg.n_kv_heads + 2)
    nq = x.shape[-1] - 2 * nkv
    return x[..., :nq], x[..., nq:nq + nkv], x[..., nq + nkv:]


def stack_layers(layers: list[dict]) -> dict:
    """[{name: array or QuantizedWeight}] per layer -> {name: stacked along a new layer axis} (for
    ``lax.scan``); all layers must agree in form. Host (numpy) layers are stacked on the host."""
    out = {}
    for name in layers[0]:
        kinds = {jax.tree.structure(layer[name]) for layer in layers}
        if len(kinds) > 1:
            raise ValueError(f"tensor {name!r} has different types across layers; "
                             "mixed-precision checkpoints are not supported, requantize to one type")
        leaves = jax.tree.leaves([layer[name] for layer in layers])
        stack = np.stack if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack
        out[name] = jax.tree.map(lambda *xs, stack=stack: stack(xs), *[layer[name] for layer in layers])
    return out


def layer(params: dict, i: int) -> dict:
    """Layer ``i``'s weights, whether the layers are a list or stacked along a leading axis."""
    layers = params["layers"]
    return layers[i] if isinstance(layers, list) else jax.tree.map(lambda a: a[i], layers)


def init_params(cfg: LlamaConfig, key: jax.Array, *, dtype=jnp.float32, bits: int | None = None,
                group: int = 32) -> dict:
    """Random weights (std 0.02, norms near 1), optionally group-quantized: for tests and benchmarks."""
    shapes = matrix_shapes(cfg)

    def matrix(k, shape):
        w = jax.random.normal(k, shape, jnp.float32) * 0.02
        return w.astype(dtype) if bits is None else quantize(w, bits=bits, group=group)

    layers = []
    keys = jax.random.split(key, cfg.n_layers + 2)
    for i in range(cfg.n_layers):
        ks = jax.random.split(keys[i], len(LAYER_MATRICES) + 2)
        layer = {name: matrix(k, shapes[name]) for name, k in zip(LAYER_MATRICES, ks)}
        layer["attn_norm"] = (1.0 + 0.1 * jax.random.normal(ks[-2], (cfg.dim,))).astype(jnp.float32)
        layer["ffn_norm"] = (1.0 + 0.1 * jax.random.normal(ks[-1], (cfg.dim,))).astype(jnp.float32)
        layers.append(fuse_qkv(layer, dtype))
    ke, ko = jax.random.split(keys[-1])
    embed = jax.random.normal(ke, (cfg.dim, cfg.vocab_size), jnp.float32) * 0.02
    embed = embed.astype(dtype) if bits is None else quantize(embed, bits=8, group=group)
    output = None if cfg.tie_embeddings else matrix(ko, (cfg.dim, cfg.vocab_size))
    return {"embed": embed, "output": output, "norm": jnp.ones((cfg.dim,), jnp.float32),
            "layers": layers}


def weight_bytes(params: dict) -> int:
    """Bytes of weights one decode step streams from memory: everything but an untied embedding
    table (of which only one row is read)."""
    streamed = params if params["output"] is None else {k: v for k, v in params.items() if k != "embed"}
    total = 0
    for leaf in jax.tree.leaves(streamed, is_leaf=lambda x: isinstance(x, QuantizedWeight)):
        total += leaf.nbytes if isinstance(leaf, QuantizedWeight) else int(leaf.size * leaf.dtype.itemsize)
    return total
