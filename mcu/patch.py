"""Patch-based inference (MCUNetV2, Lin et al. 2021): run the first ops of a network patch by
patch so that only the segment's input and output are held whole.

The output of op ``split`` is cut into a ``grid x grid`` set of spatial patches; walking the ops
backwards gives, for each patch, the region of every tensor it needs (the receptive field with
its halo, recomputed where patches overlap). Each op then runs on its patch-local region with
adjusted padding (elementwise ops read a window of a larger input region row by row), in a
small patch arena planned like the main one. Which ops may run so is the op schema's
PATCHABLE trait (``models.schema``).
"""
from __future__ import annotations

import dataclasses

from models import schema
from models.ir import Graph, Op, Tensor

Range = tuple[int, int]  # [start, stop) along one spatial axis


@dataclasses.dataclass
class Segment:
    split: int  # index of the last op run patch by patch
    grid: int
    inputs: list[str]  # whole tensors the segment reads (kept in the main arena)
    output: str  # the whole tensor the segment writes
    regions: list[dict[str, tuple[Range, Range]]]  # per patch: tensor -> (rows, cols)

    def max_shape(self, graph: Graph, name: str) -> tuple[int, ...]:
        t = graph.tensors[name]
        h = max(r[name][0][1] - r[name][0][0] for r in self.regions)
        w = max(r[name][1][1] - r[name][1][0] for r in self.regions)
        return (1, h, w, t.shape[3])


def _unpatchable(graph: Graph, op: Op) -> str | None:
    """Why ``op`` cannot run on patches, or None."""
    if not schema.has(op.kind, schema.PATCHABLE):
        return "not a patchable kind"
    y = graph.tensors[op.outputs[0]]
    if len(y.shape) != 4 or y.shape[0] != 1:
        return "not a batch-1 NHWC op"
    for n in op.inputs if schema.has(op.kind, schema.ELEMENTWISE) else op.inputs[:1]:
        t = graph.tensors[n]
        if t.is_constant or t.shape != (y.shape if schema.has(op.kind, schema.ELEMENTWISE) else t.shape):
            return "a constant or broadcast operand"
        if len(t.shape) != 4:
            return "not a batch-1 NHWC op"
    if op.kind == "PAD" and tuple(op.options["paddings"][3]) != (0, 0):
        return "pads channels"
    return None


def _window(op: Op, graph: Graph, axis: int) -> tuple[int, int, int]:
    """(stride, kernel, dilation) of a window op along axis 1 (rows) or 2 (cols)."""
    o = op.options
    hw = "h" if axis == 1 else "w"
    if op.kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        return o[f"stride_{hw}"], o[f"filter_{hw}"], 1
    w = graph.tensors[op.inputs[1]]
    return o[f"stride_{hw}"], w.shape[axis], o[f"dilation_{hw}"]


def input_range(graph: Graph, op: Op, params: dict, axis: int, out: Range) -> Range:
    """Rows (axis 1) or columns (axis 2) of the op's first input that output range ``out`` reads."""
    size = graph.tensors[op.inputs[0]].shape[axis]
    o0, o1 = out
    if o1 <= o0:
        return (0, 0)
    if schema.has(op.kind, schema.ELEMENTWISE):
        return out
    if op.kind == "PAD":
        before = op.options["paddings"][axis][0]
        lo, hi = min(max(o0 - before, 0), size), min(max(o1 - before, 0), size)
        return (lo, hi) if lo < hi else (0, 0)
    stride, k, d = _window(op, graph, axis)
    before = params["padding"][axis - 1][0]
    return max(0, o0 * stride - before), min(size, (o1 - 1) * stride - before + (k - 1) * d + 1)


def _union(a: Range | None, b: Range) -> Range:
    if a is None or a[1] <= a[0]:
        return b
    if b[1] <= b[0]:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]))


def _bounds(n: int, parts: int) -> list[Range]:
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def segment(graph: Graph, params: list[dict], split: int, grid: int) -> Segment:
    """Check that ops ``0..split`` can run patch by patch and compute every patch's regions."""
    ops = graph.ops[: split + 1]
    if not 0 <= split < len(graph.ops):
        raise ValueError(f"patch split {split} is not an op index of graph {graph.name!r} (0..{len(graph.ops) - 1})")
    if grid < 1:
        raise ValueError(f"patch grid must be >= 1, got {grid}")
    for i, op in enumerate(ops):
        problem = _unpatchable(graph, op)
        if problem:
            raise ValueError(f"patch split {split}: op {i} ({op.kind}) cannot run patch by patch ({problem}); split "
                             f"before it (patchable: {schema.kinds_with(schema.PATCHABLE)})")
    produced = {n for op in ops for n in op.outputs}
    output = ops[-1].outputs[0]
    consumers = graph.consumers()
    for name in produced:
        later = [c for c in consumers[name] if c > split]
        if name != output and (later or name in graph.outputs):
            raise ValueError(f"patch split {split}: tensor {name!r} of the segment is used after it; choose another split")
    inputs = []
    for op in ops:
        for n in op.inputs:
            if n is not None and not graph.tensors[n].is_constant and n not in produced and n not in inputs:
                inputs.append(n)

    _, h, w, _ = graph.tensors[output].shape
    regions = []
    for rows in _bounds(h, min(grid, h)):
        for cols in _bounds(w, min(grid, w)):
            need: dict[str, list[Range]] = {output: [rows, cols]}
            # reverse topological order: every consumer of an op's output has been visited
            for j in range(len(ops) - 1, -1, -1):
                op = ops[j]
                out = need.get(op.outputs[0])
                if out is None:
                    continue
                srcs = op.inputs if schema.has(op.kind, schema.ELEMENTWISE) else op.inputs[:1]
                for n in srcs:
                    want = [input_range(graph, op, params[j], a + 1, out[a]) for a in range(2)]
                    old = need.get(n)
                    need[n] = want if old is None else [_union(old[a], want[a]) for a in range(2)]
            regions.append({n: (tuple(r[0]), tuple(r[1])) for n, r in need.items()})
    return Segment(split, grid, inputs, output, regions)


def patch_graph(graph: Graph, seg: Segment) -> Graph:
    """The segment as a graph of patch-sized tensors (largest patch), for the patch arena plan."""
    tensors = {}
    ops = graph.ops[: seg.split + 1]
    names = {n for op in ops for n in [*op.inputs, *op.outputs] if n is not None}
    for n in names:
        t = graph.tensors[n]
        if t.is_constant:
            tensors[n] = t
        else:
            tensors[n] = Tensor(n, seg.max_shape(graph, n), t.dtype, t.quantization)
    return Graph(tensors, list(ops), list(seg.inputs), [seg.output], name=f"{graph.name}:patch")


def outer_graph(graph: Graph, seg: Segment, patch_arena_bytes: int) -> tuple[Graph, int]:
    """The graph with the segment folded into one op (for the main plan) and that op's index 0.

    The folded op reads the segment inputs, writes the segment output and needs the patch
    arena as scratch."""
    folded = Op("PATCHED_SEGMENT", list(seg.inputs), [seg.output], {"bytes": patch_arena_bytes},
                name=f"ops 0..{seg.split} in {seg.grid}x{seg.grid} patches")
    return Graph(graph.tensors, [folded, *graph.ops[seg.split + 1 :]], graph.inputs, graph.outputs, graph.name), 0


def local_padding(seg_region_in: tuple[Range, Range], out_region: tuple[Range, Range], op: Op, params: dict,
                  graph: Graph) -> tuple[int, int]:
    """Padding (top, left) of the patch-local op: where output row 0 of the patch starts reading,
    relative to the first row of the patch's input region (negative = skip rows)."""
    result = []
    for a in range(2):
        (i0, _), (o0, _) = seg_region_in[a], out_region[a]
        if op.kind == "PAD":
            before = op.options["paddings"][a + 1][0]
            result.append(before + i0 - o0)
        else:
            stride, _, _ = _window(op, graph, a + 1)
            before = params["padding"][a][0]
            result.append(i0 - (o0 * stride - before))
    return result[0], result[1]


def reads_from_region_start(graph: Graph, params: list[dict], seg: Segment) -> bool:
    """Whether every window op of the segment starts reading at its input region's first row and
    column in every patch (no negative ``local_padding``), as kernels without a row stride need
    (CMSIS-NN's): a region is wider than one reader needs where two ops read the tensor."""
    windows = [j for j, op in enumerate(graph.ops[: seg.split + 1]) if schema.has(op.kind, schema.WINDOW) or op.kind == "PAD"]
    ops = graph.ops
    return all(min(local_padding(reg[ops[j].inputs[0]], reg[ops[j].outputs[0]], ops[j], params[j], graph)) >= 0
               for reg in seg.regions for j in windows)


def candidate_splits(graph: Graph) -> list[int]:
    """Ops after which a patch segment may end: every op up to it is patchable and only its
    output is used later."""
    result = []
    for split, op in enumerate(graph.ops):
        if _unpatchable(graph, op):
            break
        if _boundary_ok(graph, split):
            result.append(split)
    return result


def _boundary_ok(graph: Graph, split: int) -> bool:
    consumers = graph.consumers()
    output = graph.ops[split].outputs[0]
    produced = {n for op in graph.ops[: split + 1] for n in op.outputs}
    return all(n == output or (not any(c > split for c in consumers[n]) and n not in graph.outputs) for n in produced)
