"""Will a LLaMA fit? Bytes per device of weights, KV cache and activations for a model, a weight
format, a context, a batch and a device layout, computed from shapes alone before anything is loaded.

Weights: the parameter pytree the loaders build, as shapes (``jax.eval_shape``), split by the same
rules ``models.llama.sharding`` places them with, so the plan is the placement's byte count
(zero heads included where tensor parallelism pads the heads: ``sharding.split_heads``).
KV cache: ``forward.init_cache`` at the context rounded up as ``generate`` rounds it.
Activations: an upper bound of one prefill of ``prompt`` tokens, the largest step: the residual
stream (3 x T x dim), the fused q/k/v output, the attention output, the MLP's gate, up and product
(3 x T x ffn / M) and the f32 logits (T x vocab / M), plus on the ``xla`` path the attention scores
it materializes (heads / M x T x T, f32); heads as padded. Fused kernels keep scores on chip.
Weights are counted in the packed layout of the xla and pallas paths (a Q4_0 block carries its min,
20 bytes per 32 weights); the cpu path keeps llama.cpp's 18-byte Q4_0 blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib

import jax
import jax.numpy as jnp

from kernels.llm.w4a16 import QuantizedWeight
from models.llama import sharding
from models.llama.config import LLAMA2_7B, LLAMA2_13B, LLAMA2_70B, LlamaConfig
from models.llama.params import fuse_qkv, init_params
from models.llama.sharding import Layout

# A weight format: (dtype of dense weights and activations, bits of the packed layer matrices).
FORMATS = {"f32": (jnp.float32, None), "bf16": (jnp.bfloat16, None), "w8a16": (jnp.bfloat16, 8),
           "w4a16": (jnp.bfloat16, 4)}
# The share of a device's memory a plan may fill: the rest is left to XLA's scratch buffers,
# compiled programs and allocator fragmentation.
HEADROOM = 0.9
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device (the most loaded one) of a sharded run, against a budget."""

    layout: Layout
    context: int  # cache positions per sequence (rounded as generate rounds them)
    batch: int  # sequences per device
    prompt: int  # prefill tokens the activations are sized for
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    budget_bytes: int | None = None  # one device's memory; None: unknown
    padding: str | None = None  # how tensor parallelism pads the heads (sharding.padding_note), if it does

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def usable_bytes(self) -> int | None:
        return None if self.budget_bytes is None else int(self.budget_bytes * HEADROOM)

    @property
    def fits(self) -> bool:
        return self.usable_bytes is None or self.total_bytes <= self.usable_bytes

    def describe(self) -> str:
        budget = ("unknown" if self.budget_bytes is None else
                  f"{self.budget_bytes / GB:.2f} GB ({HEADROOM:.0%} usable: {self.usable_bytes / GB:.2f} GB)")
        return (f"plan per device, --devices {self.layout} (data x model), {self.batch} sequence(s) of "
                f"{self.context} positions per device:\n"
                f"  weights {self.weight_bytes / GB:.3f} GB + KV cache {self.kv_cache_bytes / GB:.3f} GB + "
                f"activations {self.activation_bytes / GB:.3f} GB (prefill of {self.prompt}) = "
                f"{self.total_bytes / GB:.3f} GB of {budget}" + ("" if self.padding is None else f"\n  {self.padding}"))

    def check(self) -> None:
        """Raise a ValueError with the numbers when the plan does not fit its budget."""
        if not self.fits:
            raise ValueError(
                f"the model does not fit: {self.total_bytes / GB:.2f} GB per device (weights "
                f"{self.weight_bytes / GB:.2f} + KV cache {self.kv_cache_bytes / GB:.2f} + activations "
                f"{self.activation_bytes / GB:.2f}) > {self.usable_bytes / GB:.2f} GB usable of "
                f"{self.budget_bytes / GB:.2f} GB; use more devices (--devices), a packed format, "
                "a shorter context or a smaller batch")


# ---------------------------------------------------------------------------------------------
# Parameter shapes without the parameters
# ---------------------------------------------------------------------------------------------


def abstract_params(cfg: LlamaConfig, fmt: str = "bf16", *, group: int = 128) -> dict:
    """The shapes (``jax.ShapeDtypeStruct``) of ``init_params`` in format ``fmt`` (packed layer
    matrices, an 8-bit embedding), as a safetensors folder loads at that dtype (or quantized)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    dtype, bits = FORMATS[fmt]
    one = jax.eval_shape(functools.partial(init_params, dataclasses.replace(cfg, n_layers=1), dtype=dtype, bits=bits,
                                           group=group), jax.random.key(0))
    return {**one, "layers": one["layers"] * cfg.n_layers}  # every layer has the first one's shapes


def _abstract_gguf_tensor(t, dtype) -> jax.ShapeDtypeStruct | QuantizedWeight:
    """The form ``gguf_loader`` gives tensor ``t`` (dense in ``dtype``, norms f32, packed K-major)."""
    k, n = t.shape[0], math.prod(t.shape[1:])
    kind = t.type_name
    if kind in ("F32", "F16", "BF16"):
        return jax.ShapeDtypeStruct((k,), jnp.float32) if len(t.shape) == 1 else jax.ShapeDtypeStruct((k, n), dtype)
    scales = jax.ShapeDtypeStruct((k // 32, n), jnp.float16)
    if kind == "Q8_0":
        return QuantizedWeight(jax.ShapeDtypeStruct((k // 32, 32, n), jnp.int8), scales, None, 8, 32)
    if kind in ("Q4_0", "Q4_1"):
        return QuantizedWeight(jax.ShapeDtypeStruct((k // 32, 16, n), jnp.uint8), scales, scales, 4, 32)
    raise ValueError(f"tensor {t.name!r} has type {kind}, which the loader does not read")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint's header tells before any weight is read."""

    path: pathlib.Path
    config: LlamaConfig
    shapes: dict  # the parameter pytree the loader will build, as ShapeDtypeStructs
    tokenizer: object  # models.llama.tokenizer.Tokenizer


def read_checkpoint(path: str | pathlib.Path | None, dtype=jnp.float32) -> Checkpoint:
    """The config, parameter shapes and tokenizer of a .gguf file or safetensors folder (None: the
    bundled model), from its header, config and tokenizer files alone."""
    from models.llama import gguf_loader, tokenizer

    path = gguf_loader.bundled_model_path() if path is None else pathlib.Path(path)
    if path.is_dir():
        import json

        from models.llama.safetensors_loader import config_from_hf

        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{path} has no config.json; expected a Hugging Face LlamaForCausalLM folder")
        cfg = config_from_hf(json.loads(cfg_path.read_text()))
        fmt = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16"}.get(jnp.dtype(dtype))
        if fmt is None:
            raise ValueError(f"dtype {jnp.dtype(dtype).name} is not one of float32, bfloat16")
        return Checkpoint(path, cfg, abstract_params(cfg, fmt), tokenizer.from_hf_folder(path))
    gguf = gguf_loader.read_gguf(path)
    tensors = gguf.tensors
    cfg = gguf_loader.config_from_metadata(gguf.metadata, has_output="output.weight" in tensors)
    missing = [name for name in gguf_loader.expected_shapes(cfg) if name not in tensors]
    if missing:
        raise ValueError(f"GGUF file {path} lacks tensor {missing[0]!r}; it is incomplete or not a LLaMA model")

    def tensor(name):
        return _abstract_gguf_tensor(tensors[name], jnp.dtype(dtype))

    fused = {}  # layers of one type signature share one abstract fused layer

    def layer(i):
        names = {ours: f"blk.{i}.{theirs}.weight" for ours, theirs in gguf_loader._LAYER_TENSORS.items()}
        kinds = tuple(tensors[name].type_id for name in names.values())
        if kinds not in fused:
            raw = {ours: tensor(name) for ours, name in names.items()}
            fused[kinds] = jax.eval_shape(functools.partial(fuse_qkv, dtype=jnp.dtype(dtype)), raw)
        return fused[kinds]

    shapes = {"embed": tensor("token_embd.weight"),
              "output": None if cfg.tie_embeddings else tensor("output.weight"),
              "norm": tensor("output_norm.weight"), "layers": [layer(i) for i in range(cfg.n_layers)]}
    return Checkpoint(path, cfg, shapes, tokenizer.from_gguf_metadata(gguf.metadata))


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def _nbytes(a) -> int:
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize


def weight_bytes_per_device(params: dict, cfg: LlamaConfig, layout: Layout) -> int:
    """Bytes of the parameters (arrays or shapes) one device holds under ``sharding.param_specs``,
    with the zero heads ``sharding.split_heads`` pads them with."""
    if sharding.padded_config(cfg, layout.model) is not cfg:
        params = jax.eval_shape(functools.partial(sharding.split_heads, cfg=cfg, model=layout.model), params)
    specs = jax.tree.leaves(sharding.param_specs(params), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    total = 0
    for leaf, spec in zip(jax.tree.leaves(params), specs, strict=True):
        total += _nbytes(leaf) // (layout.model if sharding.MODEL in spec else 1)
    return total


def plan(cfg: LlamaConfig, params: dict, *, context: int, batch: int = 1, layout: Layout | None = None,
         dtype=jnp.bfloat16, path: str = "pallas", prompt: int | None = None, budget_bytes: int | None = None) -> Plan:
    """The per-device bytes of generating ``batch`` sequences of up to ``context`` positions (prompt
    ``prompt`` tokens, default the whole context) with ``params`` (arrays or ``abstract_params``)
    laid out by ``layout``; activations and cache in ``dtype``. Raises the layout's divisibility error."""
    from models.llama.generate import CACHE_MULTIPLE

    layout = layout or Layout()
    sharding.check_layout(cfg, layout, group=sharding.quantization_group(params))
    m, a = layout.model, jnp.dtype(dtype).itemsize
    b = math.ceil(batch / layout.data)
    positions = -(-context // CACHE_MULTIPLE) * CACHE_MULTIPLE
    t = context if prompt is None else prompt
    padded = sharding.padded_config(cfg, m)  # zero heads count: they are computed and stored
    hd, hq, hkv = cfg.head_dim, padded.n_heads // m, padded.n_kv_heads // m
    kv = 2 * cfg.n_layers * b * hkv * positions * hd * a
    rows = b * t
    activations = rows * a * (3 * cfg.dim + (hq + 2 * hkv) * hd + hq * hd + 3 * cfg.ffn_dim // m)
    activations += rows * cfg.vocab_size // m * 4
    if path == "xla":
        activations += b * hq * t * t * 4
    return Plan(layout, positions, b, t, weight_bytes_per_device(params, cfg, layout), kv, activations, budget_bytes,
                sharding.padding_note(cfg, m))


def device_memory_bytes(devices=None) -> int | None:
    """One device's memory limit: the allocator's ``bytes_limit`` where the backend reports one; on a
    CPU, physical memory shared by all ``devices``."""
    devices = jax.devices() if devices is None else list(devices)
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return physical // len(devices)


# ---------------------------------------------------------------------------------------------
# The README's table
# ---------------------------------------------------------------------------------------------

PUBLISHED = {"LLaMA-2-7B": LLAMA2_7B, "LLaMA-2-13B": LLAMA2_13B, "LLaMA-2-70B": LLAMA2_70B}
DEVICE_MEMORY = {"80 GB": 80 * GB, "141 GB": 141 * GB}  # H100 / A100 80GB, H200 (vendor figures)


def fewest_devices(cfg: LlamaConfig, params: dict, budget_bytes: int, **kwargs) -> Plan | None:
    """The plan over the fewest tensor-parallel devices (that divide the model) within budget."""
    group = sharding.quantization_group(params)
    for m in sharding.valid_model_sizes(cfg, group):
        p = plan(cfg, params, layout=Layout(1, m), budget_bytes=budget_bytes, **kwargs)
        if p.fits:
            return p
    return None


def readme_table(*, context: int = 4096, batch: int = 1, group: int = 128) -> str:
    """The README's table: LLaMA-2 7B/13B/70B in bf16 and W4A16 on 80 GB and 141 GB devices, fused
    (pallas) path, prefill of the whole context. ``python -m models.llama plan --table`` prints it."""
    head = ["model", "format", "weights", f"KV cache ({context})"]
    for mem in DEVICE_MEMORY:
        head += [f"devices ({mem})", f"per device ({mem})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cfg in PUBLISHED.items():
        for fmt in ("bf16", "w4a16"):
            params = abstract_params(cfg, fmt, group=group)
            one = plan(cfg, params, context=context, batch=batch)
            row = [name, fmt if fmt == "bf16" else f"W4A16 g{group}", f"{one.weight_bytes / GB:.1f} GB",
                   f"{one.kv_cache_bytes / GB:.2f} GB"]
            for budget in DEVICE_MEMORY.values():
                best = fewest_devices(cfg, params, int(budget), context=context, batch=batch)
                row += ["-", "-"] if best is None else [str(best.layout.model), f"{best.total_bytes / GB:.1f} GB"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)

