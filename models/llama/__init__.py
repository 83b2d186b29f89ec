"""LLaMA-architecture decoders in JAX: GGUF / safetensors loading, tokenizer, KV-cache generation,
and two execution paths (``xla`` references, ``pallas`` fused kernels)."""
from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp

from models.llama.config import LlamaConfig


@dataclasses.dataclass
class Model:
    config: LlamaConfig
    params: dict
    tokenizer: object  # models.llama.tokenizer.Tokenizer
    source: str


def load(path: str | pathlib.Path | None = None, *, dtype=jnp.float32) -> Model:
    """A .gguf file, a safetensors checkpoint folder, or (None) the bundled SmolLM2-135M-Instruct."""
    from models.llama import gguf_loader, tokenizer

    if path is None:
        path = gguf_loader.bundled_model_path()
    path = pathlib.Path(path)
    if path.is_dir():
        from models.llama.safetensors_loader import load_safetensors

        cfg, params = load_safetensors(path, dtype=dtype)
        return Model(cfg, params, tokenizer.from_hf_folder(path), str(path))
    m = gguf_loader.load_gguf(path, dtype=dtype)
    return Model(m.config, m.params, tokenizer.from_gguf_metadata(m.metadata), str(path))
