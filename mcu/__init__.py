"""TinyPallas MCU export: quantized graph IR -> C99 (portable int8 kernels), static memory
plan, board profiles, host and Cortex-M (QEMU) builds with exact instruction counts.
"""
from __future__ import annotations

import numpy as np

from mcu.boards import BOARDS, Board, board
from mcu.codegen import Config, Lowered, export, lower
from mcu.planner import MemoryPlan, plan_memory
from models.ir import Graph
from models.tflm import random_inputs

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


def pack_inputs(graph: Graph, inputs: list[np.ndarray]) -> np.ndarray:
    """(count, input bytes) uint8 from batched inputs (``models.tflm.random_inputs``'s layout: one
    array per graph input, ``count`` graph invocations of its leading dimension each): the graph
    inputs of each invocation back to back, as ``model_invoke`` reads them."""
    count = inputs[0].shape[0] // graph.tensors[graph.inputs[0]].shape[0]  # each input: count x its leading dim
    rows = [np.ascontiguousarray(x).view(np.uint8).reshape(count, -1) for x in inputs]
    return np.concatenate(rows, axis=1)


def unpack_outputs(graph: Graph, raw: np.ndarray) -> list[np.ndarray]:
    """Inverse of the output packing: one batched array per graph output (``models.tflm.run``'s layout)."""
    outs, off = [], 0
    for name in graph.outputs:
        t = graph.tensors[name]
        block = np.ascontiguousarray(raw[:, off: off + t.nbytes])
        outs.append(block.view(np.dtype(t.dtype)).reshape((-1,) + t.shape[1:]))
        off += t.nbytes
    return outs
