"""Split-K decode attention: one new query token per sequence against the stacked KV cache.

The cache is the model's whole stacked cache (L, B, Hkv, S, D), read at the layer's index inside
the kernel (the index is an operand, not a slice taken before the call, so no per-layer copy of the
cache exists). Each (batch, kv head) row of keys is cut into ``num_splits`` chunks processed by
separate programs (flash-decoding), sized at run time from the sequence's length, so every program
has work at any context; each returns a partial softmax (max, sum, normalised output) that a
log-sum-exp merge combines. ``decode_splits`` picks the split count that makes the grid cover the
GPU's SMs. All query heads of one KV group share a program and its K/V loads (GQA); the group is
padded to 16 rows for the tensor-core dot.
With ``rotary`` the cache holds un-rotated keys and RoPE is applied to each tile as it is loaded (key at
its cache index, the query at length - 1): the new token's q and k need no separate RoPE pass.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.llm import common, rope
from tuning import platform, tuned
from tuning.space import Knob, SearchSpace

_NEG = -1e30
MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class Config:
    block_k: int = 64
    num_splits: int = 4
    num_warps: int = 4
    num_stages: int = 2

    def params(self) -> dict:
        return common.params_of(self)


def reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
              rotary: rope.Rotary | None = None, layer=None) -> jax.Array:
    """q (B, Hq, D), caches (B, Hkv, S, D) -- or stacked (L, B, Hkv, S, D) read at ``layer`` --,
    lengths (B,): attend to cache positions < length. ``rotary``: the query (at position length - 1)
    and every key (at its cache index) are first rotated."""
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if rotary is not None:
        q = rope.apply(q[:, None], (lengths - 1)[:, None], rotary)[:, 0]
        k_cache = rope.apply(k_cache.transpose(0, 2, 1, 3), jnp.broadcast_to(jnp.arange(s), (b, s)),
                             rotary).transpose(0, 2, 1, 3)
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    scores = jnp.einsum("bhgd,bhsd->bhgs", qg, k_cache.astype(jnp.float32)) / math.sqrt(d)
    valid = jnp.arange(s)[None, :] < lengths[:, None]  # (B, S)
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    out = jnp.einsum("bhgs,bhsd->bhgd", jax.nn.softmax(scores, axis=-1), v_cache.astype(jnp.float32))
    return out.reshape(b, hq, d).astype(q.dtype)


def _decode_kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, sm_scale: float,
                   block_k: int, num_splits: int, rotary: rope.Rotary | None):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    layer = layer_ref[0]
    rows, d = q_ref.shape  # (group rows, D)
    # This split's key blocks, from the length at run time: blocks [first, first + count).
    num_blocks = pl.cdiv(length, block_k)
    per_split = pl.cdiv(num_blocks, num_splits)
    first = split * per_split
    count = jnp.clip(num_blocks - first, 0, per_split)
    q = rope.load_rotated(q_ref, pl.ds(0, rows), length - 1, rotary)

    def body(j, carry):
        acc, m, l = carry
        start = (first + j) * block_k
        keys = pl.ds(start, block_k)
        k_index = start + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        k = rope.load_rotated(k_ref, keys, k_index, rotary, prefix=(layer, b, h))
        v = v_ref[layer, b, h, keys, pl.ds(0, d)]
        s = rope.split_dot(q, k) * sm_scale  # (rows, block_k)
        pos = start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        s = jnp.where(pos < length, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, count, body, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
    m_ref[...] = m
    l_ref[...] = l


def decode_splits(sm_count: int, batch: int, kv_heads: int, context: int, block_k: int, *,
                  waves: int = 2) -> int:
    """Key chunks per (sequence, kv head): enough programs (batch * kv_heads * splits) to give every
    SM ``waves`` programs, but no more chunks than key blocks at ``context`` and at most MAX_SPLITS
    (each split adds a partial result to merge). LLaMA-2-7B at batch 1 on 132 SMs: 32 kv heads ->
    9 splits; with 8 kv heads (GQA) -> 33; a 200-token context caps it at 4 blocks of 64."""
    want = -(-waves * sm_count // max(1, batch * kv_heads))
    blocks = max(1, -(-context // block_k))
    return int(max(1, min(want, blocks, MAX_SPLITS)))


def heuristic_config(seq: int, batch: int, kv_heads: int, on_gpu: bool | None = None) -> Config:
    if on_gpu is None:
        on_gpu = platform.backend() == "gpu"
    block_k = common.largest_pow2_divisor(seq, 64)
    if not on_gpu:  # the interpreter: one program per (sequence, head) is fastest
        return Config(block_k=common.largest_pow2_divisor(seq, 256), num_splits=1, num_warps=4, num_stages=2)
    from kernels.llm import w4a16

    splits = decode_splits(w4a16.sm_count(), batch, kv_heads, seq, block_k)
    return Config(block_k=block_k, num_splits=splits, num_warps=4, num_stages=2)


@functools.partial(jax.jit, static_argnames=("rotary", "config", "interpret"))
def _decode(q, k_cache, v_cache, lengths, layer, *, rotary: rope.Rotary | None, config: Config, interpret: bool):
    b, hq, d = q.shape
    hkv, s = k_cache.shape[2], k_cache.shape[3]
    group = hq // hkv
    rows = max(16, pl.next_power_of_2(group))
    qg = jnp.pad(q.reshape(b, hkv, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    splits = config.num_splits
    whole = pl.BlockSpec()  # the operand as it is in memory, indexed in the kernel
    cache_bytes = 2 * b * hkv * s * d * k_cache.dtype.itemsize
    o, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, sm_scale=1.0 / math.sqrt(d), block_k=config.block_k, num_splits=splits,
                          rotary=rotary),
        grid=(b, hkv, splits),
        in_specs=[
            whole,  # lengths (B,)
            whole,  # layer (1,)
            pl.BlockSpec((None, None, rows, d), lambda bi, h, si: (bi, h, 0, 0)),
            whole,  # the stacked caches: indexed at (layer, b, h) in the kernel
            whole,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda bi, h, si: (bi, h, si, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda bi, h, si: (bi, h, si, 0)),
            pl.BlockSpec((None, None, None, rows), lambda bi, h, si: (bi, h, si, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
        ],
        compiler_params=platform.compiler_params(config.num_warps, config.num_stages, interpret),
        interpret=interpret,
        name="decode_attention_stacked_cache",
        cost_estimate=pl.CostEstimate(flops=4 * b * hq * s * d, transcendentals=b * hq * s,
                                      bytes_accessed=cache_bytes + b * hkv * splits * rows * (d + 2) * 4),
    )(lengths.astype(jnp.int32), jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), qg, k_cache, v_cache)
    # Log-sum-exp merge of the splits: weight_i = l_i * exp(m_i - max m).
    weight = l * jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    out = jnp.sum(weight[..., None] * o, axis=2) / jnp.sum(weight, axis=2)[..., None]
    return out[:, :, :group].reshape(b, hq, d).astype(q.dtype)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     layer=None, rotary: rope.Rotary | None = None, config: Config | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Pallas split-K decode attention; same contract as ``reference``. lengths must be >= 1.
    With ``layer`` the caches are the stacked (L, B, Hkv, S, D) ones, read in place at that index."""
    stacked = layer is not None
    if q.ndim != 3 or k_cache.ndim != (5 if stacked else 4) or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q (B, Hq, D), caches {'(L, B, Hkv, S, D) with layer' if stacked else '(B, Hkv, S, D)'}; "
                         f"got {q.shape}, {k_cache.shape}, {v_cache.shape}")
    if not stacked:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0  # a free reshape: one "layer"
    b, hq, d = q.shape
    hkv, s = k_cache.shape[2], k_cache.shape[3]
    if k_cache.shape[1] != b or k_cache.shape[4] != d or hkv == 0 or hq % hkv:
        raise ValueError(f"cache shape {k_cache.shape} does not fit q shape {q.shape} (key/value heads must be >= 1 "
                         "and divide the query heads)")
    if not common.is_pow2(d):
        raise ValueError(f"head_dim={d} must be a power of 2 for the Pallas attention kernels")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers of shape ({b},), got {lengths.dtype}{lengths.shape}")
    if s == 0:
        raise ValueError("the KV cache has length S=0; decode attention needs at least one cached position")
    if 0 in (b, hq):  # an empty batch or head axis: the empty result
        return jnp.zeros(q.shape, q.dtype)
    if interpret is None:
        interpret = platform.interpret_default()
    cfg = tuned.resolve("decode_attention", problem_key(b, s, hq, hkv, d, q.dtype), config, config_type=Config,
                        heuristic=lambda: heuristic_config(s, b, hkv, on_gpu=not interpret))
    if s % cfg.block_k or not common.is_pow2(cfg.block_k) or cfg.num_splits < 1:
        raise ValueError(f"cache length {s} must be a multiple of block_k={cfg.block_k} (a power of 2) and "
                         f"num_splits={cfg.num_splits} >= 1; allocate the cache in multiples of 256")
    return _decode(q, k_cache, v_cache, lengths, layer, rotary=rotary, config=cfg, interpret=interpret)


problem_key = common.attention_problem_key


DEFAULT_PROBLEMS = [problem_key(1, 4096, 32, 32, 128, "bfloat16"), problem_key(1, 4096, 32, 8, 128, "bfloat16")]


def parse_shape(text: str) -> dict:
    """``BxSxHQxHKVxD`` (S = cache length), e.g. ``1x4096x32x8x128``."""
    return common.parse_attention_shape(text, "BxSxHQxHKVxD", "1x4096x32x8x128")


def search_space(problem: dict) -> SearchSpace:
    b, s, hq, hkv, d = (problem[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim"))
    dtype = jnp.dtype(problem["dtype"])
    knobs = [Knob("block_k", (16, 32, 64, 128, 256)), Knob("num_splits", (1, 2, 4, 8, 16, 32, 64))]
    if platform.backend() == "gpu":
        knobs += [Knob("num_warps", (2, 4, 8)), Knob("num_stages", (1, 2, 3, 4))]

    def violations(p):
        return [] if s % p["block_k"] == 0 else [f"block_k must divide S={s}"]

    def make_inputs(seed):
        kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
        return (jax.random.normal(kq, (b, hq, d), dtype), jax.random.normal(kk, (b, hkv, s, d), dtype),
                jax.random.normal(kv, (b, hkv, s, d), dtype), jnp.full((b,), s, jnp.int32))

    return SearchSpace(kernel="decode_attention", problem=problem, knobs=tuple(knobs), violations=violations,
                       to_config=lambda p: Config(**{**Config().params(), **p}),
                       fn=lambda cfg: functools.partial(decode_attention, config=cfg), make_inputs=make_inputs,
                       default=heuristic_config(s, b, hkv).params(), interpreted=platform.interpret_default())
