"""LLaMA across devices with JAX's own SPMD machinery: a 2-D ``Mesh`` (data x model), weights placed
with ``NamedSharding``, and the forward pass of ``models.llama.forward`` run per device by ``shard_map``.

Tensor parallelism on the ``model`` axis (Megatron-LM's split, Shoeybi et al. 2019): the fused q/k/v
projection, the MLP's gate and up projections, the embedding and the output projection are split
along N (attention heads and KV heads, MLP columns, vocabulary), ``wo`` and ``w_down`` along K, so
each attention block and each MLP ends in one all-reduce (``psum``, which XLA lowers to its
collective). The KV cache is split by KV head. Packed 4- and 8-bit weights are split along N, or
along K by whole quantization groups, so no group is ever cut. Data parallelism on the ``data``
axis: the batch of prompts (and the cache rows) split across replicas of the weights.

The fused projection holds [q heads | k heads | v heads] along N; split in N contiguous blocks,
device d would get q heads only. ``prepare`` re-orders its columns once at load into
[q, k, v of device 0 | q, k, v of device 1 | ...], so each device's block is a fused projection of its
own heads, and the per-device forward pass is the single-device one, unchanged.

A device count that does not divide the KV heads is served by padding with zero heads at placement
(``padded_config``, ``split_heads``): KV heads up to a multiple of it, query heads in the model's ratio,
zero q/k/v columns and zero ``wo`` rows. A zero query scores every key 0, so softmax spreads evenly
over zero values (no NaN), and the zero rows of ``wo`` make its contribution exactly zero; the sharded
passes and the cache run with the padded config, and ``models.llama.fit`` counts the padded bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kernels.llm.w4a16 import QuantizedWeight
from models.llama import forward
from models.llama.config import LlamaConfig

DATA, MODEL = "data", "model"
CACHE_SPEC = P(None, DATA, MODEL, None, None)  # (layers, batch, kv_heads, positions, head_dim)
COLUMN_SPLIT = ("wqkv", "w_gate", "w_up")  # split along N: heads, MLP columns
ROW_SPLIT = ("wo", "w_down")  # split along K: their outputs are partial sums, added by one all-reduce


@dataclasses.dataclass(frozen=True)
class Layout:
    """How many devices hold replicas of the weights (``data``: each its share of the batch) and
    how many split each replica (``model``: tensor parallelism)."""

    data: int = 1
    model: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.model

    def __str__(self) -> str:
        return f"{self.data}x{self.model}"


def parse_devices(text: str) -> Layout:
    """``--devices``: ``N`` is N-way tensor parallelism; ``DxM`` is D data-parallel replicas of an
    M-way tensor-parallel model (``4`` = ``1x4``; ``4x1``: data parallelism only)."""
    parts = str(text).lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or any(s < 1 for s in sizes):
        raise ValueError(f"--devices {text!r} is not N (tensor parallel) or DxM (data x model), "
                         "e.g. 4 or 2x2, with positive integers")
    return Layout(1, sizes[0]) if len(sizes) == 1 else Layout(*sizes)


def make_mesh(layout: Layout, devices=None) -> Mesh:
    """A (data, model) mesh over the first ``layout.devices`` devices."""
    available = jax.devices() if devices is None else list(devices)
    if layout.devices > len(available):
        hint = (f"; on a CPU, start Python with XLA_FLAGS=--xla_force_host_platform_device_count={layout.devices}"
                if available[0].platform == "cpu" else "")
        raise ValueError(f"--devices {layout} needs {layout.devices} devices, but this machine has "
                         f"{len(available)} ({available[0].platform}){hint}")
    # Auto axes: inputs placed otherwise (a token batch on one device) are resharded by XLA on entry.
    return jax.make_mesh((layout.data, layout.model), (DATA, MODEL), (AxisType.Auto, AxisType.Auto),
                         devices=available[:layout.devices])


def layout_of(mesh: Mesh) -> Layout:
    return Layout(mesh.shape[DATA], mesh.shape[MODEL])


# ---------------------------------------------------------------------------------------------
# Which sizes a tensor-parallel split must divide
# ---------------------------------------------------------------------------------------------


def quantization_group(params: dict) -> int | None:
    """The (largest) quantization group of the packed layer matrices, None when all are dense."""
    leaves = jax.tree.leaves(params["layers"], is_leaf=lambda x: isinstance(x, QuantizedWeight))
    groups = {w.group for w in leaves if isinstance(w, QuantizedWeight)}
    return max(groups) if groups else None


def padded_config(cfg: LlamaConfig, model: int) -> LlamaConfig:
    """The config of ``model``-way tensor parallelism: KV heads padded with zero heads to a multiple
    of ``model``, query heads to keep the checkpoint's query heads per KV head (9/3 -> 12/4 for 2 or
    4 devices). ``cfg`` itself when ``model`` divides the KV heads (or ``cfg`` is already padded)."""
    n_kv_heads = -(-cfg.n_kv_heads // model) * model
    if n_kv_heads == cfg.n_kv_heads:
        return cfg
    ratio = cfg.n_heads // cfg.n_kv_heads
    return dataclasses.replace(cfg, n_heads=n_kv_heads * ratio, n_kv_heads=n_kv_heads,
                               unpadded_heads=cfg.unpadded_heads or (cfg.n_heads, cfg.n_kv_heads))


def padding_note(cfg: LlamaConfig, model: int) -> str | None:
    """One line saying how ``model``-way tensor parallelism pads the heads, and what it costs; None
    when nothing is padded."""
    padded = padded_config(cfg, model)
    if padded is cfg:
        return None
    return (f"{cfg.n_heads}/{cfg.n_kv_heads} heads padded to {padded.n_heads}/{padded.n_kv_heads} for "
            f"{model}-way tensor parallelism (attention does {padded.n_heads / cfg.n_heads:.2f}x the work)")


def unsplittable_sizes(cfg: LlamaConfig, model: int, group: int | None = None) -> dict[str, int]:
    """The sizes ``model``-way tensor parallelism must divide and does not: the MLP width, the
    vocabulary and (packed weights) the quantization groups along the K of ``wo`` and ``w_down``.
    Heads never: ``padded_config`` pads them, which for packed weights needs whole groups per head."""
    padded = padded_config(cfg, model)
    sizes = {"MLP width": cfg.ffn_dim, "vocabulary": cfg.vocab_size}
    if group:
        if padded is not cfg and cfg.head_dim % group:  # a zero head would cut a group of wo's K
            sizes["KV heads"] = cfg.n_kv_heads
        sizes[f"groups of {group} in the attention output's K"] = padded.n_heads * cfg.head_dim // group
        sizes[f"groups of {group} in the MLP's K"] = cfg.ffn_dim // group
    return {name: n for name, n in sizes.items() if n % model}


def valid_model_sizes(cfg: LlamaConfig, group: int | None = None, *, up_to: int = 64) -> list[int]:
    return [m for m in range(1, up_to + 1) if not unsplittable_sizes(cfg, m, group)]


def check_layout(cfg: LlamaConfig, layout: Layout, *, group: int | None = None) -> None:
    """Raise one ValueError naming every size the tensor-parallel split does not divide."""
    m = layout.model
    bad = unsplittable_sizes(cfg, m, group)
    if bad:
        listed = ", ".join(f"{name} ({n})" for name, n in bad.items())
        if "KV heads" in bad:
            listed += (f" (zero heads pad the KV heads only when head_dim {cfg.head_dim} is a multiple of the "
                       f"quantization group {group})")
        raise ValueError(f"tensor parallelism over {m} devices must divide {listed}; this model splits over "
                         f"{', '.join(map(str, valid_model_sizes(cfg, group)))} devices "
                         f"(--devices DxM with M among these)")


def check_path(path: str) -> None:
    """The execution paths that run sharded: ``xla`` and ``pallas``."""
    if path in forward.CPU_PATHS:
        raise ValueError(f"the {path} path's compiled kernels run unsharded on the host (host devices of a sharded "
                         "run share the same cores); drop --devices or choose --path xla or pallas")


# ---------------------------------------------------------------------------------------------
# Weight placement
# ---------------------------------------------------------------------------------------------


def _on(a, axis: int) -> P:
    """The spec splitting array ``a`` along ``axis`` (negative: from the end) over the model axis."""
    spec = [None] * len(a.shape)
    spec[axis] = MODEL
    return P(*spec)


def weight_spec(w, split: str | None):
    """PartitionSpecs for one weight (dense (..., K, N) or ``QuantizedWeight``), split along N
    (``"column"``), along K (``"row"``: whole quantization groups) or replicated (None)."""
    if split is None:
        return jax.tree.map(lambda a: P(), w)
    if isinstance(w, QuantizedWeight):  # packed (..., K/g, g', N), scales and mins (..., K/g, N)
        packed_axis, scale_axis = (-1, -1) if split == "column" else (-3, -2)
        return QuantizedWeight(_on(w.packed, packed_axis), _on(w.scales, scale_axis),
                               None if w.mins is None else _on(w.mins, scale_axis), w.bits, w.group)
    return _on(w, -1 if split == "column" else -2)


def param_specs(params: dict) -> dict:
    """The PartitionSpec pytree of a LLaMA parameter pytree (layers listed or stacked)."""
    def layer_specs(layer: dict) -> dict:
        return {name: weight_spec(w, "column" if name in COLUMN_SPLIT else "row" if name in ROW_SPLIT else None)
                for name, w in layer.items()}

    layers = params["layers"]
    return {
        "embed": weight_spec(params["embed"], "column"),  # (dim, vocab): split by vocabulary
        "output": None if params["output"] is None else weight_spec(params["output"], "column"),
        "norm": P(),
        "layers": [layer_specs(lp) for lp in layers] if isinstance(layers, list) else layer_specs(layers),
    }


def _take_columns(w, order: np.ndarray):
    """``w``'s N columns (the last axis of every field of a dense or packed weight) in ``order``;
    -1 takes a zero column (a packed column of zero codes, zero scale and zero min is zero)."""
    def take(a):
        taken = a[..., np.maximum(order, 0)]
        if (order >= 0).all():
            return taken
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.where(order >= 0, taken, xp.zeros((), a.dtype))
    return jax.tree.map(take, w)


def _append_zeros(a, axis: int, count: int):
    xp = np if isinstance(a, np.ndarray) else jnp
    shape = list(a.shape)
    shape[axis] = count
    return xp.concatenate([a, xp.zeros(shape, a.dtype)], axis=axis)


def interleave_qkv(w, cfg: LlamaConfig, model: int):
    """Re-order the fused projection's N columns [q | k | v] into ``model`` blocks of [q | k | v] heads,
    after appending to q, k and v the zero heads of ``padded_config`` (the padded query heads come
    last, so they share the padded KV heads; zero keys and values make them attend to zeros)."""
    if model == 1:
        return w
    hd, padded = cfg.head_dim, padded_config(cfg, model)
    nq, nkv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    zeros_q = np.full((padded.n_heads - cfg.n_heads) * hd, -1)
    zeros_kv = np.full((padded.n_kv_heads - cfg.n_kv_heads) * hd, -1)
    q = np.concatenate([np.arange(nq), zeros_q])
    k = np.concatenate([nq + np.arange(nkv), zeros_kv])
    v = np.concatenate([nq + nkv + np.arange(nkv), zeros_kv])
    order = np.concatenate([q.reshape(model, -1), k.reshape(model, -1), v.reshape(model, -1)], axis=1).reshape(-1)
    return _take_columns(w, order)


def pad_attention_output(w, cfg: LlamaConfig, model: int):
    """``wo`` with zero rows of K for the zero query heads of ``padded_config`` (appended last, as
    ``interleave_qkv`` appends the heads): their attention output meets zeros, so they add nothing.
    Packed weights get whole zero groups (zero codes, scales and mins)."""
    rows = (padded_config(cfg, model).n_heads - cfg.n_heads) * cfg.head_dim
    if rows == 0:
        return w
    if isinstance(w, QuantizedWeight):  # packed (..., K/g, g', N), scales and mins (..., K/g, N)
        if rows % w.group:
            raise ValueError(f"padding {cfg.n_heads} heads for {model}-way tensor parallelism needs head_dim "
                             f"{cfg.head_dim} to be a multiple of the quantization group {w.group}")
        groups = rows // w.group
        return QuantizedWeight(_append_zeros(w.packed, -3, groups), _append_zeros(w.scales, -2, groups),
                               None if w.mins is None else _append_zeros(w.mins, -2, groups), w.bits, w.group)
    return _append_zeros(w, -2, rows)


def split_heads(params: dict, cfg: LlamaConfig, model: int) -> dict:
    """The weights as ``model``-way tensor parallelism places them: the heads padded (``padded_config``)
    and each device's q/k/v block made contiguous. Arrays or shapes (``jax.eval_shape``), layers listed
    or stacked; host arrays stay on the host."""
    def split(layer: dict) -> dict:
        return {**layer, "wqkv": interleave_qkv(layer["wqkv"], cfg, model),
                "wo": pad_attention_output(layer["wo"], cfg, model)}

    layers = params["layers"]
    return {**params, "layers": [split(lp) for lp in layers] if isinstance(layers, list) else split(layers)}


def _placed_layout(params: dict) -> Layout | None:
    leaf = jax.tree.leaves(params["layers"])[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and MODEL in sharding.mesh.shape:
        return layout_of(sharding.mesh)
    return None


def prepare(params: dict, cfg: LlamaConfig, path: str, mesh: Mesh) -> dict:
    """Lay the weights out for ``path`` and place them across ``mesh``: each device receives only
    its share (host arrays go straight to their devices). Idempotent for weights already placed."""
    layout = layout_of(mesh)
    check_path(path)
    check_layout(cfg, layout, group=quantization_group(params))
    placed = _placed_layout(params)
    if placed is not None and placed.model != layout.model:
        raise ValueError(f"these weights are split for {placed.model}-way tensor parallelism; "
                         f"load the model again for --devices {layout}")
    if placed is None:
        params = forward.lay_out(split_heads(params, cfg, layout.model), padded_config(cfg, layout.model), path)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params))
    return jax.device_put(params, shardings)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, mesh: Mesh, dtype=jnp.float32) -> dict:
    """``forward.init_cache`` split by batch row (data) and KV head (model), created on the devices."""
    layout = layout_of(mesh)
    if batch % layout.data:
        raise ValueError(f"a batch of {batch} does not split over {layout.data} data-parallel replicas; "
                         f"pad it to {padded_batch(batch, layout)} (generate does)")
    sharding = NamedSharding(mesh, CACHE_SPEC)
    cfg = padded_config(cfg, layout.model)
    make = jax.jit(functools.partial(forward.init_cache, cfg, batch, max_len, dtype),
                   out_shardings={"k": sharding, "v": sharding})
    return make()


def per_device_bytes(tree, device=None) -> int:
    """Bytes of ``tree``'s arrays held by one device (the first of the mesh by default)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shards = leaf.addressable_shards
        dev = shards[0].device if device is None else device
        total += sum(s.data.nbytes for s in shards if s.device == dev)
    return total


# ---------------------------------------------------------------------------------------------
# The sharded forward pass
# ---------------------------------------------------------------------------------------------


def _vocab_parallel_embedding(embedding):
    """A lookup into this device's slice of the vocabulary: rows of other slices are zero, and the
    all-reduce leaves each row from its one owner (exact: the other terms are zeros)."""
    def lookup(w, ids, dtype=jnp.float32):
        local = w.shape[-1]
        ids = ids - jax.lax.axis_index(MODEL) * local
        mine = (ids >= 0) & (ids < local)
        rows = embedding(w, jnp.where(mine, ids, 0), dtype)
        return jax.lax.psum(jnp.where(mine[..., None], rows, jnp.zeros_like(rows)), MODEL)
    return lookup


def _row_parallel_residual(linear_residual):
    """``h + x @ W`` with W split along K (``wo``, ``w_down``): each device's product is a partial sum,
    added across the model axis by one all-reduce. The residual joins in the fused unit (the pallas
    GEMV adds it in its epilogue), so only the axis' first device passes it in and the others pass
    zeros: the all-reduce then counts it once, psum(p_i + [i == 0] h) = h + sum(p_i), not N times."""
    def apply(x, w, h):
        mine = jnp.where(jax.lax.axis_index(MODEL) == 0, h, jnp.zeros_like(h))
        return jax.lax.psum(linear_residual(x, w, mine), MODEL)
    return apply


@functools.cache
def tensor_parallel_ops(path: str) -> forward.Ops:
    """``path``'s ops with the all-reduces of tensor parallelism (traced inside ``shard_map``)."""
    ops = forward.ops_for(path)
    return dataclasses.replace(ops, linear_residual=_row_parallel_residual(ops.linear_residual),
                               embedding=_vocab_parallel_embedding(ops.embedding))


def _sharded(body, mesh: Mesh, params: dict, in_specs: tuple, out_specs):
    # check_vma=False: the Pallas kernels do not declare how their outputs vary across the mesh.
    return jax.shard_map(body, mesh=mesh, in_specs=(param_specs(params), *in_specs), out_specs=out_specs,
                         check_vma=False)


@functools.partial(jax.jit, static_argnames=("cfg", "path", "mesh"), donate_argnames=("cache",))
def prefill(params: dict, tokens: jax.Array, cache: dict, *, cfg: LlamaConfig, path: str, mesh: Mesh,
            lengths: jax.Array | None = None):
    """``forward.prefill`` with weights and cache placed by ``prepare``/``init_cache`` on ``mesh``;
    the logits come back split by vocabulary (XLA gathers what a consumer needs)."""
    cache_specs = {"k": CACHE_SPEC, "v": CACHE_SPEC}
    ops = tensor_parallel_ops(path)
    cfg = padded_config(cfg, layout_of(mesh).model)

    def body(params, tokens, cache, lengths=None):
        return forward.run_prefill(ops, params, tokens, cache, cfg, lengths)

    if lengths is None:
        run = _sharded(body, mesh, params, (P(DATA, None), cache_specs), (P(DATA, None, MODEL), cache_specs))
        return run(params, tokens, cache)
    run = _sharded(body, mesh, params, (P(DATA, None), cache_specs, P(DATA)), (P(DATA, None, MODEL), cache_specs))
    return run(params, tokens, cache, lengths)


@functools.partial(jax.jit, static_argnames=("cfg", "path", "mesh"), donate_argnames=("cache",))
def decode(params: dict, tokens: jax.Array, positions: jax.Array, cache: dict, *, cfg: LlamaConfig, path: str,
           mesh: Mesh):
    """``forward.decode`` on ``mesh`` (see ``prefill``)."""
    cache_specs = {"k": CACHE_SPEC, "v": CACHE_SPEC}
    body = functools.partial(forward.run_decode, tensor_parallel_ops(path), cfg=padded_config(cfg, layout_of(mesh).model))
    run = _sharded(body, mesh, params, (P(DATA), P(DATA), cache_specs), (P(DATA, MODEL), cache_specs))
    return run(params, tokens, positions, cache)


def padded_batch(batch: int, layout: Layout) -> int:
    """The batch rounded up to a multiple of the data-parallel size (extra rows are discarded)."""
    return math.ceil(batch / layout.data) * layout.data
