"""Where kernels run: the backend of the default device and how Pallas should lower.

Every kernel module asks this module one question before it builds a ``pallas_call``:
interpret (CPU, and anything that is not an NVIDIA GPU) or compile (Triton / Mosaic GPU).
"""
from __future__ import annotations

import functools

import jax


@functools.cache
def backend() -> str:
    """``"gpu"`` for a CUDA device, ``"cpu"`` otherwise (Pallas runs interpreted there)."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda") else "cpu"


def interpret_default() -> bool:
    """Pallas only runs interpreted on the CPU; on GPU it compiles."""
    return backend() != "gpu"


@functools.cache
def device_kind() -> str:
    """A short, stable name of the default device, used in cache keys: ``"NVIDIA H100 80GB HBM3"``, ``"cpu"``."""
    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else dev.device_kind


@functools.cache
def is_hopper() -> bool:
    """True on compute capability 9.x (H100/H200), where the Mosaic GPU (wgmma) bodies run."""
    if backend() != "gpu":
        return False
    cap = getattr(jax.devices()[0], "compute_capability", "")
    return str(cap).startswith("9")


# Shared-memory budget a Triton program may use on the current GPU (bytes). H100/H200 allow
# 227 KiB per block; older parts less. The interpreter has no such limit but we keep the GPU
# figure so a config tuned on the CPU is still legal on a GPU.
SHARED_MEMORY_BYTES = 227 * 1024


def compiler_params(num_warps: int, num_stages: int, interpret: bool):
    """Triton launch knobs (warps per program, pipeline depth) for a compiled kernel; None when
    interpreted. Every portable kernel body passes its ``Config``'s knobs through here."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
