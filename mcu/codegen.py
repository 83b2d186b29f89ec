"""Lower a quantized graph (models.ir) to C99: weights as const arrays, one static arena, one
kernel call per layer, ``model_invoke``. The integer parameters come from models.quantization;
each op is written by its emitter (``mcu.emit``) in the chosen backend's form.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
from collections.abc import Callable

import numpy as np

from mcu import emit, patch, specialized
from mcu.emit.conv import is_pointwise
from mcu.planner import MemoryPlan, plan_memory
from models import quantization, schema
from models.ir import Graph, Op

C_DIR = pathlib.Path(__file__).parent / "c"
BACKENDS = ("portable", "cmsis-nn", "specialized")
# the specialized backend's per-layer knobs (Config.layer_options)
LAYER_KNOBS = {"kernel": ("col2", "direct", "planar", "portable", "general"), "weights": ("s16", "s8"), "unroll": ("1", "2"),
               "rows": ("1", "2", "4"), "strip": ("all", "16", "8", "4", "2"), "fuse": ("none", "pointwise"),
               "planes": ("1", "2", "4")}
CONV_VARIANTS = ("direct", "1x1", "1x1_unroll4")
DEPTHWISE_VARIANTS = ("overlap", "channel_in_place")
MANIFEST = "build.json"  # what mcu.build compiles and links for an exported folder


@dataclasses.dataclass(frozen=True)
class Config:
    """The schedule: what the autotuner searches and ``mcu export`` applies.

    backend:   ``"portable"`` (the project's C99 kernels) or ``"cmsis-nn"`` (CMSIS-NN's s8
               functions where CMSIS-NN has the op, see each emitter's ``cmsis_nn`` form; needs
               ``$CMSIS_NN_ROOT``), or ``"specialized"`` (C generated per layer with its shapes and
               constants folded in, Cortex-M DSP SIMD: mcu/c/tp_specialized.h, mcu.specialized).
               Each backend is a form of the emitters in ``mcu.emit``.
    in_place:  let outputs overlap the inputs that die at their op (mcu.planner) where the
               kernel's walk order makes it safe: the portable kernels', CMSIS-NN's except its
               1x1 convs (``cmsis_no_overlap``), the specialized ones' (depthwise: at delta 0).
    conv1x1:   kernel for 1x1 stride-1 unpadded convs: ``"direct"`` (the general conv),
               ``"1x1"`` (pixel x channel product) or ``"1x1_unroll4"`` (four output channels
               per input load).
    layer_variants: per-layer overrides ``((op_index, variant), ...)`` of ``conv1x1``.
    depthwise: ``"overlap"`` (the output may overlap the input's tail, four channels per pass)
               or ``"channel_in_place"`` (TinyEngine: channel by channel over the input, with a
               one-channel buffer), where the input dies at the op.
    patch_split: run ops ``0..patch_split`` patch by patch (MCUNetV2); -1 = off. The patches run
               the portable kernels, or CMSIS-NN's on the cmsis-nn backend.
    patch_grid:  the patches tile the segment output ``patch_grid x patch_grid``.
    layer_options: the specialized backend's per-layer knobs ``((op_index, knob, value), ...)``:
               ``kernel``: for a conv ``"col2"`` (two output pixels per pass through widened
               int16 columns, 2x2 register tiles) or ``"direct"`` (one pixel, the input read in
               place: no or one int8 column of scratch), for a depthwise ``"planar"`` (channel
               by channel, written over its input), or ``"portable"`` (the portable kernel,
               which may overlap its input's tail); for the cmsis-nn backend's 1x1 convs
               ``"general"`` (arm_convolve_s8 instead of arm_convolve_1x1_s8_fast: slower, but
               its output may overlap its input); ``weights`` ``"s16"`` (int16 in flash, twice the bytes, no widening in the inner
               loop) or ``"s8"``; ``unroll`` ``"1"``/``"2"`` (groups of four k per inner iteration,
               conv); ``rows`` ``"1"``/``"2"``/``"4"`` (outputs per pass, fully connected); ``strip``
               (output rows per pass over a planar depthwise's plane: its scratch; ``"all"``);
               ``fuse`` ``"pointwise"`` (a planar depthwise computes its input channel by channel
               from the 1x1 conv that produces it, so that tensor is never stored: see
               ``fuse_pointwise``) or ``"none"``; ``planes`` (channels per pass of a fused depthwise,
               one plane each: more share each widened input word, at that many planes of scratch).
    flash_budget: bytes of const data the specialized backend may use (0: no limit): layers
               without an explicit ``weights`` knob keep int16 weights, most reused first, while
               the total fits, and take int8 weights beyond.
    """

    backend: str = "portable"
    in_place: bool = True
    conv1x1: str = "1x1_unroll4"
    layer_variants: tuple[tuple[int, str], ...] = ()
    depthwise: str = "overlap"
    patch_split: int = -1
    patch_grid: int = 2
    layer_options: tuple[tuple[int, str, str], ...] = ()
    flash_budget: int = 0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not available; choose one of {BACKENDS}")
        for v in (self.conv1x1, *(v for _, v in self.layer_variants)):
            if v not in CONV_VARIANTS:
                raise ValueError(f"conv variant {v!r} unknown; choose one of {CONV_VARIANTS}")
        if self.depthwise not in DEPTHWISE_VARIANTS:
            raise ValueError(f"depthwise variant {self.depthwise!r} unknown; choose one of {DEPTHWISE_VARIANTS}")
        for _, knob, value in self.layer_options:
            if knob not in LAYER_KNOBS or str(value) not in LAYER_KNOBS[knob]:
                raise ValueError(f"layer option {knob}={value!r} unknown; choose from {LAYER_KNOBS}")

    def variant(self, op_index: int) -> str:
        return dict(self.layer_variants).get(op_index, self.conv1x1)

    def options(self, op_index: int) -> dict[str, str]:
        return {knob: str(value) for i, knob, value in self.layer_options if i == op_index}


def scratch_bytes(graph: Graph, op: Op, params: dict | None = None, backend: str = "portable",
                  options: dict | None = None) -> int:
    """Scratch the kernel of ``op`` needs while it runs (the portable one, or the specialized
    form with the layer's ``options`` where ``backend`` is ``"specialized"`` and it has one)."""
    params = params if params is not None else quantization.op_params(graph, op)
    if backend == "specialized":
        own = emit.emitter(op.kind).specialized_scratch(graph, op, params, options or {})
        if own is not None:
            return own
    return emit.emitter(op.kind).scratch_bytes(graph, op, params)


def cmsis_no_overlap(graph: Graph, params: list[dict], config: Config) -> set[int]:
    """Ops whose CMSIS-NN kernel does not walk its output pixel by pixel, so that no overlap is
    safe: 1x1 convs (arm_convolve_1x1_s8_fast / _s8 run arm_nn_mat_mult_nt_t_s8, whose DSP form
    writes one pair of output channels for every pixel before it reads the inputs again). The
    other CMSIS-NN kernels the backend calls keep the portable kernels' order, checked in the
    sources of CMSIS-NN 99f736a6: arm_convolve_s8 (also what arm_convolve_1_x_n_s8 runs without
    MVE) gathers one or two pixels' columns and writes their outputs, arm_depthwise_conv_3x3_s8,
    _s8_opt and _s8 and the pooling kernels walk output pixels in order reading only their
    taps, and arm_elementwise_add/mul_s8 read each group of four elements before writing it
    (mcu/planner.py overlap_limit); fully connected and softmax never overlap."""
    out = set()
    for i, op in enumerate(graph.ops):
        if op.kind == "CONV_2D" and config.options(i).get("kernel") != "general":
            w, o = graph.tensors[op.inputs[1]], op.options
            (pt, _), (pl, _) = params[i]["padding"]
            if w.shape[1:3] == (1, 1) and pt == pl == 0 and o["dilation_h"] == o["dilation_w"] == 1:  # arm_nn_is_convolve_1x1
                out.add(i)
    return out


def specialized_depthwise(graph: Graph, params: list[dict], config: Config) -> set[int]:
    """Depthwise ops the specialized backend runs channel by channel (overlapping only at delta 0)."""
    from mcu.emit.conv import depthwise_geometry

    return {i for i, op in enumerate(graph.ops)
            if op.kind == "DEPTHWISE_CONV_2D" and depthwise_geometry(graph, op, params[i]) is not None
            and config.options(i).get("kernel", "planar") == "planar"}


@dataclasses.dataclass
class Lowered:
    """Generated sources and the facts reported about them."""

    model_c: str
    model_h: str
    plan: MemoryPlan
    flash_bytes: int  # weights, biases, tables and quantization parameters (const data)
    input_bytes: int
    output_bytes: int
    input_dtype: str
    output_dtype: str
    layers: list[dict]  # per op: index, kind, kernel, output shape, weight bytes
    markers: list[str]  # what each TP_LAYER() profiling marker in model_invoke starts
    backend: str = "portable"
    prefix: str = ""  # of every global symbol ("" = none)

    @property
    def peak_sram_bytes(self) -> int:
        return self.plan.peak_bytes

    @property
    def uses_cmsis_nn(self) -> bool:
        return self.backend == "cmsis-nn"


def backend_scratch(graph: Graph, config: Config, params: list[dict]) -> dict[int, int]:
    """Scratch bytes per op of the kernels ``config`` runs (CMSIS-NN's from its size functions)."""
    scratch = {i: scratch_bytes(graph, op, params[i], config.backend, config.options(i))
               for i, op in enumerate(graph.ops)}
    if config.backend == "cmsis-nn":
        from mcu import cmsis_nn

        probes = {i: emit.emitter(op.kind).cmsis_nn_buffer(graph, op, params[i], config.options(i))
                  for i, op in enumerate(graph.ops) if emit.form(op.kind, config.backend) is not None}
        for i, nbytes in cmsis_nn.buffer_sizes({i: p for i, p in probes.items() if p}).items():
            scratch[i] = max(scratch[i], nbytes)
    return scratch


def fold_pads(graph: Graph, params: list[dict], first: int = 0) -> tuple[Graph, list[dict], dict[int, int]]:
    """Spatial PADs (of the zero point, as TFLite pads int8) whose one reader is a conv or
    depthwise: the conv reads the PAD's input with the padding added to its own, and the PAD
    becomes an alias that writes nothing, so neither its copy nor the padded tensor costs
    anything. Op indices are kept. Returns the graph, its op params and {PAD index: conv index}."""
    consumers = graph.consumers()
    ops, params, folded = list(graph.ops), list(params), {}
    for i, op in enumerate(graph.ops):
        if i < first or op.kind != "PAD" or op.outputs[0] in graph.outputs or len(consumers[op.outputs[0]]) != 1:
            continue
        j = consumers[op.outputs[0]][0]
        conv, pads = graph.ops[j], op.options["paddings"]
        x = graph.tensors[op.inputs[0]]
        if (conv.kind not in ("CONV_2D", "DEPTHWISE_CONV_2D") or conv.inputs[0] != op.outputs[0] or len(pads) != 4
                or x.shape[0] != 1 or tuple(pads[0]) != (0, 0) or tuple(pads[3]) != (0, 0)):
            continue
        (pt, pb), (pl, pr) = params[j]["padding"]
        params[j] = {**params[j], "padding": ((pt + pads[1][0], pb + pads[1][1]), (pl + pads[2][0], pr + pads[2][1]))}
        ops[j] = dataclasses.replace(conv, inputs=[op.inputs[0], *conv.inputs[1:]])
        ops[i] = dataclasses.replace(op, kind="RESHAPE", options={"new_shape": graph.tensors[op.outputs[0]].shape})
        params[i] = {}
        folded[i] = j
    if not folded:
        return graph, params, folded
    return (Graph(graph.tensors, ops, graph.inputs, graph.outputs, graph.name, graph.metadata), params, folded)


def fusable_pointwise(graph: Graph, params: list[dict], j: int, first: int = 0) -> int | None:
    """The 1x1 conv whose output only depthwise op ``j`` reads (PADs folded into ``j`` aside), which
    ``j`` can compute its input from channel by channel (``fuse_pointwise``); None where there is none."""
    from mcu.emit.conv import depthwise_geometry

    op = graph.ops[j]
    if op.kind != "DEPTHWISE_CONV_2D" or depthwise_geometry(graph, op, params[j]) is None:
        return None
    x = op.inputs[0]
    producers = [i for i, o in enumerate(graph.ops) if x in o.outputs]
    if len(producers) != 1 or producers[0] < first or x in graph.outputs:
        return None
    i = producers[0]
    pw = graph.ops[i]
    if not is_pointwise(graph, pw, params[i]) or graph.tensors[pw.inputs[0]].shape[0] != 1:
        return None
    consumers = graph.consumers()
    readers = [c for c in consumers[x] if c != j]
    # a PAD folded into j (fold_pads) is an alias nothing reads any more
    if any(graph.ops[c].kind != "RESHAPE" or consumers.get(graph.ops[c].outputs[0]) for c in readers):
        return None
    return i


def fuse_pointwise(graph: Graph, params: list[dict], config: Config, first: int = 0
                   ) -> tuple[Graph, list[dict], dict[int, int]]:
    """Depthwise ops with the ``fuse`` knob ``"pointwise"`` read the input of the 1x1 conv before
    them (``fusable_pointwise``) and compute its output channel by channel into their planes; the
    conv becomes an alias that writes nothing, so its output tensor takes no memory. The conv's op
    and params ride along in the depthwise's params (``"pointwise"``). Op indices are kept.
    Returns the graph, its op params and {conv index: depthwise index}."""
    ops, params, fused = list(graph.ops), list(params), {}
    for j in range(len(graph.ops)):
        if config.options(j).get("fuse") != "pointwise" or config.options(j).get("kernel", "planar") != "planar":
            continue
        i = fusable_pointwise(graph, params, j, first)
        if i is None:
            continue
        pw = graph.ops[i]
        params[j] = {**params[j], "pointwise": (pw, params[i])}
        ops[j] = dataclasses.replace(ops[j], inputs=[pw.inputs[0], *ops[j].inputs[1:]])
        ops[i] = dataclasses.replace(pw, kind="RESHAPE", inputs=[pw.inputs[0]],
                                     options={"new_shape": graph.tensors[pw.outputs[0]].shape})
        params[i] = {}
        fused[i] = j
    if not fused:
        return graph, params, fused
    return (Graph(graph.tensors, ops, graph.inputs, graph.outputs, graph.name, graph.metadata), params, fused)


def specialized_graph(graph: Graph, params: list[dict], config: Config) -> tuple[Graph, list[dict], dict[int, int]]:
    """The graph the specialized backend runs: PADs folded into their convs, 1x1 convs fused into
    the depthwise ops after them where the schedule says so; {op folded away: op that runs it}."""
    graph, params, folded = fold_pads(graph, params, config.patch_split + 1)
    graph, params, fused = fuse_pointwise(graph, params, config, config.patch_split + 1)
    return graph, params, {**folded, **fused}


def plan_schedule(graph: Graph, config: Config, params: list[dict] | None = None, scratch: dict[int, int] | None = None):
    """The memory plan of ``graph`` under ``config``: ``(segment, plan, patch_plan)``; segment and
    patch_plan are None without patch-based inference. In the plan a patched segment is op 0.
    Without ``params``, the specialized backend's PAD folding (fold_pads) is applied first."""
    if params is None:
        params = [quantization.op_params(graph, op) for op in graph.ops]
        if config.backend == "specialized":
            graph, params, _ = specialized_graph(graph, params, config)
    if scratch is None:
        scratch = backend_scratch(graph, config, params)
    cmsis = config.backend == "cmsis-nn"
    planar = specialized_depthwise(graph, params, config) if config.backend == "specialized" else set()

    split = max(config.patch_split, -1)  # ops 0..split run patch by patch (portable or CMSIS-NN kernels)
    planar = {i for i in planar if i > split}

    def channel_in_place(ops: list[Op], first: int) -> dict[int, int] | None:
        if config.backend == "specialized":  # its depthwise overlaps at delta 0 instead (below)
            return None
        if config.depthwise != "channel_in_place" or cmsis:
            return None
        return {i: int(np.prod(graph.tensors[op.outputs[0]].shape[1:3])) for i, op in enumerate(ops) if i >= first
                and op.kind == "DEPTHWISE_CONV_2D" and op.options["depth_multiplier"] == 1
                and graph.tensors[op.inputs[0]].shape[0] == 1}

    fused = {i for i, p in enumerate(params) if "pointwise" in p}  # read their input for every channel: no overlap
    limits = ({**dict.fromkeys(planar, 0), **dict.fromkeys(fused, None)} if not cmsis
              else dict.fromkeys(cmsis_no_overlap(graph, params, config), None))
    if config.patch_split < 0:
        plan = plan_memory(graph, params, scratch, in_place=config.in_place,
                           channel_in_place=channel_in_place(graph.ops, 0), overlap_limits=limits)
        return None, plan, None
    seg = patch.segment(graph, params, config.patch_split, config.patch_grid)
    patched = patch.patch_graph(graph, seg)
    # the patches run the portable kernels, or CMSIS-NN's on the cmsis-nn backend (their scratch
    # probed at the largest patch)
    patch_scratch = (backend_scratch(patched, dataclasses.replace(config, layer_options=()), params[: seg.split + 1])
                     if cmsis else {i: scratch_bytes(graph, graph.ops[i], params[i]) for i in range(seg.split + 1)})
    patch_plan = plan_memory(patched, params[: seg.split + 1], patch_scratch,
                             in_place=False, caller_inputs=False)  # the segment inputs are cropped into it
    outer, _ = patch.outer_graph(graph, seg, patch_plan.peak_bytes)
    outer_scratch = {0: patch_plan.peak_bytes, **{i - seg.split: b for i, b in scratch.items() if i > seg.split}}
    plan = plan_memory(outer, [{}] + params[seg.split + 1 :], outer_scratch, in_place=config.in_place,
                       channel_in_place=channel_in_place(outer.ops, 1),
                       overlap_limits={i - seg.split: v for i, v in limits.items() if i > seg.split})
    return seg, plan, patch_plan


def min_sram_config(graph: Graph, base: Config | None = None, grids: tuple[int, ...] = (2, 3, 4, 6, 8)) -> Config:
    """The patch split/grid (or none) with the smallest peak SRAM (the smaller grid on a tie) and,
    on the portable backend, the depthwise variant; on the cmsis-nn backend also the 1x1 convs
    that must run through arm_convolve_s8 to overlap their input (``fit_sram``). The other
    knobs from ``base``."""
    base = base or Config()
    if base.backend not in ("portable", "cmsis-nn"):
        return base
    cmsis = base.backend == "cmsis-nn"
    if cmsis:
        base = fit_sram(graph, base, 0)
    params = [quantization.op_params(graph, op) for op in graph.ops]
    best = (plan_schedule(graph, base, params)[1].peak_bytes, base)
    t = graph.tensors

    def held_whole(split: int) -> int:  # the segment's inputs (but the caller's) and output stay whole: a lower bound
        produced = {n for op in graph.ops[: split + 1] for n in op.outputs}
        inputs = {n for op in graph.ops[: split + 1] for n in op.inputs
                  if n is not None and not t[n].is_constant and n not in produced and n not in graph.inputs}
        return sum(t[n].nbytes for n in inputs) + t[graph.ops[split].outputs[0]].nbytes

    for depthwise in (base.depthwise,) if cmsis else DEPTHWISE_VARIANTS:
        for split in (-1, *patch.candidate_splits(graph)):
            if split >= 0 and held_whole(split) >= best[0]:
                continue
            for grid in grids if split >= 0 else (base.patch_grid,):
                if cmsis and split >= 0 and not patch.reads_from_region_start(
                        graph, params, patch.segment(graph, params, split, grid)):
                    continue  # some patch would fall back to a portable kernel
                config = dataclasses.replace(base, depthwise=depthwise, patch_split=split, patch_grid=grid)
                peak = plan_schedule(graph, config, params)[1].peak_bytes
                if peak < best[0]:
                    best = (peak, config)
    if cmsis and best[1].patch_split >= 0:  # the peak has moved: fit the 1x1 convs after the segment again
        config = fit_sram(graph, dataclasses.replace(best[1], layer_options=()), 0)
        if plan_schedule(graph, config, params)[1].peak_bytes <= best[0]:
            return config
    return best[1]


def weight_formats(graph: Graph, config: Config, params: list[dict] | None = None) -> dict[int, str]:
    """Weight format (``"s16"``/``"s8"``) of each conv/FC the specialized backend runs: the
    layer's knob where set, else int16 while the const data fits ``config.flash_budget``, the
    layers whose weights are reused most (output pixels per weight) keeping int16 first. With
    the ``params`` of the graph the backend runs (``specialized_graph``), the 1x1 convs fused
    into depthwise ops count with their int16 weights."""
    weighted = [i for i, op in enumerate(graph.ops) if op.kind in ("CONV_2D", "FULLY_CONNECTED")]
    chosen = {i: config.options(i)["weights"] for i in weighted if "weights" in config.options(i)}
    free = [i for i in weighted if i not in chosen]
    formats = {**chosen, **dict.fromkeys(free, "s16")}
    if config.flash_budget <= 0:
        return formats
    t = graph.tensors
    sizes = {i: specialized.const_bytes(graph, op) for i, op in enumerate(graph.ops)}
    fused = [p["pointwise"][0] for p in params or () if "pointwise" in p]
    weighted_inputs = {n for op in [*graph.ops, *fused] if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
                       for n in op.inputs[1:] if n is not None}
    total = sum(x.nbytes for n, x in t.items() if x.is_constant and n not in weighted_inputs)
    total += sum(sizes[i][formats.get(i, "s16")] for i in sizes)
    total += sum(specialized.const_bytes(graph, op)["s16"] for op in fused)

    def reuse(i: int) -> int:
        y = t[graph.ops[i].outputs[0]]
        return y.size // y.shape[-1]

    for i in sorted(free, key=reuse):
        if total <= config.flash_budget:
            break
        formats[i] = "s8"
        total -= sizes[i]["s16"] - sizes[i]["s8"]
    return formats


def _with_option(config: Config, i: int, knob: str, value: str) -> Config:
    kept = tuple(o for o in config.layer_options if o[:2] != (i, knob))
    return dataclasses.replace(config, layer_options=(*kept, (i, knob, value)))


def _smaller(graph: Graph, params: list[dict], config: Config, i: int) -> tuple[str, str] | None:
    """The next kernel choice for op ``i`` that needs less SRAM, or None."""
    op, options = graph.ops[i], config.options(i)
    fusable = False
    if config.backend == "specialized":  # fusion looks through the PADs the backend folds
        _, _, folded = specialized_graph(graph, params, config)
        if i in folded:
            return None  # runs inside another op
        folded_graph, folded_params, _ = fold_pads(graph, params, config.patch_split + 1)
        fusable = i > config.patch_split and fusable_pointwise(folded_graph, folded_params, i) is not None
    if config.backend == "cmsis-nn":
        if op.kind == "CONV_2D" and "kernel" not in options and i in cmsis_no_overlap(graph, params, config):
            return ("kernel", "general")
        return None
    if op.kind == "CONV_2D" and options.get("kernel", "col2") == "col2":
        return ("kernel", "direct")
    if op.kind == "DEPTHWISE_CONV_2D" and options.get("kernel", "planar") == "planar":
        from mcu.emit.conv import depthwise_geometry

        if depthwise_geometry(graph, op, params[i]) is None:
            return None
        fused = options.get("fuse") == "pointwise" and fusable
        if fused and options.get("planes", "1") != "1":  # fewer planes first: the fusion saves the most
            return ("planes", str(int(options["planes"]) // 2))
        if not fused and fusable and options.get("fuse") != "none":
            return ("fuse", "pointwise")  # the 1x1 conv's output is not stored
        return ("strip", "4") if options.get("strip", "all") == "all" else ("kernel", "portable")
    return None


def fit_sram(graph: Graph, config: Config, cap: int, fixed: set[tuple[int, str]] | None = None) -> Config:
    """``config`` with smaller-scratch kernels at the ops where the schedule's peak SRAM lies, while
    it is above ``cap``: specialized convs read their input in place (``direct``), a specialized
    depthwise takes fewer planes when fused, else computes its input from the 1x1 conv before it
    (``fuse``), then walks its plane in strips of 4 rows, then runs the portable kernel (which may
    overlap its input's tail); cmsis-nn 1x1 convs run through arm_convolve_s8. Knobs in ``fixed``
    ((op, knob) pairs; default: those set in ``config.layer_options``) are kept."""
    base = config
    params = [quantization.op_params(graph, op) for op in graph.ops]
    fixed = {(i, knob) for i, knob, _ in config.layer_options} if fixed is None else fixed

    def step(cfg: Config, i: int) -> Config | None:
        change = _smaller(graph, params, cfg, i)
        if change is None or (i, change[0]) in fixed or i <= cfg.patch_split:
            return None
        return _with_option(cfg, i, *change)

    plan = plan_schedule(graph, config)[1]
    best = plan.peak_bytes, config
    for _ in range(2 * len(graph.ops)):
        if best[0] <= cap:
            break
        offset = max(config.patch_split, 0)  # plan indices of a patched schedule: the segment is op 0
        peak_ops = {r["op"] + offset + d for r in plan.per_op() if r["high_water"] == plan.peak_bytes for d in (-1, 0, 1)}
        changed = config  # the op at the peak and its neighbours share the buffers there
        for i in sorted(j for j in peak_ops if 0 <= j < len(graph.ops)):
            changed = step(changed, i) or changed
        if changed == config:
            break
        config = changed
        plan = plan_schedule(graph, config)[1]
        if plan.peak_bytes < best[0]:
            best = (plan.peak_bytes, config)
    if config.backend != "specialized":
        return best[1]
    # the placement is greedy, so the peak may move rather than fall: take every layer one step
    # (then two) towards less scratch; then (or when the steps at the peak reached the cap) give
    # the faster kernels back, largest layer first, while it fits
    t = graph.tensors
    layers = [i for i, op in enumerate(graph.ops) if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    if best[0] > cap:
        slow = base
        for _ in range(2):
            for i in layers:
                slow = step(slow, i) or slow
            peak = plan_schedule(graph, slow)[1].peak_bytes
            if peak < best[0]:
                best = (peak, slow)
            if peak <= cap:
                break
        if best[1] is not slow:
            return best[1]
    for i in sorted(layers, key=lambda i: -t[graph.ops[i].outputs[0]].size * t[graph.ops[i].inputs[1]].size):
        added = [o for o in best[1].layer_options if o[0] == i and o not in base.layer_options]
        for drop in (added, added[-1:]):  # all the way back, else one step back (strips, not the portable kernel)
            kept = tuple(o for o in best[1].layer_options if o not in drop)
            restored = tuple(o for o in base.layer_options if o[:2] in {d[:2] for d in drop})  # the base's value
            trial = dataclasses.replace(best[1], layer_options=kept + restored)
            if not drop or trial == best[1]:
                continue
            peak = plan_schedule(graph, trial)[1].peak_bytes
            if peak <= max(cap, best[0]):
                best = (min(peak, best[0]), trial)
                break
    return best[1]


SPECIALIZED_CODE_BYTES = 64 * 1024  # flash left for code when int16 weights are chosen for a board
# A 1x1 conv fused into the depthwise after it (four planes) costs about the instructions of the two
# apart plus the stored tensor's write and gather saved, when it has few input channels: measured
# per layer on vww01 (stm32f746, QEMU): 0.76x at 8 input channels, 0.88x at 16, 0.98-1.01x at 32,
# 1.05-1.13x at 64 and 128. So the default fuses up to 32; the tuner chooses per layer.
FUSE_MAX_INPUT_CHANNELS = 32
FUSE_PLANES = "4"


def default_fusions(graph: Graph, config: Config) -> tuple[tuple[int, str, str], ...]:
    """``fuse``/``planes`` knobs for the depthwise ops whose 1x1 conv has at most
    FUSE_MAX_INPUT_CHANNELS inputs, where ``config`` sets neither."""
    params = [quantization.op_params(graph, op) for op in graph.ops]
    folded_graph, folded_params, _ = fold_pads(graph, params, config.patch_split + 1)
    out = []
    for j in range(config.patch_split + 1, len(graph.ops)):
        i = fusable_pointwise(folded_graph, folded_params, j, config.patch_split + 1)
        options = config.options(j)
        if (i is None or "fuse" in options or "planes" in options or options.get("kernel", "planar") != "planar"
                or graph.tensors[graph.ops[i].inputs[0]].shape[3] > FUSE_MAX_INPUT_CHANNELS):
            continue
        out += [(j, "fuse", "pointwise"), (j, "planes", FUSE_PLANES)]
    return tuple(out)


def specialized_config(graph: Graph, base: Config | None = None, flash_bytes: int = 0,
                       sram_cap: int | None = None) -> Config:
    """The specialized backend's default schedule from ``base``: int16 weights while the const data
    fits ``flash_bytes`` (a board's flash; 0: no limit) less SPECIALIZED_CODE_BYTES, 1x1 convs
    fused into the depthwise ops after them where that is cheap (``default_fusions``), and peak
    SRAM no higher than ``sram_cap`` (default: the portable default schedule's peak). The knobs
    ``base`` sets are kept."""
    base = base or Config()
    config = dataclasses.replace(base, backend="specialized",
                                 flash_budget=max(flash_bytes - SPECIALIZED_CODE_BYTES, 1) if flash_bytes else 0)
    fixed = {(i, knob) for i, knob, _ in config.layer_options}
    config = dataclasses.replace(config, layer_options=config.layer_options + default_fusions(graph, config))
    cap = sram_cap if sram_cap is not None else plan_schedule(graph, Config())[1].peak_bytes
    return fit_sram(graph, config, cap, fixed)


def kernel_symbols() -> list[str]:
    """The global functions of tp_kernels.c (declared in tp_kernels.h; tp_layer_marker is the harness's)."""
    text = (C_DIR / "tp_kernels.h").read_text()
    names = re.findall(r"^[a-z_0-9]+ \*?(tp_[a-z0-9_]+)\(", text, flags=re.MULTILINE)
    return [n for n in dict.fromkeys(names) if n != "tp_layer_marker"]


def check_prefix(prefix: str) -> str:
    if prefix and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise ValueError(f"--prefix {prefix!r} is not a C identifier; use letters, digits and _, e.g. --prefix kws")
    return prefix


def lower(graph: Graph, config: Config | None = None, prefix: str = "") -> Lowered:
    """Generate ``model.c`` / ``model.h`` for ``graph`` under the schedule ``config``. ``prefix``
    namespaces every global symbol (``PREFIX_model_invoke``, ``PREFIX_tp_conv_s8``, the
    ``PREFIX_MODEL_*`` macros) so that several models link into one image."""
    config = config or Config()
    check_prefix(prefix)
    graph.validate()
    schema.require_quantized(graph)
    unsupported = sorted({op.kind for op in graph.ops if op.kind not in emit.EMITTERS})
    if unsupported:
        raise ValueError(f"graph {graph.name!r} uses ops the MCU backend does not lower: {unsupported}")
    params = [quantization.op_params(graph, op) for op in graph.ops]
    folded: dict[int, int] = {}  # op index -> the op that runs it (a PAD or 1x1 conv folded into a conv)
    kinds = [op.kind for op in graph.ops]
    if config.backend == "specialized":
        graph, params, folded = specialized_graph(graph, params, config)
    t = graph.tensors
    scratch = backend_scratch(graph, config, params)
    formats = weight_formats(graph, config, params) if config.backend == "specialized" else {}
    seg, plan, patch_plan = plan_schedule(graph, config, params, scratch)

    def plan_index(i: int) -> int:  # op index in the plan (the patched segment is folded into op 0)
        return i - seg.split if seg is not None else i

    in_c, out_c = (emit.C_TYPES[t[names[0]].dtype] if names else "int8_t" for names in (graph.inputs, graph.outputs))
    input_at: dict[str, int] = {}  # graph input buffer -> its byte offset in the caller's input
    for n in graph.inputs:
        input_at.setdefault(plan.tensor_buffer[n], sum(t[m].nbytes for m in graph.inputs[: graph.inputs.index(n)]))

    def bytes_at(name: str) -> str:
        """int8_t pointer to a tensor of the main plan: in the arena, or read in place from the caller's input."""
        if plan.is_external(name):
            return f"((int8_t *)input + {input_at[plan.tensor_buffer[name]]})"  # read only (const cast away)
        return f"(ARENA + {plan.offset(name)})"

    def arena(name: str) -> str:
        return f"({emit.C_TYPES[t[name].dtype]} *){bytes_at(name)}"

    out = emit.Emission()
    layers: list[dict] = []
    markers: list[str] = []  # label of each TP_LAYER() in model_invoke, in order
    for i, op in enumerate(graph.ops):
        if seg is None or i >= seg.split:
            markers.append(f"ops 0..{i} ({seg.grid}x{seg.grid} patches)" if seg is not None and i == seg.split
                           else f"op {i} {kinds[i]}")
            out.call("TP_LAYER();")
        if seg is not None and i <= seg.split:
            kernel = f"patch {seg.grid}x{seg.grid}"
            if i == seg.split:
                _emit_patches(graph, params, seg, plan, patch_plan, config, out, bytes_at)
        else:
            k = plan_index(i)
            buf = plan.scratch.get(k)
            layer = emit.Layer(graph, op, i, params[i], out, arena, {}, scratch=f"ARENA + {plan.offsets[buf]}"
                               if buf else "0", scratch_bytes=plan.buffers[buf].size if buf else 0,
                               channel_in_place=k in plan.channel_in_place, conv1x1=config.variant(i),
                               options={**({"weights": formats[i]} if i in formats else {}), **config.options(i)})
            kernel = emit.emit(layer, config.backend) if i not in folded else f"(folded into op {folded[i]})"
        layers.append({"op": i, "kind": kinds[i], "kernel": kernel, "output_shape": t[op.outputs[0]].shape,
                       "weight_bytes": out.const_bytes.get(i, 0), "name": op.name, "plan_op": max(plan_index(i), 0)})
    for layer in layers:  # patched ops' constants are written with the last op of the segment
        layer["weight_bytes"] = out.const_bytes.get(layer["op"], 0)
    flash = sum(out.const_bytes.values())

    in_bytes = sum(t[n].nbytes for n in graph.inputs)
    out_bytes = sum(t[n].nbytes for n in graph.outputs)
    copy_out = []
    off = 0
    for n in graph.outputs:
        copy_out.append(f"tp_copy({bytes_at(n)}, (int8_t *)output + {off}, {t[n].nbytes});")
        off += t[n].nbytes

    arena_bytes = max(plan.peak_bytes, 4)
    cmsis_include = {"cmsis-nn": '#include "arm_nnfunctions.h"\n',
                     "specialized": '#include "tp_specialized.h"\n'}.get(config.backend, "")
    lo, up = (f"{prefix}_", f"{prefix.upper()}_") if prefix else ("", "")
    names = {"invoke": f"{lo}model_invoke", "in_t": f"{lo}model_input_t", "out_t": f"{lo}model_output_t",
             "ARENA": f"{up}MODEL_ARENA_BYTES", "IN": f"{up}MODEL_INPUT_BYTES", "OUT": f"{up}MODEL_OUTPUT_BYTES"}
    aliases = "" if not prefix else f"""
/* The unprefixed names, for code written against one model (e.g. the test harness). */
#ifdef TP_MODEL_UNPREFIXED
#define MODEL_ARENA_BYTES {names["ARENA"]}
#define MODEL_INPUT_BYTES {names["IN"]}
#define MODEL_OUTPUT_BYTES {names["OUT"]}
#define model_invoke {names["invoke"]}
typedef {names["in_t"]} model_input_t;
typedef {names["out_t"]} model_output_t;
#endif
"""
    name = repr(graph.name).replace("*/", "* /")  # the name goes into C comments
    model_h = f"""/* Generated by `python -m mcu export` from graph {name}. */
#ifndef {up}MODEL_H
#define {up}MODEL_H
#include <stdint.h>

#define {names["ARENA"]} {arena_bytes}
#define {names["IN"]} {in_bytes}
#define {names["OUT"]} {out_bytes}
typedef {in_c} {names["in_t"]};
typedef {out_c} {names["out_t"]};

/* Runs the network once. input: the graph inputs back to back ({", ".join(f"{t[n].dtype}{list(t[n].shape)}" for n in graph.inputs)});
 * output: the graph outputs back to back ({", ".join(f"{t[n].dtype}{list(t[n].shape)}" for n in graph.outputs)}).
 * The input is read where it lies (zero-copy: it is not copied into the arena, which is why the
 * arena does not hold it): it must stay valid and unchanged until {names["invoke"]} returns,
 * aligned for {in_c}; it is never written. The output is written once the network has run.
 * Returns 0, or 1 + the index of the op whose kernel reported an error (a CMSIS-NN status other
 * than ARM_CMSIS_NN_SUCCESS); the outputs are then not valid. */
int32_t {names["invoke"]}(const {names["in_t"]} *input, {names["out_t"]} *output);
{aliases}
#endif
"""
    body = "\n  ".join(out.calls + copy_out)
    model_c = f"""/* Generated by `python -m mcu export` from graph {name}: {len(graph.ops)} ops,
 * arena {arena_bytes} B (activations and scratch, static plan), const data {flash} B. */
#include "model.h"
{'#include "tp_names.h"' if prefix else ""}
#include "tp_kernels.h"
{cmsis_include}
static int32_t arena_words[{(arena_bytes + 3) // 4}];
#define ARENA ((int8_t *)arena_words)
/* a kernel that returns a status: stop at the first failure and say which op it was */
#define TP_CHECK(op, call) do {{ if ((call) != 0) return (op) + 1; }} while (0)

{"".join(out.consts)}
int32_t {names["invoke"]}(const {names["in_t"]} *input, {names["out_t"]} *output) {{
  (void)input;  /* read in place by the ops (a graph may also leave it unread) */
  {body}
  return 0;
}}
"""
    return Lowered(model_c, model_h, plan, flash, in_bytes, out_bytes, in_c, out_c, layers, markers, config.backend,
                   prefix)


def _emit_patches(graph: Graph, params: list[dict], seg, plan: MemoryPlan, patch_plan: MemoryPlan, config: Config,
                  out: emit.Emission, bytes_at: Callable[[str], str]) -> None:
    """Per patch: crop the segment inputs, run the segment's ops on patch regions, paste the output."""
    t = graph.tensors
    base = plan.offsets[plan.scratch[0]]

    def ptr(name: str) -> str:
        return f"({emit.C_TYPES[t[name].dtype]} *)(ARENA + {base + patch_plan.offset(name)})"

    def region_copy(fn: str, name: str, region) -> str:
        (r0, r1), (c0, c1) = region
        pixel = t[name].shape[3] * np.dtype(t[name].dtype).itemsize
        return (f"{fn}({bytes_at(name)}, {t[name].shape[2] * pixel}, {r0}, {r1 - r0}, {c0 * pixel}, "
                f"{(c1 - c0) * pixel}, ARENA + {base + patch_plan.offset(name)});")

    for k, reg in enumerate(seg.regions):
        (r0, r1), (c0, c1) = reg[seg.output]
        out.call(f"/* patch {k}: output rows {r0}..{r1 - 1}, columns {c0}..{c1 - 1} */")
        for n in seg.inputs:
            out.call(region_copy("tp_crop", n, reg[n]))
        for j in range(seg.split + 1):
            op = graph.ops[j]
            shape = {n: (1, reg[n][0][1] - reg[n][0][0], reg[n][1][1] - reg[n][1][0], t[n].shape[3])
                     for n in [*op.inputs, op.outputs[0]] if n is not None and not t[n].is_constant}
            buf = patch_plan.scratch.get(j)
            column = f"ARENA + {base + patch_plan.offsets[buf]}" if buf else "0"
            layer = emit.Layer(graph, op, j, params[j], out, ptr, shape, scratch=column,
                               scratch_bytes=patch_plan.buffers[buf].size if buf else 0, conv1x1=config.variant(j))
            if schema.has(op.kind, schema.ELEMENTWISE):
                if any(reg[n] != reg[op.outputs[0]] for n in shape):
                    _emit_elementwise_rows(layer, reg, config.backend)
                    continue
            else:
                layer.pads = patch.local_padding(reg[op.inputs[0]], reg[op.outputs[0]], op, params[j], graph)
            emit.emit(layer, config.backend)
        out.call(region_copy("tp_paste", seg.output, reg[seg.output]))


def _emit_elementwise_rows(layer: emit.Layer, reg, backend: str) -> None:
    """An elementwise op whose inputs cover more than its output region: one call per output
    row (loop variable ``r``), each input read at its row/column offset inside its own region."""
    graph, op = layer.graph, layer.op
    y = op.outputs[0]
    (o0, o1), (q0, q1) = reg[y]
    channels = graph.tensors[y].shape[3]
    whole = layer.ptr

    def row_ptr(n: str) -> str:
        (a0, _), (b0, b1) = reg[n]
        at = f"(r + {o0 - a0}) * {b1 - b0} + {q0 - b0}" if n != y else f"r * {q1 - q0}"
        return f"({whole(n)} + ({at}) * {channels})"

    calls, layer.out.calls = layer.out.calls, []
    layer.ptr = row_ptr
    layer.shapes = {n: (1, 1, q1 - q0, channels) for n in layer.shapes}
    emit.emit(layer, backend)
    row, layer.out.calls = layer.out.calls, calls
    layer.out.call(f"for (int32_t r = 0; r < {o1 - o0}; r++) {{ {' '.join(row)} }}")


def export(graph: Graph, out_dir: str | pathlib.Path, config: Config | None = None, prefix: str = "") -> Lowered:
    """Write model.c, model.h, the kernel sources, the build manifest and a README of the memory
    map to ``out_dir``; with ``prefix``, every global symbol is namespaced (see ``lower``)."""
    lowered = lower(graph, config, prefix)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.c").write_text(lowered.model_c)
    (out / "model.h").write_text(lowered.model_h)
    for name in ("tp_kernels.c", "tp_kernels.h", "tp_specialized.h"):
        shutil.copyfile(C_DIR / name, out / name)
    if prefix:
        (out / "tp_names.h").write_text(
            f"/* {prefix}: the kernels' global symbols, namespaced. */\n#ifndef TP_NAMES_H\n#define TP_NAMES_H\n"
            + "".join(f"#define {n} {prefix}_{n}\n" for n in kernel_symbols()) + "#endif\n")
        (out / "tp_kernels.c").write_text('#include "tp_names.h"\n' + (C_DIR / "tp_kernels.c").read_text())
    (out / MANIFEST).write_text(json.dumps({"graph": graph.name, "backend": lowered.backend,
                                            "sources": ["model.c", "tp_kernels.c"],
                                            "defines": ["TP_MODEL_UNPREFIXED"] if prefix else [],
                                            "libraries": ["cmsis-nn"] if lowered.uses_cmsis_nn else []}, indent=1))
    (out / "README.md").write_text(memory_map(graph, lowered))
    return lowered


def memory_map(graph: Graph, lowered: Lowered) -> str:
    plan = lowered.plan
    lines = [
        f"# {graph.name}: memory map",
        "",
        f"Arena (SRAM): {plan.peak_bytes} B. Const data (flash): {lowered.flash_bytes} B.",
        "",
        "API (`model.h`): `model_invoke(input, output)` runs one inference; the graph inputs and outputs are",
        "packed back to back; the input is read in place from the caller's buffer (not copied; it must stay",
        "unchanged during the call), all other activations live in one static arena inside `model.c`.",
        "Build: compile `model.c` and `tp_kernels.c` (C99)" + (
            " and link CMSIS-NN (its `Include/` on the include path)." if lowered.uses_cmsis_nn
            else "; nothing else is needed."),
        "",
        "| op | kind | kernel | output | offset | bytes | live bytes | high water |",
        "|---:|---|---|---|---:|---:|---:|---:|",
    ]
    per_op = plan.per_op()
    for layer in lowered.layers:
        name = graph.ops[layer["op"]].outputs[0]
        row = per_op[layer["plan_op"]]
        if name in plan.tensor_buffer and plan.is_external(name):
            where = "caller's input | -"
        elif name in plan.tensor_buffer:
            buf = plan.tensor_buffer[name]
            where = f"{plan.offsets[buf]} | {plan.buffers[buf].size}"
        else:  # inside a patched segment: lives in the patch arena
            where = "patch arena | -"
        lines.append(f"| {layer['op']} | {layer['kind']} | {layer['kernel']} | {list(layer['output_shape'])} | {where} | "
                     f"{row['live_bytes']} | {row['high_water']} |")
    return "\n".join(lines) + "\n"
