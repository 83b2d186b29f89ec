"""The oracle: TensorFlow Lite Micro's Python interpreter (PyPI ``tflite-micro``, its reference
kernels), and the random inputs every comparison with it uses (JAX, the C export, the tests).

Inputs and outputs are batched the way ``models.execute`` takes them: one array per graph
input, ``count * n`` rows for ``count`` invocations of a graph whose leading dimension is ``n``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

from models.ir import Graph

Model = bytes | str | os.PathLike


def _runtime():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:  # pragma: no cover
        raise ImportError("the TFLite Micro oracle needs `pip install tflite-micro`") from None
    return runtime


def _bytes(model: Model) -> bytes:
    if isinstance(model, bytes | bytearray):
        return bytes(model)
    with open(model, "rb") as f:
        return f.read()


def interpreter(model: Model, preserve_all_tensors: bool = False):
    """A TFLite Micro interpreter for the model (a .tflite path or its bytes); the arena is
    10x the model + 8 MiB."""
    runtime = _runtime()
    data = _bytes(model)
    config = (runtime.InterpreterConfig.kPreserveAllTensors if preserve_all_tensors
              else runtime.InterpreterConfig.kAllocationRecording)
    return runtime.Interpreter.from_bytes(data, arena_size=10 * len(data) + (8 << 20), intrepreter_config=config)


def run(model: Model, *inputs: np.ndarray) -> list[np.ndarray]:
    """TFLite Micro's outputs for batched inputs: one invoke per ``n`` rows of each input (``n`` its
leading dimension in the model), outputs concatenated."""
    import tflite

    data = _bytes(model)
    subgraph = tflite.Model.GetRootAsModel(data, 0).Subgraphs(0)
    rows = [max(1, int(subgraph.Tensors(int(subgraph.Inputs(i))).ShapeAsNumpy()[0])) for i in range(len(inputs))]
    interp = interpreter(data)
    outs = []
    for b in range(inputs[0].shape[0] // rows[0]):
        for i, (x, n) in enumerate(zip(inputs, rows)):
            interp.set_input(np.ascontiguousarray(x[b * n:(b + 1) * n]), i)
        interp.invoke()
        outs.append([np.array(interp.get_output(i)) for i in range(subgraph.OutputsLength())])
    return [np.concatenate([o[i] for o in outs]) for i in range(subgraph.OutputsLength())]


def random_inputs(graph: Graph, count: int, seed: int = 0) -> list[np.ndarray]:
    """Inputs for ``count`` invocations: uniform int8 for int8 inputs; for float inputs, values
    spread uniformly (off the quantization grid) over the range of the QUANTIZE that consumes
    them plus 5% each side, which exercises its clamping; normal values without one."""
    rng = np.random.default_rng(seed)
    consumers = graph.consumers()
    out = []
    for name in graph.inputs:
        t = graph.tensors[name]
        shape = (count * t.shape[0],) + t.shape[1:]
        if t.dtype == "int8":
            out.append(rng.integers(-128, 128, shape, dtype=np.int8))
            continue
        if t.dtype != "float32":
            raise ValueError(f"input {name!r}: random inputs for dtype {t.dtype} are not supported (int8, float32 are)")
        q = next((graph.tensors[graph.ops[i].outputs[0]].quantization for i in consumers[name]
                  if graph.ops[i].kind == "QUANTIZE"), None)
        if q is None:
            out.append(rng.normal(size=shape).astype(np.float32))
            continue
        scale, zp = float(q.scale[0]), int(q.zero_point[0])
        margin = 0.05 * 255
        out.append(((rng.uniform(-128 - margin, 127 + margin, shape) - zp) * scale).astype(np.float32))
    return out


_ARENA_SCRIPT = """
import sys
from tflite_micro import runtime
interp = runtime.Interpreter.from_file(sys.argv[1], arena_size=8 << 20)
interp.invoke()
interp.print_allocations()
"""


def arena_bytes(path: str | os.PathLike) -> dict[str, int]:
    """TFLM's arena allocation total/head/tail (``print_allocations``, printed by C++ to stderr)."""
    proc = subprocess.run([sys.executable, "-c", _ARENA_SCRIPT, str(path)], capture_output=True, text=True, check=False,
                          timeout=300)
    text = proc.stdout + proc.stderr
    found = dict(re.findall(r"Arena allocation (total|head|tail) (\d+) bytes", text))
    if "total" not in found:
        raise RuntimeError(f"TFLM print_allocations gave no arena total for {path}:\n{text[-2000:]}")
    return {k: int(v) for k, v in found.items()}
