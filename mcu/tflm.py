"""The oracle: TensorFlow Lite Micro's Python interpreter (PyPI ``tflite-micro``): outputs on
given inputs and the arena total its RecordingMicroAllocator reports.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np


def _interpreter(path: str):
    try:
        from tflite_micro import runtime
    except ImportError:
        raise RuntimeError("the TFLite Micro oracle needs `pip install tflite-micro`") from None
    return runtime.Interpreter.from_file(str(path), arena_size=8 << 20)


def run(path: str, inputs: list[list[np.ndarray]], num_outputs: int = 1) -> list[list[np.ndarray]]:
    """The ``num_outputs`` graph outputs for each sample (a list with one array per graph input)."""
    interp = _interpreter(path)
    results = []
    for x in inputs:
        xs = x if isinstance(x, (list, tuple)) else [x]
        for k, xk in enumerate(xs):
            interp.set_input(xk, k)
        interp.invoke()
        results.append([np.array(interp.get_output(k)) for k in range(num_outputs)])
        interp.reset()
    return results


_ARENA_SCRIPT = """
import sys
from tflite_micro import runtime
interp = runtime.Interpreter.from_file(sys.argv[1], arena_size=8 << 20)
interp.invoke()
interp.print_allocations()
"""


def arena_bytes(path: str) -> dict[str, int]:
    """TFLM's arena allocation total/head/tail (``print_allocations``, printed by C++ to stderr)."""
    proc = subprocess.run([sys.executable, "-c", _ARENA_SCRIPT, str(path)], capture_output=True, text=True, check=False, timeout=300)
    text = proc.stdout + proc.stderr
    found = dict(re.findall(r"Arena allocation (total|head|tail) (\d+) bytes", text))
    if "total" not in found:
        raise RuntimeError(f"TFLM print_allocations gave no arena total for {path}:\n{text[-2000:]}")
    return {k: int(v) for k, v in found.items()}
