"""Static memory plan: every activation and scratch buffer gets a fixed offset in one arena.

Tensor lifetimes come from the op order; buffers are placed greedily, largest first, at the
lowest offset where they collide with no buffer alive at the same time (first fit). An op's
output may overlap the tail of an input that dies at that op when the kernel's walk order
makes it safe (``overlap_limit``): this generalises TinyEngine's in-place depthwise to every
streaming kernel (conv, depthwise, pooling, pad, elementwise). Which ops stream how is read
from the op schema's traits (``models.schema``: WINDOW, ELEMENTWISE, ALIAS). The graph inputs
are read where the caller holds them (zero-copy): they take no arena space and are never
written over.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from models import schema
from models.ir import Graph, Op

ALIGN = 4  # every buffer starts on a word boundary (int32 scratch, float I/O, word loads)


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A region of the arena: an activation tensor (or several aliased ones) or a scratch area.

    first/last: indices of the first and last op that touch it (-1 = before op 0, i.e. a
    graph input copied in; ``len(ops)`` = after the last op, i.e. a graph output copied out).
    """

    name: str
    size: int
    first: int
    last: int


@dataclasses.dataclass
class MemoryPlan:
    buffers: dict[str, Buffer]
    offsets: dict[str, int]
    tensor_buffer: dict[str, str]  # tensor name -> buffer name (RESHAPE outputs alias inputs)
    scratch: dict[int, str]  # op index -> its scratch buffer name
    overlaps: dict[tuple[str, str], int]  # (input buffer, output buffer) -> largest allowed offset delta
    num_ops: int
    channel_in_place: frozenset[int] = frozenset()  # ops whose output shares the input buffer (TinyEngine)
    external: frozenset[str] = frozenset()  # buffers outside the arena: the graph inputs, in the caller's buffer

    def is_external(self, tensor: str) -> bool:
        """Whether ``tensor`` lives in the caller's input buffer (a graph input or an alias of one)."""
        return self.tensor_buffer[tensor] in self.external

    @property
    def peak_bytes(self) -> int:
        return max((self.offsets[b] + self.buffers[b].size for b in self.buffers), default=0)

    def offset(self, tensor: str) -> int:
        return self.offsets[self.tensor_buffer[tensor]]

    def live(self, step: int) -> list[str]:
        return [b.name for b in self.buffers.values() if b.first <= step <= b.last]

    def per_op(self) -> list[dict]:
        """For each op: bytes of the buffers alive at it and the arena high-water mark they reach."""
        rows = []
        for i in range(self.num_ops):
            names = self.live(i)
            rows.append(
                {
                    "op": i,
                    "live_bytes": sum(self.buffers[n].size for n in names),
                    "high_water": max((self.offsets[n] + self.buffers[n].size for n in names), default=0),
                }
            )
        return rows


def _align_up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def _align_down(x: int) -> int:
    return (x // ALIGN) * ALIGN


def _first_tap(out_idx: np.ndarray, stride: int, pad: int, dilation: int, k: int, size: int) -> np.ndarray:
    """Index of the first in-range input row/column read for each output row/column."""
    start = out_idx * stride - pad
    skip = np.where(start < 0, (-start + dilation - 1) // dilation, 0)  # taps that fall in the padding
    first = start + skip * dilation
    return np.minimum(first, size - 1)


def overlap_limit(graph: Graph, op: Op, input_index: int, params: dict) -> int | None:
    """Largest ``delta`` (bytes) such that the output may start at ``input offset + delta``.

    The kernels write output step ``p`` (one output pixel, one PAD row, one element) only
    after reading nothing below the first byte any step ``>= p`` still needs, so the output
    may overlap the input as long as ``delta + write_end(p) <= first_read(>= p)`` for every
    step. ``None`` when the op cannot run in place.
    """
    t = graph.tensors
    x, y = t[op.inputs[input_index]], t[op.outputs[0]]
    if schema.has(op.kind, schema.WINDOW):
        if x.shape[0] != 1:
            return None  # one kernel call per image: the walk below is one image's
        if op.kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
            kh, kw, dh, dw = op.options["filter_h"], op.options["filter_w"], 1, 1
        else:
            w = t[op.inputs[1]]
            kh, kw = w.shape[1], w.shape[2]
            dh, dw = op.options["dilation_h"], op.options["dilation_w"]
        (pt, _), (pl, _) = params["padding"]
        _, ih, iw, ic = x.shape
        _, oh, ow, oc = y.shape
        rows = _first_tap(np.arange(oh), op.options["stride_h"], pt, dh, kh, ih)
        cols = _first_tap(np.arange(ow), op.options["stride_w"], pl, dw, kw, iw)
        read = ((rows[:, None] * iw + cols[None, :]) * ic).reshape(-1)
        write_end = (np.arange(oh * ow) + 1) * oc
    elif op.kind == "PAD":
        pads = op.options["paddings"]
        rows_out = int(np.prod(y.shape[:-1]))
        idx = np.stack(np.unravel_index(np.arange(rows_out), y.shape[:-1]), axis=1)
        src = idx - np.array([b for b, _ in pads[:-1]])
        inside = np.all((src >= 0) & (src < np.array(x.shape[:-1])), axis=1)
        flat = np.ravel_multi_index(np.clip(src, 0, np.array(x.shape[:-1]) - 1).T, x.shape[:-1])
        read = np.where(inside, flat * x.shape[-1], np.iinfo(np.int64).max)
        write_end = (np.arange(rows_out) + 1) * y.shape[-1]
    elif schema.has(op.kind, schema.ELEMENTWISE) and x.shape == y.shape:
        # element i (a bytes in, b bytes out) is read before it is written: the output may start
        # at input + (a - b) when it is narrower, (a - b) * n below when it is wider
        a, b = np.dtype(x.dtype).itemsize, np.dtype(y.dtype).itemsize
        return (a - b) * (y.size if a < b else 1)
    else:
        return None
    first_read = np.minimum.accumulate(read[::-1])[::-1]  # first byte read at any step >= p
    return int(np.min(first_read - write_end))


def plan_memory(
    graph: Graph,
    op_params: list[dict],
    scratch_bytes: dict[int, int] | None = None,
    in_place: bool = True,
    channel_in_place: dict[int, int] | None = None,
    overlap_limits: dict[int, int | None] | None = None,
    caller_inputs: bool = True,
) -> MemoryPlan:
    """Lifetimes, aliases, overlaps and greedy first-fit offsets for ``graph``.

    op_params:     ``models.quantization.op_params`` of each op (paddings for the overlap rule).
    scratch_bytes: op index -> bytes of scratch it needs during that op only.
    in_place:      allow outputs to overlap dying inputs (``overlap_limit``).
    channel_in_place: op index -> scratch bytes, for depthwise ops that may write their output
                   over their input channel by channel (TinyEngine); applied where the input
                   dies at the op, recorded in ``MemoryPlan.channel_in_place``.
    overlap_limits: op index -> the overlap its kernel allows, where the kernel that runs the op
                   does not walk as ``overlap_limit`` assumes (the portable kernels' order): None
                   (no overlap) or the one delta it allows (0: output over the input, as the
                   specialized channel-by-channel depthwise writes it).
    caller_inputs: the graph inputs (and their aliases) stay in the caller's buffer: no arena
                   space, no output written over them (``MemoryPlan.external``); False: they
                   are copied into the arena like any other tensor.
    """
    ops = graph.ops
    n = len(ops)
    last_use = {name: max(users) for name, users in graph.consumers().items() if users}
    applied: set[int] = set()
    tensor_buffer: dict[str, str] = {}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    size: dict[str, int] = {}

    def touch(buf: str, i: int):
        first[buf] = min(first.get(buf, i), i)
        last[buf] = max(last.get(buf, i), i)

    for name in graph.inputs:
        tensor_buffer[name] = name
        size[name] = graph.tensors[name].nbytes
        touch(name, -1)
    for i, op in enumerate(ops):
        for name in op.inputs:
            if name is not None and not graph.tensors[name].is_constant:
                touch(tensor_buffer[name], i)
        shares = False
        if channel_in_place and i in channel_in_place:
            buf = tensor_buffer[op.inputs[0]]
            members = [t for t, b in tensor_buffer.items() if b == buf]
            shares = all(last_use.get(t, n) <= i and t not in graph.outputs for t in members) and not (
                caller_inputs and any(t in graph.inputs for t in members))
            if shares:
                applied.add(i)
                size[buf] = max(size[buf], graph.tensors[op.outputs[0]].nbytes)
                scratch_bytes = {**(scratch_bytes or {}), i: (scratch_bytes or {}).get(i, 0) + channel_in_place[i]}
        for name in op.outputs:
            if schema.has(op.kind, schema.ALIAS) or shares:  # same bytes (RESHAPE) or written over the input
                tensor_buffer[name] = tensor_buffer[op.inputs[0]]
            else:
                tensor_buffer[name] = name
                size[name] = graph.tensors[name].nbytes
            touch(tensor_buffer[name], i)
    for name in graph.outputs:
        touch(tensor_buffer[name], n)
    external = frozenset(tensor_buffer[name] for name in graph.inputs) if caller_inputs else frozenset()

    scratch: dict[int, str] = {}
    for i, nbytes in sorted((scratch_bytes or {}).items()):
        if nbytes > 0:
            buf = f"scratch:{i}"
            scratch[i] = buf
            size[buf] = nbytes
            touch(buf, i)

    buffers = {b: Buffer(b, _align_up(size[b]), first[b], last[b]) for b in size if b not in external}

    overlaps: dict[tuple[str, str], int] = {}
    if in_place:
        for i, op in enumerate(ops):
            if schema.has(op.kind, schema.ALIAS) or i in applied:
                continue
            out_buf = tensor_buffer[op.outputs[0]]
            for k, name in enumerate(op.inputs[:2]):
                if name is None or graph.tensors[name].is_constant:
                    continue
                if k == 1 and not schema.has(op.kind, schema.ELEMENTWISE):
                    continue
                in_buf = tensor_buffer[name]
                if in_buf in external or buffers[in_buf].last != i or buffers[out_buf].first != i:
                    continue
                if overlap_limits is not None and i in overlap_limits:
                    limit = overlap_limits[i]
                else:
                    limit = overlap_limit(graph, op, k, op_params[i])
                if limit is not None:
                    overlaps[(in_buf, out_buf)] = limit

    # A rigid chain can drift far down the arena, so not every allowed link is worth keeping:
    # one pass of greedy descent (drop the links whose removal does not raise the peak),
    # largest drift first and once more in the other order, and one pass of greedy ascent
    # (from no links, keep those that lower the peak); each judging a link by the peak alone
    # or also by the other buffers' ends (which matters when the peak lies elsewhere); the best.
    order = sorted(overlaps, key=lambda k: overlaps[k])
    best = None
    for start, sequence, tie_break in ((overlaps, order, False), (overlaps, order[::-1], False), ({}, order, False),
                                       (overlaps, order, True), (overlaps, order[::-1], True), ({}, order, True)):
        links, offsets = dict(start), _first_fit(buffers, start)
        cost = _cost if tie_break else _peak
        for pair in sequence:
            trial = {k: v for k, v in links.items() if k != pair} if pair in links else {**links, pair: overlaps[pair]}
            trial_offsets = _first_fit(buffers, trial)
            if cost(buffers, trial_offsets) < cost(buffers, offsets) or (
                    pair in links and _peak(buffers, trial_offsets) <= _peak(buffers, offsets)):
                links, offsets = trial, trial_offsets
        if best is None or _cost(buffers, offsets) < _cost(buffers, best[1]):
            best = (links, offsets)
    overlaps, offsets = best
    return MemoryPlan(buffers, offsets, tensor_buffer, scratch, overlaps, n, frozenset(applied), external)


def _cost(buffers: dict[str, Buffer], offsets: dict[str, int]) -> tuple[int, int]:
    """The peak, then the sum of buffer ends: lower ends elsewhere leave room for the next link."""
    return _peak(buffers, offsets), sum(offsets[b] + buffers[b].size for b in buffers)


def _peak(buffers: dict[str, Buffer], offsets: dict[str, int]) -> int:
    return max((offsets[b] + buffers[b].size for b in buffers), default=0)


def _first_fit(buffers: dict[str, Buffer], overlaps: dict[tuple[str, str], int]) -> dict[str, int]:
    """Place buffers; each chain of overlapping (input -> output) pairs moves as one rigid group.

    In a chain the output sits at ``input + delta`` (the largest word-aligned delta allowed);
    members of a chain are alive one after another, so only neighbours overlap in time.
    Groups are placed largest member first, each at the lowest base offset where none of its
    members collides with an already placed buffer alive at the same time.
    """
    parent: dict[str, tuple[str, int]] = {}  # output buffer -> (input buffer, delta)
    for (src, dst), limit in overlaps.items():
        if dst not in parent and src not in {s for s, _ in parent.values()}:
            parent[dst] = (src, _align_down(limit))
    rel: dict[str, int] = {}
    root: dict[str, str] = {}

    def resolve(b: str) -> tuple[str, int]:
        if b not in rel:
            if b in parent:
                r, off = resolve(parent[b][0])
                root[b], rel[b] = r, off + parent[b][1]
            else:
                root[b], rel[b] = b, 0
        return root[b], rel[b]

    groups: dict[str, list[str]] = {}
    for b in buffers:
        groups.setdefault(resolve(b)[0], []).append(b)
    placed_off: list[int] = []
    placed_end: list[int] = []
    placed_first: list[int] = []
    placed_last: list[int] = []
    offsets: dict[str, int] = {}
    order = sorted(groups.values(), key=lambda g: (-max(buffers[b].size for b in g), min(buffers[b].first for b in g)))
    for members in order:
        low = min(rel[b] for b in members)
        mem = [(buffers[b], rel[b] - low) for b in members]
        p_off, p_end = np.array(placed_off, dtype=np.int64), np.array(placed_end, dtype=np.int64)
        p_first, p_last = np.array(placed_first), np.array(placed_last)
        pairs = []  # (member rel, member size, placed off, placed end) for buffers alive together
        for b, r in mem:
            alive = (p_first <= b.last) & (b.first <= p_last)
            pairs.append((np.full(int(alive.sum()), r), np.full(int(alive.sum()), b.size), p_off[alive], p_end[alive]))
        m_rel = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
        m_size = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.int64)
        o_off = np.concatenate([p[2] for p in pairs]) if pairs else np.zeros(0, np.int64)
        o_end = np.concatenate([p[3] for p in pairs]) if pairs else np.zeros(0, np.int64)
        candidates = np.unique(np.concatenate([[0], o_end - m_rel]))
        candidates = candidates[candidates >= 0]
        for c in candidates:
            start = c + m_rel
            if not np.any((start < o_end) & (o_off < start + m_size)):
                base = int(c)
                break
        for b, r in mem:
            offsets[b.name] = base + r
            placed_off.append(base + r)
            placed_end.append(base + r + b.size)
            placed_first.append(b.first)
            placed_last.append(b.last)
    return offsets
