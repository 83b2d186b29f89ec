"""Where kernels run: the backend of the default device, how Pallas should lower there, and what
the hardware is (device kind for cache keys, caches, clocks, nominal peaks for the timing protocol).

Every kernel module asks this module one question before it builds a ``pallas_call``:
interpret (CPU, and anything that is not an NVIDIA GPU) or compile (Triton / Mosaic GPU).
"""
from __future__ import annotations

import contextlib
import functools

import jax


@functools.cache
def backend() -> str:
    """``"gpu"`` for a CUDA device, ``"cpu"`` otherwise (Pallas runs interpreted there)."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda") else "cpu"


_GPU_LOWERING: list[bool] = []


def interpret_default() -> bool:
    """Pallas only runs interpreted on the CPU; on GPU it compiles (and inside ``gpu_lowering``)."""
    return backend() != "gpu" and not _GPU_LOWERING


@contextlib.contextmanager
def gpu_lowering():
    """Within this context the kernels build their compiled GPU (Triton) form even where there is no
    GPU, so that ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` shows what a GPU would
    run: lowering needs no GPU, only compiling and running do. For tests and kernel inventories."""
    _GPU_LOWERING.append(True)
    try:
        yield
    finally:
        _GPU_LOWERING.pop()


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


# ---------------------------------------------------------------------------------------------
# What the hardware is: caches, clocks and nominal peaks (read where the system says, else None)
# ---------------------------------------------------------------------------------------------

# CUdevice_attribute values from CUDA's cuda.h.
_CU_ATTRIBUTES = {"sm_count": 16, "sm_clock_khz": 13, "memory_clock_khz": 36, "memory_bus_width_bits": 37,
                  "l2_cache_bytes": 38, "compute_capability_major": 75, "compute_capability_minor": 76}

# Vendor datasheet figures (dense tensor-core math, HBM bandwidth), keyed by a substring of the
# device kind; the most specific key first. They are what a roofline's "nominal" refers to.
_NOMINAL = (
    ("H200", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12, "int8": 1978.9e12, "bandwidth": 4.8e12}),
    ("H100 PCIe", {"bfloat16": 756.0e12, "float16": 756.0e12, "float32": 51.2e12, "int8": 1513.0e12,
                   "bandwidth": 2.0e12}),
    ("H100 NVL", {"bfloat16": 835.0e12, "float16": 835.0e12, "float32": 60.0e12, "int8": 1670.0e12,
                  "bandwidth": 3.9e12}),
    ("H100", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12, "int8": 1978.9e12, "bandwidth": 3.35e12}),
    ("A100-SXM4-80GB", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12, "int8": 624e12,
                        "bandwidth": 2.039e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12, "int8": 624e12, "bandwidth": 1.555e12}),
)


def _nominal() -> dict:
    kind = device_kind()
    for key, figures in _NOMINAL:
        if key in kind:
            return figures
    return {}


def nominal_peak_flops(dtype) -> float | None:
    """Datasheet dense peak (FLOP/s, int8: OP/s) of the default device for ``dtype``; None if unknown (CPU)."""
    import numpy as np

    return _nominal().get(np.dtype(dtype).name)


def nominal_bandwidth() -> float | None:
    """Datasheet memory bandwidth (bytes/s) of the default device; None if unknown (CPU)."""
    return _nominal().get("bandwidth")


@functools.cache
def gpu_properties() -> dict:
    """GPU 0's L2 size, SM count, clocks and compute capability from the CUDA driver (libcuda);
    ``{}`` off a GPU or where the driver cannot be read."""
    if backend() != "gpu":
        return {}
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        device = ctypes.c_int()
        if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(device), 0) != 0:
            return {}
        out = {}
        for name, attribute in _CU_ATTRIBUTES.items():
            value = ctypes.c_int()
            if lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, device) == 0:
                out[name] = value.value
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
            out["cuda_driver_api_version"] = version.value
        return out
    except (OSError, AttributeError):
        return {}


def _cpu_last_level_cache() -> int | None:
    """The largest cache of CPU 0 from sysfs (``index*/size``), else ``lscpu``; None if neither says."""
    import pathlib
    import re
    import subprocess

    sizes = []
    for index in pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]])
    if sizes:
        return max(sizes)
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = [int(m[1]) for m in re.finditer(r"^L[23] cache:\s+(\d+)", out, re.MULTILINE)]
    return max(found) if found else None


@functools.cache
def last_level_cache_bytes() -> int:
    """Bytes of the last-level cache between the kernel and memory: the GPU's L2, or the CPU's L3.

    Falls back to 64 MiB (more than any current L2 or desktop L3) when the system does not say, so
    input rotation errs on the side of more copies.
    """
    if backend() == "gpu":
        found = gpu_properties().get("l2_cache_bytes")
    else:
        found = _cpu_last_level_cache()
    return int(found) if found else 64 * 2**20
