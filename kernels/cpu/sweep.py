"""Every CPU kernel's default problems as one sweep: the autotuner's main job on a machine without a GPU.

A problem here is a kernel's own problem plus ``"kernel"``; ``search_space`` hands the rest to that
kernel's module, so tuned configs land in the cache under the kernel's own name and problem.
"""
from __future__ import annotations

import importlib

from tuning.space import SearchSpace

MODULES = {"cpu_q4_gemv": "kernels.cpu.qmatmul", "cpu_swiglu": "kernels.cpu.swiglu",
           "cpu_attention": "kernels.cpu.attention", "cpu_rmsnorm": "kernels.cpu.rmsnorm"}


def _module(kernel: str):
    if kernel not in MODULES:
        raise ValueError(f"unknown CPU kernel {kernel!r}; choose one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[kernel])


def _problems() -> list[dict]:
    return [{"kernel": name, **p} for name in MODULES for p in _module(name).DEFAULT_PROBLEMS]


def __getattr__(name: str):
    if name == "DEFAULT_PROBLEMS":  # built on use: the problems carry this CPU's name
        return _problems()
    raise AttributeError(name)


def parse_shape(text: str) -> dict:
    """``KERNEL:SHAPE`` with a kernel of ``MODULES`` and its own shape syntax, e.g. ``cpu_q4_gemv:1x960x576``."""
    kernel, _, shape = text.partition(":")
    return {"kernel": kernel, **_module(kernel).parse_shape(shape)}


def search_space(problem: dict) -> SearchSpace:
    rest = {k: v for k, v in problem.items() if k != "kernel"}
    return _module(problem["kernel"]).search_space(rest)
