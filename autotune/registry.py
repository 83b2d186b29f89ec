"""Which kernels the autotuner can sweep, by name, and what it must know of each before tuning.

Each entry names a module that offers, for the autotuner:
  ``search_space(problem: dict) -> tuning.space.SearchSpace``
  ``parse_shape(text: str) -> dict``      (the ``--shape`` syntax, e.g. ``"1024x1024x1024"``)
  ``DEFAULT_PROBLEMS: list[dict]``        (what a sweep with no ``--shape`` tunes)
and optionally ``PRESETS: dict[str, list[dict]]`` (``--layer mobilenetv2``: named problem lists).
A problem dict holds shapes and dtypes; ``--dtype`` sets its ``"dtype"`` entry to one of the
entry's ``dtypes``. ``problem_bytes`` is the memory one problem's operands and result take, so
that a problem that cannot fit the device is refused before anything is allocated or compiled.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from types import ModuleType

FLOATS = ("float32", "bfloat16", "float16")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


def _size(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)


def _matmul_bytes(p: dict) -> int:
    out = 4 if p["dtype"] == "int8" else _size(p["dtype"])  # int8 accumulates into int32
    return (p["m"] * p["k"] + p["k"] * p["n"]) * _size(p["dtype"]) + p["m"] * p["n"] * out


def _int8_bytes(p: dict) -> int:
    if p["op"] == "depthwise":
        return 2 * p["m"] * p["c"] + p["taps"] * p["c"]
    return p["m"] * p["k"] + p["k"] * p["n"] + p["m"] * p["n"] + 4 * p["n"]


def _conv_bytes(p: dict) -> int:
    out_pixels = p["n"] * -(-p["h"] // p["stride"]) * -(-p["w"] // p["stride"])
    weights = p["kh"] * p["kw"] * (p["c"] // max(p["groups"], 1)) * p["k"]
    return (p["n"] * p["h"] * p["w"] * p["c"] + weights + out_pixels * p["k"]) * _size(p["dtype"])


def _inverted_residual_bytes(p: dict) -> int:
    expanded = p["c_in"] * p["expansion"]
    pixels = p["n"] * p["h"] * p["w"]
    weights = p["c_in"] * expanded + 9 * expanded + expanded * p["c_out"]
    return (pixels * (p["c_in"] + expanded + p["c_out"]) + weights) * _size(p["dtype"])


def _w4a16_bytes(p: dict, matrices: int = 1) -> int:
    packed = p["k"] * p["n"] * p["bits"] // 8 + (p["k"] // max(p["group"], 1)) * p["n"] * 2
    return matrices * packed + (p["m"] * p["k"] + p["m"] * p["n"]) * _size(p["dtype"])


def _attention_bytes(p: dict, query_rows: int) -> int:
    q = p["batch"] * query_rows * p["heads"] * p["head_dim"]
    kv = 2 * p["batch"] * p["seq"] * p["kv_heads"] * p["head_dim"]
    return (2 * q + kv) * _size(p["dtype"])


@dataclasses.dataclass(frozen=True)
class Kernel:
    module: str
    dtypes: tuple[str, ...]  # the values --dtype may take
    problem_bytes: Callable[[dict], int] | None = None


KERNELS = {
    "matmul": Kernel("kernels.matmul", FLOATS + ("int8",), _matmul_bytes),
    "int8": Kernel("kernels.int8", ("int8",), _int8_bytes),
    "conv2d": Kernel("kernels.conv", FLOATS, _conv_bytes),
    "inverted_residual": Kernel("kernels.conv.inverted_residual", FLOATS, _inverted_residual_bytes),
    "mcu": Kernel("mcu.tune", ()),
    "w4a16": Kernel("kernels.llm.w4a16", FLOATS, _w4a16_bytes),
    "swiglu": Kernel("kernels.llm.swiglu", FLOATS, lambda p: _w4a16_bytes(p, matrices=2)),
    "rmsnorm": Kernel("kernels.llm.rmsnorm", FLOATS, lambda p: 3 * p["rows"] * p["dim"] * _size(p["dtype"])),
    "rope": Kernel("kernels.llm.rope", FLOATS, lambda p: 3 * p["rows"] * p["head_dim"] * _size(p["dtype"])),
    "flash_attention": Kernel("kernels.llm.flash_attention", FLOATS, lambda p: _attention_bytes(p, p["seq"])),
    "decode_attention": Kernel("kernels.llm.decode_attention", FLOATS, lambda p: _attention_bytes(p, 1)),
    # The compiled CPU kernels: float32 activations, packed weights; host memory, no device to overfill.
    "cpu": Kernel("kernels.cpu.sweep", ()),  # every compiled CPU kernel below: the main job without a GPU
    "cpu_q4_gemv": Kernel("kernels.cpu.qmatmul", ()),
    "cpu_swiglu": Kernel("kernels.cpu.swiglu", ()),
    "cpu_attention": Kernel("kernels.cpu.attention", ()),
    "cpu_rmsnorm": Kernel("kernels.cpu.rmsnorm", ()),
    "cpu_matmul": Kernel("kernels.cpu.matmul", ()),
}


def entry(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of: {', '.join(sorted(KERNELS))}")
    return KERNELS[name]


def kernel_module(name: str) -> ModuleType:
    return importlib.import_module(entry(name).module)


def problem_bytes(name: str, problem: dict) -> int | None:
    """Bytes of one problem's operands and result, or None where the kernel does not say."""
    estimate = entry(name).problem_bytes
    return None if estimate is None else int(estimate(problem))
