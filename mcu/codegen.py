"""Lower a quantized graph (models.ir) to C99: weights as const arrays, one static arena, one
kernel call per layer, ``model_invoke``. The integer parameters come from models.quantization;
each op is written by its emitter (``mcu.emit``) in the chosen backend's form.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np

from mcu import emit, patch
from mcu.emit.conv import is_pointwise  # noqa: F401  (part of the schedule vocabulary: mcu.tune)
from mcu.planner import MemoryPlan, plan_memory
from models import quantization, schema
from models.ir import Graph, Op

C_DIR = pathlib.Path(__file__).parent / "c"
BACKENDS = ("portable", "cmsis-nn")
CONV_VARIANTS = ("direct", "1x1", "1x1_unroll4")
DEPTHWISE_VARIANTS = ("overlap", "channel_in_place")
MANIFEST = "build.json"  # what mcu.build compiles and links for an exported folder


@dataclasses.dataclass(frozen=True)
class Config:
    """The schedule: what the autotuner searches and ``mcu export`` applies.

    backend:   ``"portable"`` (the project's C99 kernels) or ``"cmsis-nn"`` (CMSIS-NN's s8
               functions where CMSIS-NN has the op, see each emitter's ``cmsis_nn`` form; needs
               ``$CMSIS_NN_ROOT``). Each backend is a form of the emitters in ``mcu.emit``.
    in_place:  let outputs overlap the inputs that die at their op (mcu.planner); the
               portable kernels' walk order makes this safe, CMSIS-NN's is not assumed, so
               the cmsis-nn backend plans without overlap.
    conv1x1:   kernel for 1x1 stride-1 unpadded convs: ``"direct"`` (the general conv),
               ``"1x1"`` (pixel x channel product) or ``"1x1_unroll4"`` (four output channels
               per input load).
    layer_variants: per-layer overrides ``((op_index, variant), ...)`` of ``conv1x1``.
    depthwise: ``"overlap"`` (the output may overlap the input's tail, four channels per pass)
               or ``"channel_in_place"`` (TinyEngine: channel by channel over the input, with a
               one-channel buffer), where the input dies at the op.
    patch_split: run ops ``0..patch_split`` patch by patch (MCUNetV2); -1 = off.
    patch_grid:  the patches tile the segment output ``patch_grid x patch_grid``.
    """

    backend: str = "portable"
    in_place: bool = True
    conv1x1: str = "1x1_unroll4"
    layer_variants: tuple[tuple[int, str], ...] = ()
    depthwise: str = "overlap"
    patch_split: int = -1
    patch_grid: int = 2

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not available; choose one of {BACKENDS}")
        for v in (self.conv1x1, *(v for _, v in self.layer_variants)):
            if v not in CONV_VARIANTS:
                raise ValueError(f"conv variant {v!r} unknown; choose one of {CONV_VARIANTS}")
        if self.depthwise not in DEPTHWISE_VARIANTS:
            raise ValueError(f"depthwise variant {self.depthwise!r} unknown; choose one of {DEPTHWISE_VARIANTS}")

    def variant(self, op_index: int) -> str:
        return dict(self.layer_variants).get(op_index, self.conv1x1)


def scratch_bytes(graph: Graph, op: Op, params: dict | None = None) -> int:
    """Scratch the portable kernel of ``op`` needs while it runs."""
    params = params if params is not None else quantization.op_params(graph, op)
    return emit.emitter(op.kind).scratch_bytes(graph, op, params)


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

    @property
    def peak_sram_bytes(self) -> int:
        return self.plan.peak_bytes

    @property
    def uses_cmsis_nn(self) -> bool:
        return self.backend == "cmsis-nn"


def plan_schedule(graph: Graph, config: Config, params: list[dict] | None = None, scratch: dict[int, int] | None = None):
    """The memory plan of ``graph`` under ``config``: ``(segment, plan, patch_plan)``; segment and
    patch_plan are None without patch-based inference. In the plan a patched segment is op 0."""
    params = params if params is not None else [quantization.op_params(graph, op) for op in graph.ops]
    if scratch is None:
        scratch = {i: scratch_bytes(graph, op, params[i]) for i, op in enumerate(graph.ops)}
    cmsis = config.backend == "cmsis-nn"

    def channel_in_place(ops: list[Op], first: int) -> dict[int, int] | None:
        if config.depthwise != "channel_in_place" or cmsis:
            return None
        return {i: int(np.prod(graph.tensors[op.outputs[0]].shape[1:3])) for i, op in enumerate(ops) if i >= first
                and op.kind == "DEPTHWISE_CONV_2D" and op.options["depth_multiplier"] == 1
                and graph.tensors[op.inputs[0]].shape[0] == 1}

    if config.patch_split < 0:
        plan = plan_memory(graph, params, scratch, in_place=config.in_place and not cmsis,
                           channel_in_place=channel_in_place(graph.ops, 0))
        return None, plan, None
    if cmsis:
        raise ValueError("patch-based inference (patch_split) runs on the portable backend only")
    seg = patch.segment(graph, params, config.patch_split, config.patch_grid)
    patch_plan = plan_memory(patch.patch_graph(graph, seg), params[: seg.split + 1],
                             {i: b for i, b in scratch.items() if i <= seg.split}, in_place=False)
    outer, _ = patch.outer_graph(graph, seg, patch_plan.peak_bytes)
    outer_scratch = {0: patch_plan.peak_bytes, **{i - seg.split: b for i, b in scratch.items() if i > seg.split}}
    plan = plan_memory(outer, [{}] + params[seg.split + 1 :], outer_scratch, in_place=config.in_place,
                       channel_in_place=channel_in_place(outer.ops, 1))
    return seg, plan, patch_plan


def min_sram_config(graph: Graph, base: Config | None = None, grids: tuple[int, ...] = (2, 3, 4, 6, 8)) -> Config:
    """The depthwise variant and patch split/grid (or none) with the smallest peak SRAM; the
    other knobs from ``base``."""
    base = base or Config()
    if base.backend != "portable":
        return base
    params = [quantization.op_params(graph, op) for op in graph.ops]
    best = (plan_schedule(graph, base, params)[1].peak_bytes, base)
    t = graph.tensors

    def held_whole(split: int) -> int:  # the segment's inputs and output stay whole: a lower bound
        produced = {n for op in graph.ops[: split + 1] for n in op.outputs}
        inputs = {n for op in graph.ops[: split + 1] for n in op.inputs
                  if n is not None and not t[n].is_constant and n not in produced}
        return sum(t[n].nbytes for n in inputs) + t[graph.ops[split].outputs[0]].nbytes

    for depthwise in DEPTHWISE_VARIANTS:
        for split in (-1, *patch.candidate_splits(graph)):
            if split >= 0 and held_whole(split) >= best[0]:
                continue
            for grid in grids if split >= 0 else (base.patch_grid,):
                config = dataclasses.replace(base, depthwise=depthwise, patch_split=split, patch_grid=grid)
                peak = plan_schedule(graph, config, params)[1].peak_bytes
                if peak < best[0]:
                    best = (peak, config)
    return best[1]


def lower(graph: Graph, config: Config | None = None) -> Lowered:
    """Generate ``model.c`` / ``model.h`` for ``graph`` under the schedule ``config``."""
    config = config or Config()
    graph.validate()
    schema.require_quantized(graph)
    unsupported = sorted({op.kind for op in graph.ops if op.kind not in emit.EMITTERS})
    if unsupported:
        raise ValueError(f"graph {graph.name!r} uses ops the MCU backend does not lower: {unsupported}")
    t = graph.tensors
    params = [quantization.op_params(graph, op) for op in graph.ops]
    scratch = {i: scratch_bytes(graph, op, params[i]) for i, op in enumerate(graph.ops)}
    if config.backend == "cmsis-nn":
        from mcu import cmsis_nn

        probes = {i: emit.emitter(op.kind).cmsis_nn_buffer(graph, op, params[i]) for i, op in enumerate(graph.ops)
                  if emit.form(op.kind, config.backend) is not None}
        for i, nbytes in cmsis_nn.buffer_sizes({i: p for i, p in probes.items() if p}).items():
            scratch[i] = max(scratch[i], nbytes)
    seg, plan, patch_plan = plan_schedule(graph, config, params, scratch)

    def plan_index(i: int) -> int:  # op index in the plan (the patched segment is folded into op 0)
        return i - seg.split if seg is not None else i

    in_c, out_c = (emit.C_TYPES[t[names[0]].dtype] if names else "int8_t" for names in (graph.inputs, graph.outputs))

    def arena(name: str) -> str:
        return f"({emit.C_TYPES[t[name].dtype]} *)(ARENA + {plan.offset(name)})"

    out = emit.Emission()
    layers: list[dict] = []
    markers: list[str] = []  # label of each TP_LAYER() in model_invoke, in order
    for i, op in enumerate(graph.ops):
        if seg is None or i >= seg.split:
            markers.append(f"ops 0..{i} ({seg.grid}x{seg.grid} patches)" if seg is not None and i == seg.split
                           else f"op {i} {op.kind}")
            out.call("TP_LAYER();")
        if seg is not None and i <= seg.split:
            kernel = f"patch {seg.grid}x{seg.grid}"
            if i == seg.split:
                _emit_patches(graph, params, seg, plan, patch_plan, config, out)
        else:
            k = plan_index(i)
            buf = plan.scratch.get(k)
            layer = emit.Layer(graph, op, i, params[i], out, arena, {}, scratch=f"ARENA + {plan.offsets[buf]}"
                               if buf else "0", scratch_bytes=plan.buffers[buf].size if buf else 0,
                               channel_in_place=k in plan.channel_in_place, conv1x1=config.variant(i))
            kernel = emit.emit(layer, config.backend)
        layers.append({"op": i, "kind": op.kind, "kernel": kernel, "output_shape": t[op.outputs[0]].shape,
                       "weight_bytes": out.const_bytes.get(i, 0), "name": op.name, "plan_op": max(plan_index(i), 0)})
    for layer in layers:  # patched ops' constants are written with the last op of the segment
        layer["weight_bytes"] = out.const_bytes.get(layer["op"], 0)
    flash = sum(out.const_bytes.values())

    in_bytes = sum(t[n].nbytes for n in graph.inputs)
    out_bytes = sum(t[n].nbytes for n in graph.outputs)
    copy_in, copy_out = [], []
    off = 0
    for n in graph.inputs:
        copy_in.append(f"tp_copy((const int8_t *)input + {off}, ARENA + {plan.offset(n)}, {t[n].nbytes});")
        off += t[n].nbytes
    off = 0
    for n in graph.outputs:
        copy_out.append(f"tp_copy(ARENA + {plan.offset(n)}, (int8_t *)output + {off}, {t[n].nbytes});")
        off += t[n].nbytes

    arena_bytes = max(plan.peak_bytes, 4)
    name = repr(graph.name).replace("*/", "* /")  # the name goes into C comments
    cmsis_include = '#include "arm_nnfunctions.h"\n' if config.backend == "cmsis-nn" else ""
    model_h = f"""/* Generated by `python -m mcu export` from graph {name}. */
#ifndef MODEL_H
#define MODEL_H
#include <stdint.h>

#define MODEL_ARENA_BYTES {arena_bytes}
#define MODEL_INPUT_BYTES {in_bytes}
#define MODEL_OUTPUT_BYTES {out_bytes}
typedef {in_c} model_input_t;
typedef {out_c} model_output_t;

/* Runs the network once. input: the graph inputs back to back ({", ".join(f"{t[n].dtype}{list(t[n].shape)}" for n in graph.inputs)});
 * output: the graph outputs back to back ({", ".join(f"{t[n].dtype}{list(t[n].shape)}" for n in graph.outputs)}). */
void model_invoke(const model_input_t *input, model_output_t *output);

#endif
"""
    body = "\n  ".join(copy_in + out.calls + copy_out)
    model_c = f"""/* Generated by `python -m mcu export` from graph {name}: {len(graph.ops)} ops,
 * arena {arena_bytes} B (activations and scratch, static plan), const data {flash} B. */
#include "model.h"
#include "tp_kernels.h"
{cmsis_include}
static int32_t arena_words[{(arena_bytes + 3) // 4}];
#define ARENA ((int8_t *)arena_words)

{"".join(out.consts)}
void model_invoke(const model_input_t *input, model_output_t *output) {{
  {body}
}}
"""
    return Lowered(model_c, model_h, plan, flash, in_bytes, out_bytes, in_c, out_c, layers, markers, config.backend)


def _emit_patches(graph: Graph, params: list[dict], seg, plan: MemoryPlan, patch_plan: MemoryPlan, config: Config,
                  out: emit.Emission) -> None:
    """Per patch: crop the segment inputs, run the segment's ops on patch regions, paste the output."""
    t = graph.tensors
    base = plan.offsets[plan.scratch[0]]

    def ptr(name: str) -> str:
        return f"({emit.C_TYPES[t[name].dtype]} *)(ARENA + {base + patch_plan.offset(name)})"

    def region_copy(fn: str, name: str, region) -> str:
        (r0, r1), (c0, c1) = region
        pixel = t[name].shape[3] * np.dtype(t[name].dtype).itemsize
        return (f"{fn}(ARENA + {plan.offset(name)}, {t[name].shape[2] * pixel}, {r0}, {r1 - r0}, {c0 * pixel}, "
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
            column = f"ARENA + {base + patch_plan.offsets[patch_plan.scratch[j]]}" if j in patch_plan.scratch else "0"
            layer = emit.Layer(graph, op, j, params[j], out, ptr, shape, scratch=column, conv1x1=config.variant(j))
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


def export(graph: Graph, out_dir: str | pathlib.Path, config: Config | None = None) -> Lowered:
    """Write model.c, model.h, the kernel sources, the build manifest and a README of the memory
    map to ``out_dir``."""
    lowered = lower(graph, config)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.c").write_text(lowered.model_c)
    (out / "model.h").write_text(lowered.model_h)
    for name in ("tp_kernels.c", "tp_kernels.h"):
        shutil.copyfile(C_DIR / name, out / name)
    (out / MANIFEST).write_text(json.dumps({"graph": graph.name, "backend": lowered.backend,
                                            "sources": ["model.c", "tp_kernels.c"],
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
        "packed back to back; all activations live in one static arena inside `model.c`.",
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
        if name in plan.tensor_buffer:
            buf = plan.tensor_buffer[name]
            where = f"{plan.offsets[buf]} | {plan.buffers[buf].size}"
        else:  # inside a patched segment: lives in the patch arena
            where = "patch arena | -"
        lines.append(f"| {layer['op']} | {layer['kind']} | {layer['kernel']} | {list(layer['output_shape'])} | {where} | "
                     f"{row['live_bytes']} | {row['high_water']} |")
    return "\n".join(lines) + "\n"
