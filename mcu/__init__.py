"""TinyPallas MCU export: quantized graph IR -> C99 (portable int8 kernels), static memory
plan, board profiles, host and Cortex-M (QEMU) builds with exact instruction counts.
"""
from __future__ import annotations

import numpy as np

from mcu.boards import BOARDS, Board, board
from mcu.codegen import Config, Lowered, export, lower
from mcu.planner import MemoryPlan, plan_memory
from models.ir import Graph

__all__ = [
    "BOARDS",
    "Board",
    "Config",
    "Graph",
    "Lowered",
    "MemoryPlan",
    "board",
    "export",
    "lower",
    "pack_inputs",
    "plan_memory",
    "random_inputs",
    "unpack_outputs",
]


def random_inputs(graph: Graph, count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``count`` random inputs per graph input: uniform int8, or for float inputs uniform over
    the range their QUANTIZE consumer can represent (plus a margin that exercises clamping)."""
    rng = np.random.default_rng(seed)
    consumers = graph.consumers()
    result = []
    for _ in range(count):
        xs = []
        for name in graph.inputs:
            t = graph.tensors[name]
            if t.dtype == "int8":
                xs.append(rng.integers(-128, 128, size=t.shape, dtype=np.int8))
            elif t.dtype == "float32":
                lo, hi = -1.0, 1.0
                for i in consumers[name]:
                    op = graph.ops[i]
                    q = graph.tensors[op.outputs[0]].quantization
                    if op.kind == "QUANTIZE" and q is not None:
                        s, z = q.scalar_scale, q.scalar_zero_point
                        lo, hi = s * (-128 - z), s * (127 - z)
                margin = 0.05 * (hi - lo)
                xs.append(rng.uniform(lo - margin, hi + margin, size=t.shape).astype(np.float32))
            else:
                raise ValueError(f"graph input {name!r} has dtype {t.dtype}; only int8 and float32 are supported")
        result.append(xs)
    return result


def pack_inputs(graph: Graph, inputs: list[list[np.ndarray]]) -> np.ndarray:
    """(count, input bytes) uint8: the graph inputs of each sample back to back, as model_invoke reads them."""
    return np.stack([np.concatenate([np.ascontiguousarray(x).view(np.uint8).reshape(-1) for x in xs]) for xs in inputs])


def unpack_outputs(graph: Graph, raw: np.ndarray) -> list[list[np.ndarray]]:
    """Inverse of the output packing: per sample, one array per graph output."""
    result = []
    for row in raw:
        outs, off = [], 0
        for name in graph.outputs:
            t = graph.tensors[name]
            outs.append(row[off : off + t.nbytes].view(np.dtype(t.dtype)).reshape(t.shape))
            off += t.nbytes
        result.append(outs)
    return result
