"""Which kernels the autotuner can sweep, by name.

Each entry names a module that offers, for the autotuner:
  ``search_space(problem: dict) -> kernels.space.SearchSpace``
  ``parse_shape(text: str) -> dict``      (the ``--shape`` syntax, e.g. ``"1024x1024x1024"``)
  ``DEFAULT_PROBLEMS: list[dict]``        (what a sweep with no ``--shape`` tunes)
and optionally ``PRESETS: dict[str, list[dict]]`` (``--layer mobilenetv2``: named problem lists).
A problem dict holds shapes and dtypes; ``--dtype`` sets its ``"dtype"`` entry.
"""
from __future__ import annotations

import importlib

KERNELS = {
    "matmul": "kernels.matmul",
    "int8": "kernels.int8",
    "conv2d": "kernels.conv",
    "inverted_residual": "kernels.conv.inverted_residual",
    "mcu": "mcu.tune",
    "w4a16": "kernels.llm.w4a16",
    "swiglu": "kernels.llm.swiglu",
    "rmsnorm": "kernels.llm.rmsnorm",
    "rope": "kernels.llm.rope",
    "flash_attention": "kernels.llm.flash_attention",
    "decode_attention": "kernels.llm.decode_attention",
    "cpu": "kernels.cpu.sweep",  # every compiled CPU kernel below: the main job on a machine without a GPU
    "cpu_q4_gemv": "kernels.cpu.qmatmul",
    "cpu_swiglu": "kernels.cpu.swiglu",
    "cpu_attention": "kernels.cpu.attention",
    "cpu_rmsnorm": "kernels.cpu.rmsnorm",
    "cpu_matmul": "kernels.cpu.matmul",
}


def kernel_module(name: str):
    if name not in KERNELS:
        raise SystemExit(f"unknown kernel {name!r}; choose one of: {', '.join(sorted(KERNELS))}")
    return importlib.import_module(KERNELS[name])
