"""Block-quantized weights (Q4_0, Q4_1, Q8_0) x activations quantized to 8 bits per block, on the CPU.

The decode hot path of a quantized LLaMA: a GEMV (M = 1) or, in prefill, a GEMM whose weights stay
packed as llama.cpp stores them (``BlockWeight``: N rows of 32-element blocks) and whose activations
are quantized to 8 bits per block exactly as llama.cpp's Q8_0 / Q8_1 (x86 SIMD path): d = amax/127
rounded to f16, q = round-half-even(x * 127/amax), s = f16(d * sum q). Each block's dot product is
an exact integer (vpdpbusd on AVX-512 VNNI, vpmaddubsw on AVX2, sdot on NEON, a portable scalar
loop); per-block scales are applied in f32. Threads split N (and M) into tiles.
``reference`` is the same arithmetic in jnp; ``dense_reference`` the f32 product it approximates.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu import build
from kernels.llm import common, w4a16
from kernels.llm.w4a16 import QuantizedWeight
from tuning import tuned
from tuning.space import Knob, SearchSpace, parse_dims

FORMATS = ("q4_0", "q4_1", "q8_0")
FORMAT_IDS = {"q4_0": 0, "q4_1": 1, "q8_0": 2}
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
BLOCK = 32


@functools.partial(jax.tree_util.register_dataclass, data_fields=["blocks", "layer"], meta_fields=["format"])
@dataclasses.dataclass(frozen=True)
class BlockWeight:
    """A (K, N) weight (or a stack of them: leading axes) as N rows of K/32 blocks, llama.cpp's layout.

    blocks: uint8 (..., N, K/32 * block bytes); format: "q4_0", "q4_1" or "q8_0".
    layer: None, or a scalar int32 index into the leading axis of stacked ``blocks``: the kernel reads
    that layer in place (a ``lax.scan`` over layers never copies a layer's slice out).
    """

    blocks: jax.Array
    format: str
    layer: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (K, N) shape (of one layer)."""
        *_, n, row = self.blocks.shape
        return (row // BLOCK_BYTES[self.format] * BLOCK, n)

    @property
    def nbytes(self) -> int:
        return int(self.blocks.size * self.blocks.dtype.itemsize)

    def at(self, layer) -> BlockWeight:
        return BlockWeight(self.blocks, self.format, jnp.asarray(layer, jnp.int32))


# ---------------------------------------------------------------------------------------------
# Layout conversion and dequantization
# ---------------------------------------------------------------------------------------------


def cpu_layout(w):
    """A ``QuantizedWeight`` (any group that is a multiple of 32) -> ``BlockWeight`` on the host;
    dense arrays and ``BlockWeight`` pass through. Exact: no value is re-quantized."""
    if not isinstance(w, QuantizedWeight):
        return w
    if w.group % BLOCK:
        raise ValueError(f"the cpu path needs quantization groups that are multiples of 32; got group={w.group}")
    packed, scales = np.asarray(w.packed), np.asarray(w.scales).astype(np.float16)
    *lead, groups, _, n = packed.shape
    sub = w.group // BLOCK  # 32-blocks per group: each repeats its group's scale and min
    k = groups * w.group
    if w.bits == 8:
        q = packed.view(np.uint8).reshape(*lead, k // BLOCK, BLOCK, n)
        fmt, parts = "q8_0", [np.repeat(scales, sub, axis=-2).view(np.uint8)]
    else:
        values = np.concatenate([packed & 15, packed >> 4], axis=-2)  # (..., G, g, N): elements in order
        values = values.reshape(*lead, k // BLOCK, BLOCK, n)
        q = values[..., :16, :] | (values[..., 16:, :] << 4)  # GGUF: byte i = element i | element i+16 << 4
        mins = np.asarray(w.mins).astype(np.float16)
        symmetric = np.array_equal(mins, (np.float32(-8.0) * scales.astype(np.float32)).astype(np.float16))
        fmt = "q4_0" if symmetric else "q4_1"
        parts = [np.repeat(scales, sub, axis=-2).view(np.uint8)]
        if not symmetric:
            parts.append(np.repeat(mins, sub, axis=-2).view(np.uint8))
    # (..., K/32, bytes, N) -> (..., N, K/32, bytes)
    scale_bytes = [p.reshape(*lead, k // BLOCK, n, 2).swapaxes(-1, -2) for p in parts]
    blocks = np.concatenate(scale_bytes + [q.astype(np.uint8)], axis=-2)
    blocks = np.ascontiguousarray(np.moveaxis(blocks, -1, -3))
    return BlockWeight(blocks.reshape(*lead, n, k // BLOCK * BLOCK_BYTES[fmt]), fmt)


def _fields(w: BlockWeight):
    """(q int32 (..., N, K/32, 32) as multiplied, d f32 (..., N, K/32), m f32 or None) in jnp."""
    b = w.blocks if w.layer is None else w.blocks[w.layer]
    *lead, n, row = b.shape
    blocks = b.reshape(*lead, n, row // BLOCK_BYTES[w.format], BLOCK_BYTES[w.format])

    def half(i):
        return jax.lax.bitcast_convert_type(
            blocks[..., i:i + 2].astype(jnp.uint16)[..., 0] | (blocks[..., i + 1].astype(jnp.uint16) << 8),
            jnp.float16).astype(jnp.float32)

    if w.format == "q8_0":
        return jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.int32), half(0), None
    start = 2 if w.format == "q4_0" else 4
    raw = blocks[..., start:start + 16]
    q = jnp.concatenate([raw & 15, raw >> 4], axis=-1).astype(jnp.int32)
    if w.format == "q4_0":
        return q - 8, half(0), None
    return q, half(0), half(2)


def dequantize(w: BlockWeight) -> jax.Array:
    """The (K, N) f32 weight a ``BlockWeight`` stands for."""
    q, d, m = _fields(w)
    deq = q.astype(jnp.float32) * d[..., None] + (0.0 if m is None else m[..., None])
    *lead, n, nb, _ = deq.shape
    return jnp.swapaxes(deq.reshape(*lead, n, nb * BLOCK), -1, -2)


def quantize_activations(x: jax.Array):
    """x (..., K) f32 -> (q int32 (..., K/32, 32), d (..., K/32), s (..., K/32)): llama.cpp's Q8_0 /
    Q8_1 activations on x86 (d and s rounded to f16, q rounded half to even)."""
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    d = amax / 127.0
    inv = jnp.where(amax != 0, 127.0 / jnp.where(amax != 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.round(xb * inv[..., None]), -127, 127).astype(jnp.int32)
    s = d * jnp.sum(q, axis=-1).astype(jnp.float32)
    return q, d.astype(jnp.float16).astype(jnp.float32), s.astype(jnp.float16).astype(jnp.float32)


def reference(x: jax.Array, w: BlockWeight) -> jax.Array:
    """x (..., K) @ W (K, N) with the kernel's arithmetic: 8-bit activations, exact per-block integer
    dot products, f32 scales: sum_b d_w d_x (q_w . q_x) [+ m_w s_x]."""
    qx, dx, sx = quantize_activations(x)
    qw, dw, mw = _fields(w)
    sumi = jnp.einsum("...bi,nbi->...nb", qx, qw, preferred_element_type=jnp.int32).astype(jnp.float32)
    out = jnp.sum(sumi * dw * dx[..., None, :], axis=-1)
    if mw is not None:
        out = out + jnp.sum(mw * sx[..., None, :], axis=-1)
    return out


def dense_reference(x: jax.Array, w: BlockWeight) -> jax.Array:
    """x @ W in f32 without quantizing x: what the kernel approximates (about 1% relative error)."""
    return jnp.dot(x.astype(jnp.float32), dequantize(w), preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Config, public op
# ---------------------------------------------------------------------------------------------

ORDERS = ("n_outer", "m_outer")


@dataclasses.dataclass(frozen=True)
class Config:
    """isa: which body (``build.ISAS``); threads: threads sharing the tiles; block_m x block_n: the
    register tile (activation rows x weight rows per inner step, 1/2/4); tile_m x tile_n: the cache
    tile one thread takes at a time; order: within a tile, weight rows outer (``n_outer``: a
    weight panel stays in L1 while the rows of activations pass) or activation rows outer;
    unroll: independent accumulators over K (1 or 2), to hide the multiply-add latency;
    prefetch: how far ahead of the weight stream (bytes) to prefetch; 0 leaves it to the hardware."""

    isa: str = "scalar"
    threads: int = 1
    block_m: int = 1
    block_n: int = 1
    tile_m: int = 16
    tile_n: int = 64
    order: str = "n_outer"
    unroll: int = 1
    prefetch: int = 1024

    def __post_init__(self):
        if self.isa not in build.ISAS:
            raise ValueError(f"isa={self.isa!r} is not one of {build.ISAS}")
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r} is not one of {ORDERS}")
        for name in ("block_m", "block_n"):
            if getattr(self, name) not in (1, 2, 4):
                raise ValueError(f"{name}={getattr(self, name)} must be 1, 2 or 4")
        if self.unroll not in (1, 2):
            raise ValueError(f"unroll={self.unroll} must be 1 or 2")
        for name in ("threads", "tile_m", "tile_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.prefetch < 0:
            raise ValueError(f"prefetch={self.prefetch} must be >= 0 (bytes; 0 = off)")

    def params(self) -> dict:
        return common.params_of(self)


def attrs(cfg: Config) -> dict:
    """The FFI attributes of a Config (one compiled library serves every config)."""
    return {"block_m": np.int64(cfg.block_m), "block_n": np.int64(cfg.block_n), "tile_m": np.int64(cfg.tile_m),
            "tile_n": np.int64(cfg.tile_n), "order": np.int64(ORDERS.index(cfg.order)),
            "unroll": np.int64(cfg.unroll), "threads": np.int64(cfg.threads), "prefetch": np.int64(cfg.prefetch)}


def heuristic_config(m: int, n: int, threads: int | None = None, isa: str | None = None) -> Config:
    threads = threads or build.default_threads()
    # >= 8 tiles per thread so a late thread (a shared machine) does not leave the others waiting
    tile_n = common.largest_pow2_divisor(1 << 20, max(4, min(256, n // (8 * threads))))
    return Config(isa=isa or build.best_isa(), threads=threads, block_m=4 if m >= 4 else 1, block_n=4 if m > 1 else 1,
                  tile_m=64 if m > 1 else 1, tile_n=tile_n, order="n_outer", unroll=2 if m == 1 else 1)


def problem_key(m: int, n: int, k: int, fmt: str) -> dict:
    return {"m": m, "n": n, "k": k, "format": fmt, "cpu": build.cpu_name()}


def _check(x: jax.Array, w: BlockWeight, what: str) -> tuple[int, int]:
    if not isinstance(w, BlockWeight):  # bad input is a ValueError across the project, types included
        raise ValueError(  # noqa: TRY004
            f"{what} needs a BlockWeight (kernels.cpu.qmatmul.cpu_layout); got {type(w).__name__}")
    if w.format not in FORMATS:
        raise ValueError(f"{what}: format {w.format!r} is not one of {FORMATS}")
    k, n = w.shape
    if x.dtype != jnp.float32:
        raise ValueError(f"{what} takes float32 activations; got {x.dtype} (use --dtype float32 on the cpu path)")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has K={x.shape[-1]} but the weight has K={k}")
    if w.blocks.ndim != (2 if w.layer is None else 3):
        raise ValueError(f"{what}: stacked weights (shape {w.blocks.shape}) need a layer index (BlockWeight.at)")
    return k, n


def _call(x2: jax.Array, w: BlockWeight, up: BlockWeight | None, cfg: Config) -> jax.Array:
    """One FFI call. A stacked weight is passed whole with its layer index, and read in place: one
    layer's slice as a custom-call operand would be copied out of the stack at every step."""
    m, n = x2.shape[0], w.shape[1]
    if up is not None and (up.layer is None) != (w.layer is None):
        raise ValueError("swiglu: gate and up weights must both be stacked or both be single layers")
    layer = jnp.zeros((1,), jnp.int32) if w.layer is None else jnp.reshape(w.layer, (1,)).astype(jnp.int32)
    return jax.ffi.ffi_call(build.target("qmatmul", cfg.isa), jax.ShapeDtypeStruct((m, n), jnp.float32))(
        x2, w.blocks, (up or w).blocks, layer, format=np.int64(FORMAT_IDS[w.format]),
        up_format=np.int64(FORMAT_IDS[(up or w).format]), swiglu=np.int64(up is not None), **attrs(cfg))


def quantized_matmul(x: jax.Array, w: BlockWeight, *, config: Config | None = None) -> jax.Array:
    """x (..., K) f32 @ W (K, N) -> (..., N) f32 through the compiled kernel (8-bit activations)."""
    k, n = _check(x, w, "quantized_matmul")
    x2 = x.reshape(-1, k)
    cfg = tuned.resolve("cpu_q4_gemv", problem_key(x2.shape[0], n, k, w.format), config, config_type=Config,
                       heuristic=lambda: heuristic_config(x2.shape[0], n))
    return _call(x2, w, None, cfg).reshape(*x.shape[:-1], n)


def swiglu(x: jax.Array, w_gate: BlockWeight, w_up: BlockWeight, *, config: Config | None = None) -> jax.Array:
    """silu(x @ W_gate) * (x @ W_up) in one call: both weights stream through the same tile, so the
    (M, ffn) gate and up activations never reach memory."""
    k, n = _check(x, w_gate, "swiglu")
    if _check(x, w_up, "swiglu") != (k, n):
        raise ValueError(f"swiglu: gate {w_gate.shape} and up {w_up.shape} weights differ in shape")
    x2 = x.reshape(-1, k)
    cfg = tuned.resolve("cpu_swiglu", problem_key(x2.shape[0], n, k, w_gate.format), config, config_type=Config,
                       heuristic=lambda: heuristic_config(x2.shape[0], n))
    return _call(x2, w_gate, w_up, cfg).reshape(*x.shape[:-1], n)


def swiglu_reference(x: jax.Array, w_gate: BlockWeight, w_up: BlockWeight) -> jax.Array:
    return jax.nn.silu(reference(x, w_gate)) * reference(x, w_up)


# ---------------------------------------------------------------------------------------------
# The LLaMA forward pass's view (models.llama.forward's ``cpu`` ops)
# ---------------------------------------------------------------------------------------------


def linear(x: jax.Array, w) -> jax.Array:
    """x @ W: packed weights through the kernel, dense ones (F16/BF16 checkpoints) through XLA."""
    if isinstance(w, BlockWeight):
        return quantized_matmul(x, w).astype(x.dtype)
    return w4a16.xla_matmul(x, w)


def swiglu_op(x: jax.Array, w_gate, w_up) -> jax.Array:
    if isinstance(w_gate, BlockWeight) and isinstance(w_up, BlockWeight):
        return swiglu(x, w_gate, w_up)
    return jax.nn.silu(linear(x, w_gate)) * linear(x, w_up)


def embedding_lookup(w, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Rows ``ids`` of an embedding stored as a (dim, vocab) weight: only those rows are dequantized."""
    if not isinstance(w, BlockWeight):
        return w4a16.embedding_lookup(w, ids, dtype)
    rows = BlockWeight(jnp.take(w.blocks, ids.reshape(-1), axis=0), w.format)
    return jnp.swapaxes(dequantize(rows), 0, 1).reshape(*ids.shape, -1).astype(dtype)


def select_layer(layers: dict, i) -> dict:
    """Layer ``i`` of stacked weights: packed weights as views into the stack, the rest sliced."""
    return {name: w.at(i) if isinstance(w, BlockWeight) else jax.tree.map(lambda a, i=i: a[i], w)
            for name, w in layers.items()}


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------

# SmolLM2-135M decode: the fused q/k/v projection, the MLP's down projection, the tied output.
DEFAULT_PROBLEMS = [problem_key(1, 960, 576, "q4_1"), problem_key(1, 576, 1536, "q4_1"),
                    problem_key(1, 49152, 576, "q8_0")]


def parse_shape(text: str) -> dict:
    """``MxNxK`` or ``MxNxK:FORMAT`` (q4_0, q4_1 (default) or q8_0), e.g. ``1x1536x576:q4_1``."""
    head, _, fmt = text.partition(":")
    fmt = fmt or "q4_1"
    m, n, k = parse_dims(head, "MxNxK[:FORMAT]", "1x1536x576:q4_1")
    if fmt not in FORMATS or k % BLOCK:
        raise ValueError(f"shape {text!r}: need K a multiple of 32 and a format in {FORMATS}")
    return problem_key(m, n, k, fmt)


def random_weight(k: int, n: int, fmt: str, seed: int = 0) -> BlockWeight:
    w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32) * 0.02
    q = w4a16.quantize(w, bits=8 if fmt == "q8_0" else 4, group=BLOCK, symmetric=fmt == "q4_0")
    return jax.device_put(cpu_layout(q))


def config_knobs(m: int, n: int) -> list[Knob]:
    threads = build.default_threads()
    return [
        Knob("isa", build.supported_isas()),
        Knob("threads", tuple(t for t in (1, 2, 4, 8, 16, 32) if t <= threads) or (1,)),
        Knob("block_m", (1, 2, 4) if m > 1 else (1,)),
        Knob("block_n", (1, 2, 4)),
        Knob("tile_m", tuple(t for t in (1, 4, 16, 64, 256) if t <= max(m, 1)) or (1,)),
        Knob("tile_n", tuple(t for t in (4, 8, 16, 32, 64, 128, 256, 512) if t <= max(n, 4))),
        Knob("order", ORDERS if m > 1 else ("n_outer",)),
        Knob("unroll", (1, 2)),
        Knob("prefetch", (0, 256, 512, 1024, 2048)),
    ]


def search_space(problem: dict, *, kernel: str = "cpu_q4_gemv") -> SearchSpace:
    m, n, k, fmt = problem["m"], problem["n"], problem["k"], problem["format"]
    op = quantized_matmul if kernel == "cpu_q4_gemv" else swiglu

    def make_inputs(seed):  # the measurement rotates sets past the last-level cache, as a decode step streams
        x = jax.random.normal(jax.random.key(seed), (m, k), jnp.float32)
        n_weights = 1 if op is quantized_matmul else 2
        return (x, *[random_weight(k, n, fmt, 2 * seed + i) for i in range(n_weights)])

    def fn(cfg: Config):
        return functools.partial(op, config=cfg)

    return SearchSpace(kernel=kernel, problem=problem, knobs=tuple(config_knobs(m, n)),
                       violations=lambda p: [], to_config=lambda p: Config(**{**heuristic_config(m, n).params(), **p}),
                       fn=fn, make_inputs=make_inputs, default=heuristic_config(m, n).params())
