"""LLaMA-architecture decoders in JAX: GGUF / safetensors loading, tokenizer, KV-cache generation,
and three execution paths (``xla`` references, ``pallas`` fused kernels, ``cpu`` compiled kernels)."""
from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp

from models.llama.config import LlamaConfig


@dataclasses.dataclass
class Model:
    config: LlamaConfig
    params: dict  # laid out for ``path`` (``forward.prepare``)
    tokenizer: object  # models.llama.tokenizer.Tokenizer
    source: str
    path: str = "xla"


def load(path: str | pathlib.Path | None = None, *, dtype=jnp.float32, execution: str = "xla", mesh=None,
         tokenizer=None) -> Model:
    """A .gguf file, a safetensors checkpoint folder, or (None) the bundled SmolLM2-135M-Instruct,
    with its weights laid out once for the ``execution`` path (``models.llama.forward.PATHS``), split
    across ``mesh`` if one is given (``models.llama.sharding``). ``tokenizer``: one already built
    from this checkpoint (``models.llama.fit.read_checkpoint``)."""
    from models.llama import forward, gguf_loader, sharding
    from models.llama import tokenizer as tokenizers

    forward.ops_for(execution)  # an unknown path fails before anything is read
    if path is None:
        path = gguf_loader.bundled_model_path()
    path = pathlib.Path(path)
    if path.is_dir():
        from models.llama.safetensors_loader import load_safetensors

        cfg, params = load_safetensors(path, dtype=dtype)
        tok = tokenizer if tokenizer is not None else tokenizers.from_hf_folder(path)
    else:
        m = gguf_loader.load_gguf(path, dtype=dtype, blocks=execution == "cpu")
        tok = tokenizer if tokenizer is not None else tokenizers.from_gguf_metadata(m.metadata)
        cfg, params = m.config, m.params
    if mesh is not None:
        return Model(cfg, sharding.prepare(params, cfg, execution, mesh), tok, str(path), execution)
    return Model(cfg, forward.prepare(params, cfg, execution), tok, str(path), execution)
