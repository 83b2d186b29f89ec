"""What one decode step of the pallas path launches, and that nothing outside its kernels moves the KV cache.

Three views of the same step on a tiny config: its jaxpr (the Pallas calls per layer), its lowering
for an NVIDIA GPU (Triton custom calls; lowering needs no GPU, so this runs on the CPU), and the
optimized HLO XLA compiles (on the CPU the interpreted kernels, on a GPU the real ones).
"""
import collections
import re

import jax
import jax.numpy as jnp
import pytest

from autotune import measure
from models.llama import config as llama_config
from models.llama import forward
from models.llama import params as llama_params
from tuning import platform

LAYERS = 3
# q/k/v (RMSNorm prologue, cache write epilogue), attention, wo (+ residual), gate/up (RMSNorm
# prologue), down (+ residual); the target is at most 6.
MAX_CALLS_PER_LAYER = 6
KERNEL_NAMES = ("qkv_norm_gemv_cache_write", "decode_attention_stacked_cache", "w4a16_linear_residual",
                "swiglu_norm", "w4a16_norm_linear")
# Instructions that pass a buffer along without moving its bytes.
STRUCTURAL = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
              "custom-call", "opt-barrier"}


def _step(dtype=jnp.float32, bits=4):
    cfg = llama_config.tiny(n_layers=LAYERS)
    params = llama_params.init_params(cfg, jax.random.key(0), bits=bits, dtype=dtype)
    cache = forward.init_cache(cfg, 2, 256, dtype)
    return cfg, params, cache, jnp.array([3, 9]), jnp.array([7, 30])


def _per_layer(calls):
    """Pallas call sites per layer: a site that runs once per layer, or L sites of one each (unrolled)."""
    names = collections.Counter()
    for c in calls:
        if c["calls"] == LAYERS:
            names[c["name"]] += 1
        elif c["calls"] == 1:
            names[c["name"]] += 1 / LAYERS
    return {name: round(n, 3) for name, n in names.items()}


def _cache_shaped_ops(hlo_text: str, shape: str):
    """(opcode, op_name metadata) of every HLO instruction whose result is a cache-shaped array."""
    out = []
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+)\s+([a-z][\w\-]*)\(", line)
        if m and m[1].startswith(shape):
            name = re.search(r'op_name="([^"]*)"', line)
            out.append((m[2], name[1] if name else ""))
    return out


def test_pallas_decode_layer_is_five_calls_and_the_cache_moves_only_inside_them():
    """CPU, interpreted, layers stacked and scanned: each cache-sized instruction of the optimized HLO
    that is not mere plumbing belongs to a Pallas kernel (its op_name carries the kernel's name)."""
    cfg, params, cache, tok, pos = _step()
    params = forward.prepare(params, cfg, "pallas")
    traced = forward.decode.trace(params, tok, pos, cache, cfg=cfg, path="pallas")
    calls = measure.pallas_calls(traced.jaxpr)
    per_layer = _per_layer(calls)
    assert sum(v for k, v in per_layer.items() if k != "w4a16_norm_linear") <= MAX_CALLS_PER_LAYER
    assert per_layer == {"qkv_norm_gemv_cache_write": 1, "decode_attention_stacked_cache": 1,
                         "w4a16_linear_residual": 2, "swiglu_norm": 1, "w4a16_norm_linear": round(1 / LAYERS, 3)}
    assert all(c["bytes_accessed"] for c in calls), "every kernel states its bytes (the profile's GB/s)"

    hlo = traced.lower().compile().as_text()
    shape = "f32[" + ",".join(map(str, cache["k"].shape)) + "]"
    moved = [(op, name) for op, name in _cache_shaped_ops(hlo, shape) if op not in STRUCTURAL]
    assert moved, "the check found no cache-sized instruction at all: the pattern no longer matches the HLO"
    outside = [(op, name) for op, name in moved if not any(k in name for k in KERNEL_NAMES)]
    assert outside == [], f"cache-sized work outside the kernels: {outside[:5]}"


def test_xla_path_decode_moves_the_cache_outside_kernels_so_the_check_can_fail():
    """The same check on the xla path finds cache-sized work with no kernel name (it has no kernels)."""
    cfg, params, cache, tok, pos = _step()
    params = forward.prepare(params, cfg, "xla")
    hlo = forward.decode.lower(params, tok, pos, cache, cfg=cfg, path="xla").compile().as_text()
    shape = "f32[" + ",".join(map(str, cache["k"].shape)) + "]"
    moved = [(op, name) for op, name in _cache_shaped_ops(hlo, shape) if op not in STRUCTURAL]
    assert moved and not any(any(k in name for k in KERNEL_NAMES) for _, name in moved)


def test_decode_step_lowers_for_a_gpu_with_the_cache_touched_only_by_kernels():
    """The step as a GPU runs it (layers unrolled, bf16, Triton kernels), lowered on this machine: it
    lowers, it is 5 Pallas calls per layer plus the output projection, and in the lowered module a
    cache-shaped value appears only as a kernel's operand or result, a function argument or result."""
    cfg, params, cache, tok, pos = _step(jnp.bfloat16)
    with platform.gpu_lowering():
        traced = forward.decode.trace(params, tok, pos, cache, cfg=cfg, path="pallas")
        lowered = traced.lower(lowering_platforms=("cuda",))
    calls = measure.pallas_calls(traced.jaxpr)
    assert len(calls) == 5 * LAYERS + 1
    text = lowered.as_text()
    assert set(re.findall(r"custom_call @([\w$.]+)", text)) == {"__gpu$xla.gpu.triton"}
    assert set(re.findall(r'name = "([^"]+)"', text)) == set(KERNEL_NAMES)
    shape = "tensor<" + "x".join(map(str, cache["k"].shape)) + "xbf16>"
    users = collections.Counter()
    for line in text.splitlines():
        if shape in line:
            stripped = line.strip()
            if stripped.startswith(("func.func", "return")):
                users[stripped.split()[0]] += 1
            else:  # "%r = op(...)" or "%r:3 = op ..."
                users[re.match(r"%[\w#:]+\s*=\s*\"?([\w.]+)", stripped)[1]] += 1
    assert users["stablehlo.custom_call"] == 2, users  # the two kernels that take the caches
    assert set(users) <= {"stablehlo.custom_call", "call", "func.func", "return"}, users


@pytest.mark.parametrize("bits", [4, None])
def test_prefill_lowers_for_a_gpu(bits):
    """Prefill (the dot bodies, flash attention) as a GPU would run it lowers to Triton on this machine."""
    cfg, params, cache, _, _ = _step(jnp.bfloat16, bits=bits)
    tokens = jnp.zeros((2, 40), jnp.int32)
    with platform.gpu_lowering():
        traced = forward.prefill.trace(params, tokens, cache, cfg=cfg, path="pallas")
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "flash_attention" in set(re.findall(r'name = "([^"]+)"', text))


@pytest.mark.gpu
def test_optimized_gpu_hlo_copies_no_cache_sized_buffer_outside_the_kernels():
    cfg, params, cache, tok, pos = _step(jnp.bfloat16)
    params = forward.prepare(params, cfg, "pallas")
    hlo = forward.decode.lower(params, tok, pos, cache, cfg=cfg, path="pallas").compile().as_text()
    shape = "bf16[" + ",".join(map(str, cache["k"].shape)) + "]"
    moved = [(op, name) for op, name in _cache_shaped_ops(hlo, shape) if op not in STRUCTURAL]
    assert moved == [], f"cache-sized instructions besides the kernels' custom calls: {moved[:5]}"
