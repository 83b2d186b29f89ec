"""Lower a quantized graph (models.ir) to C99: weights as const arrays, one static arena, one
kernel call per layer, ``model_invoke``; the integer parameters come from models.quantization.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil

import numpy as np

from mcu import patch
from mcu.planner import MemoryPlan, plan_memory
from models import quantization
from models.ir import Graph, Op

C_DIR = pathlib.Path(__file__).parent / "c"
BACKENDS = ("portable", "cmsis-nn")
# Ops the cmsis-nn backend hands to CMSIS-NN's s8 API; the rest use the portable kernels.
CMSIS_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "AVERAGE_POOL_2D", "MAX_POOL_2D", "ADD", "MUL", "SOFTMAX")
CONV_VARIANTS = ("direct", "1x1", "1x1_unroll4")
DEPTHWISE_VARIANTS = ("overlap", "channel_in_place")
SUPPORTED = (
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "AVERAGE_POOL_2D", "MAX_POOL_2D", "ADD", "MUL",
    "SOFTMAX", "PAD", "RESHAPE", "CONCATENATION", "RESIZE_NEAREST_NEIGHBOR", "TRANSPOSE", "MEAN",
    "QUANTIZE", "DEQUANTIZE",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The schedule: what the autotuner searches and ``mcu export`` applies.

    backend:   ``"portable"`` (the project's C99 kernels) or ``"cmsis-nn"`` (CMSIS-NN's s8
               functions for conv/depthwise/FC/pooling/add/mul/softmax, needs ``$CMSIS_NN_ROOT``).
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


def is_pointwise(graph: Graph, op: Op, params: dict) -> bool:
    """A 1x1, stride-1, unpadded, undilated CONV_2D: a plain matrix product over pixels."""
    if op.kind != "CONV_2D":
        return False
    w = graph.tensors[op.inputs[1]]
    o = op.options
    return w.shape[1:3] == (1, 1) and o["stride_h"] == o["stride_w"] == 1 and params["padding"] == ((0, 0), (0, 0))


def scratch_bytes(graph: Graph, op: Op) -> int:
    """Scratch the portable kernel of ``op`` needs while it runs."""
    if op.kind == "MEAN":
        return 4 * graph.tensors[op.outputs[0]].size  # int32 sums
    if op.kind == "CONV_2D":
        return int(np.prod(graph.tensors[op.inputs[1]].shape[1:]))  # one receptive field (tp_conv_s8)
    return 0


@dataclasses.dataclass
class Lowered:
    """Generated sources and the facts reported about them."""

    model_c: str
    model_h: str
    plan: MemoryPlan
    flash_bytes: int  # weights, biases and quantization parameters (const data)
    input_bytes: int
    output_bytes: int
    input_dtype: str
    output_dtype: str
    layers: list[dict]  # per op: index, kind, kernel, output shape, weight bytes
    markers: list[str]  # what each TP_LAYER() profiling marker in model_invoke starts

    @property
    def peak_sram_bytes(self) -> int:
        return self.plan.peak_bytes


def _c_array(ctype: str, name: str, values: np.ndarray) -> str:
    flat = np.asarray(values).reshape(-1)
    if ctype == "float":
        items = [f"{float(v)!r}f" for v in flat.astype(np.float32)]
    else:
        items = [str(int(v)) for v in flat]
    lines = [",".join(items[i : i + 24]) for i in range(0, len(items), 24)]
    return f"static const {ctype} {name}[{max(len(items), 1)}] = {{\n" + ",\n".join(lines or ["0"]) + "\n};\n"


def _pad6(values, fill) -> list:
    values = list(values)
    return [fill] * (6 - len(values)) + values


def _brace(values) -> str:
    return "{" + ", ".join(str(int(v)) for v in values) + "}"


def _dims(n, h, w, c) -> str:
    return "{" + ", ".join(str(int(v)) for v in (n, h, w, c)) + "}"


def _cmsis_layer(graph: Graph, op: Op, p: dict) -> dict:
    """C initialisers of the CMSIS-NN structs of ``op`` and its buffer-size probe
    (``host_expr;dsp_expr``, empty when the function needs no scratch)."""
    t = graph.tensors
    x, y = t[op.inputs[0]], t[op.outputs[0]]
    act = f"{{{p['act_min']}, {p['act_max']}}}" if "act_min" in p else ""
    if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        w = t[op.inputs[1]]
        o = op.options
        (pt, _), (pl, _) = p["padding"]
        tiles = f"{{{o['stride_w']}, {o['stride_h']}}}, {{{pl}, {pt}}}, {{{o['dilation_w']}, {o['dilation_h']}}}, {act}"
        d = {"in": _dims(*x.shape), "out": _dims(*y.shape), "bias": _dims(1, 1, 1, y.shape[3])}
        if op.kind == "CONV_2D":
            d["ptype"], d["params"] = "cmsis_nn_conv_params", f"{{{p['input_offset']}, {p['output_offset']}, {tiles}}}"
            d["filter"] = _dims(*w.shape)
            fn = "arm_convolve_wrapper_s8"
        else:
            d["ptype"] = "cmsis_nn_dw_conv_params"
            d["params"] = f"{{{p['input_offset']}, {p['output_offset']}, {o['depth_multiplier']}, {tiles}}}"
            d["filter"] = _dims(1, w.shape[1], w.shape[2], w.shape[3])
            fn = "arm_depthwise_conv_wrapper_s8"
        args = f"&({d['ptype']}){d['params']}, &(cmsis_nn_dims){d['in']}, &(cmsis_nn_dims){d['filter']}, &(cmsis_nn_dims){d['out']}"
        d["fn"], d["probe"] = fn, f"{fn}_get_buffer_size({args});{fn}_get_buffer_size_dsp({args})"
        return d
    if op.kind == "FULLY_CONNECTED":
        w = t[op.inputs[1]]
        batches = x.size // w.shape[1]
        d = {"ptype": "cmsis_nn_fc_params", "params": f"{{{p['input_offset']}, 0, {p['output_offset']}, {act}}}",
             "in": _dims(batches, 1, 1, w.shape[1]), "filter": _dims(w.shape[1], 1, 1, w.shape[0]),
             "bias": _dims(1, 1, 1, w.shape[0]), "out": _dims(batches, 1, 1, w.shape[0]), "fn": "arm_fully_connected_s8"}
        f = f"&(cmsis_nn_dims){d['filter']}"
        d["probe"] = f"arm_fully_connected_s8_get_buffer_size({f});arm_fully_connected_s8_get_buffer_size_dsp({f})"
        return d
    if op.kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        o = op.options
        (pt, _), (pl, _) = p["padding"]
        d = {"ptype": "cmsis_nn_pool_params", "params": f"{{{{{o['stride_w']}, {o['stride_h']}}}, {{{pl}, {pt}}}, {act}}}",
             "in": _dims(*x.shape), "filter": _dims(1, o["filter_h"], o["filter_w"], 1), "out": _dims(*y.shape)}
        if op.kind == "AVERAGE_POOL_2D":
            d["fn"] = "arm_avgpool_s8"
            d["probe"] = f"arm_avgpool_s8_get_buffer_size({y.shape[2]}, {y.shape[3]});arm_avgpool_s8_get_buffer_size_dsp({y.shape[2]}, {y.shape[3]})"
        else:
            d["fn"], d["probe"] = "arm_max_pool_s8", ""
        return d
    return {"probe": ""}


# Ops whose output region depends only on a window of their input: they run on whole tensors
# or on patches (mcu.patch) through the same emitter.
LOCAL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "MAX_POOL_2D", "PAD", "ADD", "MUL", "QUANTIZE")


def _emit_filter_and_bias(graph: Graph, op: Op, pre: str, consts: list[str]):
    """Const arrays ``{pre}_filter`` and (if the op has one) ``{pre}_bias`` of a conv/depthwise/FC.

    Returns the filter tensor, the C expression of the bias pointer ("0" without bias) and the
    flash bytes of both arrays."""
    t = graph.tensors
    w = t[op.inputs[1]]
    b = t[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] else None
    consts.append(_c_array("int8_t", f"{pre}_filter", w.data))
    if b is None:
        return w, "0", w.nbytes
    consts.append(_c_array("int32_t", f"{pre}_bias", b.data))
    return w, f"{pre}_bias", w.nbytes + b.nbytes


def _emit_weights(graph: Graph, op: Op, pre: str, p: dict, consts: list[str]) -> int:
    """Const arrays of a conv/depthwise (filter, bias, per-channel multiplier and shift)."""
    if op.kind not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return 0
    _, _, nbytes = _emit_filter_and_bias(graph, op, pre, consts)
    consts.append(_c_array("int32_t", f"{pre}_mult", p["output_multiplier"]))
    consts.append(_c_array("int32_t", f"{pre}_shift", p["output_shift"]))
    return nbytes + 8 * len(p["output_multiplier"])


def _struct(structs: dict, consts: list[str], ctype: str, pre: str, init: str) -> str:
    key = f"{ctype} {init}"
    if key not in structs:
        structs[key] = f"{pre}_{sum(1 for k in structs if k.startswith(ctype + ' ') and structs[k].startswith(pre + '_'))}"
        consts.append(f"static const {ctype} {structs[key]} = {init};\n")
    return structs[key]


def _emit_local(graph: Graph, op: Op, i: int, p: dict, config: Config, shape: dict, pads, ptr, consts: list[str],
                calls: list[str], structs: dict, column: str = "0", channel_in_place: bool = False) -> str:
    """Emit one LOCAL_OPS call on tensors of the given (possibly patch-local) shapes.

    shape: tensor name -> NHWC shape of the region the call sees; pads: (top, left) padding of
    the call in those coordinates (None: the op's own padding); ptr(name, cast): C pointer;
    column: C pointer to the op's scratch (the general conv's receptive-field buffer, the
    in-place depthwise's channel buffer); channel_in_place: the output shares the input buffer."""
    t = graph.tensors
    pre = f"L{i}"
    x, y = op.inputs[0], op.outputs[0]
    xs, ys = shape[x], shape[y]
    if xs[0] != 1:
        raise ValueError(f"op {i} ({op.kind}): batch {xs[0]} is not supported on the MCU; export batch 1")
    o = op.options
    if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "MAX_POOL_2D"):
        pt, pl = pads if pads is not None else (p["padding"][0][0], p["padding"][1][0])
    if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        w = t[op.inputs[1]]
        has_bias = len(op.inputs) > 2 and op.inputs[2] is not None
        fields = [xs[1], xs[2], xs[3], ys[1], ys[2], ys[3], w.shape[1], w.shape[2], o["stride_h"], o["stride_w"], pt, pl,
                  o["dilation_h"], o["dilation_w"], o.get("depth_multiplier", 1), p["input_offset"], p["output_offset"],
                  p["act_min"], p["act_max"]]
        init = (f"{{{', '.join(str(int(v)) for v in fields)}, {pre}_filter, {pre + '_bias' if has_bias else '0'}, "
                f"{pre}_mult, {pre}_shift}}")
        name = _struct(structs, consts, "tp_conv_params", pre, init)
        if op.kind == "DEPTHWISE_CONV_2D" and channel_in_place:
            calls.append(f"tp_depthwise_inplace_s8(&{name}, {ptr(x)}, (int8_t *)({column}));")
            return "tp_depthwise_inplace_s8"
        if op.kind == "DEPTHWISE_CONV_2D":
            kernel = "tp_depthwise_s8"
        else:
            pointwise = is_pointwise(graph, op, p) and xs[1:3] == ys[1:3] and (pt, pl) == (0, 0)
            variant = config.variant(i) if pointwise else "direct"
            kernel = {"direct": "tp_conv_s8", "1x1": "tp_conv1x1_s8", "1x1_unroll4": "tp_conv1x1_unroll4_s8"}[variant]
        column_arg = f", (int8_t *)({column})" if kernel == "tp_conv_s8" else ""
        calls.append(f"{kernel}(&{name}, {ptr(x)}, {ptr(y)}{column_arg});")
        return kernel
    if op.kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        fields = [xs[1], xs[2], xs[3], ys[1], ys[2], o["filter_h"], o["filter_w"], o["stride_h"], o["stride_w"], pt, pl,
                  p["act_min"], p["act_max"]]
        name = _struct(structs, consts, "tp_pool_params", pre, _brace(fields))
        kernel = "tp_avgpool_s8" if op.kind == "AVERAGE_POOL_2D" else "tp_maxpool_s8"
        calls.append(f"{kernel}(&{name}, {ptr(x)}, {ptr(y)});")
        return kernel
    if op.kind == "PAD":
        r = len(xs)
        before = [bb for bb, _ in o["paddings"]]
        if pads is not None:
            before[1], before[2] = pads
        init = (f"{{{r}, {_brace(list(xs) + [1] * (6 - r))}, {_brace(list(ys) + [1] * (6 - r))}, "
                f"{_brace(before + [0] * (6 - r))}, {p['pad_value']}}}")
        name = _struct(structs, consts, "tp_pad_params", pre, init)
        calls.append(f"tp_pad_s8(&{name}, {ptr(x)}, {ptr(y)});")
        return "tp_pad_s8"
    size = int(np.prod(ys))
    if op.kind in ("ADD", "MUL"):
        if shape[op.inputs[1]] != xs or xs != ys:
            raise ValueError(f"op {i} ({op.kind}): broadcasting {t[x].shape} with {t[op.inputs[1]].shape} is not "
                             "supported on the MCU")
        if op.kind == "ADD":
            keys = ["input1_offset", "input2_offset", "output_offset", "left_shift", "input1_multiplier", "input1_shift",
                    "input2_multiplier", "input2_shift", "output_multiplier", "output_shift", "act_min", "act_max"]
            kernel, ctype = "tp_add_s8", "tp_add_params"
        else:
            keys = ["input1_offset", "input2_offset", "output_offset", "output_multiplier", "output_shift", "act_min",
                    "act_max"]
            kernel, ctype = "tp_mul_s8", "tp_mul_params"
        name = _struct(structs, consts, ctype, pre, _brace([size] + [p[k] for k in keys]))
        calls.append(f"{kernel}(&{name}, {ptr(x)}, {ptr(op.inputs[1])}, {ptr(y)});")
        return kernel
    if op.kind == "QUANTIZE":
        name = _struct(structs, consts, "tp_quant_params", pre,
                       f"{{{size}, {float(np.float32(p['scale']))!r}f, {p['zero_point']}}}")
        calls.append(f"tp_quantize_f32_s8(&{name}, {ptr(x, 'float')}, {ptr(y)});")
        return "tp_quantize_f32_s8"
    raise AssertionError(op.kind)


def plan_schedule(graph: Graph, config: Config, params: list[dict] | None = None, scratch: dict[int, int] | None = None):
    """The memory plan of ``graph`` under ``config``: ``(segment, plan, patch_plan)``; segment and
    patch_plan are None without patch-based inference. In the plan a patched segment is op 0."""
    params = params if params is not None else [quantization.op_params(graph, op) for op in graph.ops]
    if scratch is None:
        scratch = {i: scratch_bytes(graph, op) for i, op in enumerate(graph.ops)}
    cmsis = config.backend == "cmsis-nn"

    def channel_in_place(ops: list[Op], first: int) -> dict[int, int] | None:
        if config.depthwise != "channel_in_place" or cmsis:
            return None
        return {i: int(np.prod(graph.tensors[op.outputs[0]].shape[1:3])) for i, op in enumerate(ops) if i >= first
                and op.kind == "DEPTHWISE_CONV_2D" and op.options["depth_multiplier"] == 1}

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
    unsupported = sorted({op.kind for op in graph.ops} - set(SUPPORTED))
    if unsupported:
        raise ValueError(f"graph {graph.name!r} uses ops the MCU backend does not lower: {unsupported}")
    t = graph.tensors
    params = [quantization.op_params(graph, op) for op in graph.ops]
    cmsis = config.backend == "cmsis-nn"
    scratch = {i: scratch_bytes(graph, op) for i, op in enumerate(graph.ops)}
    cmsis_layers: dict[int, dict] = {}
    if cmsis:
        from mcu import cmsis_nn

        cmsis_layers = {i: _cmsis_layer(graph, op, params[i]) for i, op in enumerate(graph.ops) if op.kind in CMSIS_OPS}
        probes = {i: d["probe"] for i, d in cmsis_layers.items() if d["probe"]}
        for i, nbytes in cmsis_nn.buffer_sizes(probes).items():
            scratch[i] = max(scratch[i], nbytes)
    seg, plan, patch_plan = plan_schedule(graph, config, params, scratch)

    def plan_index(i: int) -> int:  # op index in the plan (the patched segment is folded into op 0)
        return i - seg.split if seg is not None else i

    dtypes_in = {t[n].dtype for n in graph.inputs}
    dtypes_out = {t[n].dtype for n in graph.outputs}
    for side, kinds in (("inputs", dtypes_in), ("outputs", dtypes_out)):
        if len(kinds) != 1 or not kinds <= {"int8", "float32"}:
            raise ValueError(f"graph {side} must all be int8 or all float32, got {sorted(kinds)}")
    ctype = {"int8": "int8_t", "float32": "float"}
    in_c, out_c = ctype[dtypes_in.pop()], ctype[dtypes_out.pop()]

    consts: list[str] = []
    calls: list[str] = []
    layers: list[dict] = []
    structs: dict[str, str] = {}  # C initialiser -> name, so equal patch geometries share one struct
    flash = 0

    def arena(name: str, cast: str = "int8_t") -> str:
        return f"({cast} *)(ARENA + {plan.offset(name)})"

    markers: list[str] = []  # label of each TP_LAYER() in model_invoke, in order
    for i, op in enumerate(graph.ops):
        p = params[i]
        pre = f"L{i}"
        if seg is None or i >= seg.split:
            markers.append(f"ops 0..{i} ({seg.grid}x{seg.grid} patches)" if seg is not None and i == seg.split
                           else f"op {i} {op.kind}")
            calls.append("TP_LAYER();")
        x = t[op.inputs[0]] if op.inputs and op.inputs[0] else None
        y = t[op.outputs[0]]
        kernel = ""
        weight_bytes = 0
        if seg is not None and i <= seg.split:
            weight_bytes = _emit_weights(graph, op, pre, p, consts)
            kernel = f"patch {seg.grid}x{seg.grid}"
            if i == seg.split:
                _emit_patches(graph, params, seg, plan, patch_plan, config, consts, calls, structs)
        elif i in cmsis_layers:
            kernel, weight_bytes = _emit_cmsis(graph, op, p, pre, cmsis_layers[i], consts, calls, arena,
                                               plan.offsets.get(plan.scratch.get(plan_index(i), ""), None),
                                               plan.buffers[plan.scratch[plan_index(i)]].size if plan_index(i) in plan.scratch else 0)
        elif op.kind in LOCAL_OPS:
            weight_bytes = _emit_weights(graph, op, pre, p, consts)
            geometry = {n: t[n].shape for n in [*op.inputs[:2], op.outputs[0]] if n is not None}
            column = f"ARENA + {plan.offsets[plan.scratch[plan_index(i)]]}" if plan_index(i) in plan.scratch else "0"
            kernel = _emit_local(graph, op, i, p, config, geometry, None, arena, consts, calls, structs, column,
                                 plan_index(i) in plan.channel_in_place)
        elif op.kind == "FULLY_CONNECTED":
            w, bias, weight_bytes = _emit_filter_and_bias(graph, op, pre, consts)
            if np.unique(p["output_multiplier"]).size != 1 or np.unique(p["output_shift"]).size != 1:
                raise ValueError(f"op {i} (FULLY_CONNECTED): per-channel weights are not supported yet")
            in_features = w.shape[1]
            fields = [x.size // in_features, in_features, w.shape[0], p["input_offset"], p["output_offset"],
                      p["act_min"], p["act_max"], p["output_multiplier"][0], p["output_shift"][0]]
            consts.append(f"static const tp_fc_params {pre} = {{{', '.join(str(int(v)) for v in fields)}, {pre}_filter, {bias}}};\n")
            kernel = "tp_fully_connected_s8"
            calls.append(f"{kernel}(&{pre}, {arena(op.inputs[0])}, {arena(op.outputs[0])});")
        elif op.kind == "SOFTMAX":
            depth = x.shape[-1]
            fields = [x.size // depth, depth, p["input_multiplier"], p["input_left_shift"], p["diff_min"]]
            consts.append(f"static const tp_softmax_params {pre} = {_brace(fields)};\n")
            kernel = "tp_softmax_s8"
            calls.append(f"{kernel}(&{pre}, {arena(op.inputs[0])}, {arena(op.outputs[0])});")
        elif op.kind == "RESHAPE":
            kernel = "(alias)"
        elif op.kind == "TRANSPOSE":
            perm = op.options["perm"]
            in_strides = np.cumprod((list(x.shape[1:]) + [1])[::-1])[::-1]
            fields = [len(perm), _brace(_pad6(y.shape, 1)), _brace(_pad6([in_strides[d] for d in perm], 0))]
            consts.append(f"static const tp_transpose_params {pre} = {{{', '.join(str(f) for f in fields)}}};\n")
            kernel = "tp_transpose_s8"
            calls.append(f"{kernel}(&{pre}, {arena(op.inputs[0])}, {arena(op.outputs[0])});")
        elif op.kind == "MEAN":
            axes = [a % len(x.shape) for a in op.options["axes"]]
            kept = [d for d in range(len(x.shape)) if d not in axes]
            kept_shape = [x.shape[d] for d in kept]
            kept_strides = list(np.cumprod((kept_shape[1:] + [1])[::-1])[::-1])
            out_strides = [0 if d in axes else int(kept_strides[kept.index(d)]) for d in range(len(x.shape))]
            fields = [len(x.shape), _brace(_pad6(x.shape, 1)), _brace(_pad6(out_strides, 0)), y.size,
                      p["input_zero_point"], p["output_zero_point"], p["num_elements"], p["multiplier"], p["shift"]]
            consts.append(f"static const tp_mean_params {pre} = {{{', '.join(str(f) for f in fields)}}};\n")
            kernel = "tp_mean_s8"
            scratch = f"(int32_t *)(ARENA + {plan.offsets[plan.scratch[plan_index(i)]]})"
            calls.append(f"{kernel}(&{pre}, {arena(op.inputs[0])}, {arena(op.outputs[0])}, {scratch});")
        elif op.kind == "RESIZE_NEAREST_NEIGHBOR":
            consts.append(_c_array("int32_t", f"{pre}_rows", p["rows"]))
            consts.append(_c_array("int32_t", f"{pre}_cols", p["cols"]))
            fields = [x.shape[1], x.shape[2], x.shape[3], y.shape[1], y.shape[2]]
            consts.append(f"static const tp_resize_params {pre} = {{{', '.join(str(int(f)) for f in fields)}, {pre}_rows, {pre}_cols}};\n")
            kernel = "tp_resize_nearest_s8"
            calls.append(f"{kernel}(&{pre}, {arena(op.inputs[0])}, {arena(op.outputs[0])});")
        elif op.kind == "CONCATENATION":
            axis = op.options["axis"] % len(y.shape)
            outer = int(np.prod(y.shape[:axis]))
            inner_out = int(np.prod(y.shape[axis:]))
            kernel = "tp_copy"
            col = 0
            for name in op.inputs:
                inner = int(np.prod(t[name].shape[axis:]))
                calls.append(
                    f"for (int32_t r = 0; r < {outer}; r++) tp_copy(ARENA + {plan.offset(name)} + r * {inner}, "
                    f"ARENA + {plan.offset(op.outputs[0])} + r * {inner_out} + {col}, {inner});"
                )
                col += inner
        elif op.kind == "DEQUANTIZE":
            consts.append(f"static const tp_quant_params {pre} = {{{y.size}, {float(np.float32(p['scale']))!r}f, {p['zero_point']}}};\n")
            kernel = "tp_dequantize_s8_f32"
            calls.append(f"{kernel}(&{pre}, {arena(op.inputs[0])}, {arena(op.outputs[0], 'float')});")
        flash += weight_bytes
        layers.append({"op": i, "kind": op.kind, "kernel": kernel, "output_shape": y.shape, "weight_bytes": weight_bytes,
                       "name": op.name, "plan_op": max(plan_index(i), 0)})

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
    cmsis_include = '#include "arm_nnfunctions.h"\n' if cmsis else ""
    model_h = f"""/* Generated by `python -m mcu export` from graph {graph.name!r}. */
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
    body = "\n  ".join(copy_in + calls + copy_out)
    model_c = f"""/* Generated by `python -m mcu export` from graph {graph.name!r}: {len(graph.ops)} ops,
 * arena {arena_bytes} B (activations and scratch, static plan), const data {flash} B. */
#include "model.h"
#include "tp_kernels.h"
{cmsis_include}
static int32_t arena_words[{(arena_bytes + 3) // 4}];
#define ARENA ((int8_t *)arena_words)

{"".join(consts)}
void model_invoke(const model_input_t *input, model_output_t *output) {{
  {body}
}}
"""
    return Lowered(model_c, model_h, plan, flash, in_bytes, out_bytes, in_c, out_c, layers, markers)


def _emit_patches(graph: Graph, params: list[dict], seg, plan: MemoryPlan, patch_plan: MemoryPlan, config: Config,
                  consts: list[str], calls: list[str], structs: dict) -> None:
    """Per patch: crop the segment inputs, run the segment's ops on patch regions, paste the output."""
    t = graph.tensors
    base = plan.offsets[plan.scratch[0]]

    def ptr(name: str, cast: str = "int8_t") -> str:
        return f"({cast} *)(ARENA + {base + patch_plan.offset(name)})"

    def region_copy(fn: str, name: str, region) -> str:
        (r0, r1), (c0, c1) = region
        pixel = t[name].shape[3] * np.dtype(t[name].dtype).itemsize
        return (f"{fn}(ARENA + {plan.offset(name)}, {t[name].shape[2] * pixel}, {r0}, {r1 - r0}, {c0 * pixel}, "
                f"{(c1 - c0) * pixel}, {ptr(name)});")

    for k, reg in enumerate(seg.regions):
        (r0, r1), (c0, c1) = reg[seg.output]
        calls.append(f"/* patch {k}: output rows {r0}..{r1 - 1}, columns {c0}..{c1 - 1} */")
        calls.extend(region_copy("tp_crop", n, reg[n]) for n in seg.inputs)
        for j in range(seg.split + 1):
            op = graph.ops[j]
            shape = {n: (1, reg[n][0][1] - reg[n][0][0], reg[n][1][1] - reg[n][1][0], t[n].shape[3])
                     for n in [*op.inputs[:2], op.outputs[0]] if n is not None and not t[n].is_constant}
            if op.kind in patch.ELEMENTWISE and any(reg[n] != reg[op.outputs[0]] for n in shape):
                _emit_elementwise_rows(graph, op, j, params[j], config, reg, shape, ptr, consts, calls, structs)
                continue
            pads = None
            if op.kind not in patch.ELEMENTWISE:
                pads = patch.local_padding(reg[op.inputs[0]], reg[op.outputs[0]], op, params[j], graph)
            column = f"ARENA + {base + patch_plan.offsets[patch_plan.scratch[j]]}" if j in patch_plan.scratch else "0"
            _emit_local(graph, op, j, params[j], config, shape, pads, ptr, consts, calls, structs, column)
        calls.append(region_copy("tp_paste", seg.output, reg[seg.output]))


def _emit_elementwise_rows(graph, op, j, p, config, reg, shape, ptr, consts, calls, structs) -> None:
    """An elementwise op whose inputs cover more than its output region: one call per output
    row, each input read at its row/column offset inside its own region."""
    y = op.outputs[0]
    (o0, o1), (q0, q1) = reg[y]
    channels = graph.tensors[y].shape[3]
    row_shape = (1, 1, q1 - q0, channels)
    row_call: list[str] = []
    _emit_local(graph, op, j, p, config, {n: row_shape for n in shape}, None, lambda n, cast="int8_t": f"@{n}@{cast}@",
                consts, row_call, structs)
    call = row_call[0]
    for n in shape:
        for cast in ("int8_t", "float"):
            if f"@{n}@{cast}@" in call:
                (a0, _), (b0, _) = reg[n]
                width = reg[n][1][1] - b0
                at = f"(r + {o0 - a0}) * {width} + {q0 - b0}" if n != y else f"r * {q1 - q0}"
                call = call.replace(f"@{n}@{cast}@", f"({ptr(n, cast)} + ({at}) * {channels})")
    calls.append(f"for (int32_t r = 0; r < {o1 - o0}; r++) {call}")


def _emit_cmsis(graph, op, p, pre, d, consts, calls, arena, scratch_offset, scratch_size) -> tuple[str, int]:
    t = graph.tensors
    y = t[op.outputs[0]]
    ctx = "&ctx"
    buf = f"ARENA + {scratch_offset}" if scratch_offset is not None else "0"
    context = f"cmsis_nn_context ctx = {{{buf}, {scratch_size}}}; "
    weight_bytes = 0
    if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        _, bias, weight_bytes = _emit_filter_and_bias(graph, op, pre, consts)
        consts.append(f"static const {d['ptype']} {pre}_params = {d['params']};\n")
        for k in ("in", "filter", "bias", "out"):
            consts.append(f"static const cmsis_nn_dims {pre}_{k}_dims = {d[k]};\n")
        if op.kind == "FULLY_CONNECTED":
            if np.unique(p["output_multiplier"]).size != 1:
                raise ValueError(f"op {op.name!r} (FULLY_CONNECTED): per-channel weights are not supported yet")
            consts.append(f"static const cmsis_nn_per_tensor_quant_params {pre}_quant = "
                          f"{{{int(p['output_multiplier'][0])}, {int(p['output_shift'][0])}}};\n")
            weight_bytes += 8
        else:
            consts.append(_c_array("int32_t", f"{pre}_mult", p["output_multiplier"]))
            consts.append(_c_array("int32_t", f"{pre}_shift", p["output_shift"]))
            consts.append(f"static const cmsis_nn_per_channel_quant_params {pre}_quant = "
                          f"{{(int32_t *){pre}_mult, (int32_t *){pre}_shift}};\n")
            weight_bytes += 8 * y.shape[-1]
        calls.append(f"{{ {context}{d['fn']}({ctx}, &{pre}_params, &{pre}_quant, &{pre}_in_dims, {arena(op.inputs[0])}, "
                     f"&{pre}_filter_dims, {pre}_filter, &{pre}_bias_dims, {bias}, &{pre}_out_dims, {arena(op.outputs[0])}); }}")
        return d["fn"], weight_bytes
    if op.kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        consts.append(f"static const {d['ptype']} {pre}_params = {d['params']};\n")
        for k in ("in", "filter", "out"):
            consts.append(f"static const cmsis_nn_dims {pre}_{k}_dims = {d[k]};\n")
        calls.append(f"{{ {context}{d['fn']}({ctx}, &{pre}_params, &{pre}_in_dims, {arena(op.inputs[0])}, &{pre}_filter_dims, "
                     f"&{pre}_out_dims, {arena(op.outputs[0])}); }}")
        return d["fn"], 0
    if op.kind in ("ADD", "MUL"):
        a, b2 = t[op.inputs[0]], t[op.inputs[1]]
        if a.shape != b2.shape or a.shape != y.shape:
            raise ValueError(f"op {op.name!r} ({op.kind}): broadcasting {a.shape} with {b2.shape} is not supported on the MCU")
        ins = f"{arena(op.inputs[0])}, {arena(op.inputs[1])}"
        if op.kind == "ADD":
            args = (f"{p['input1_offset']}, {p['input1_multiplier']}, {p['input1_shift']}, {p['input2_offset']}, "
                    f"{p['input2_multiplier']}, {p['input2_shift']}, {p['left_shift']}, {arena(op.outputs[0])}, "
                    f"{p['output_offset']}, {p['output_multiplier']}, {p['output_shift']}, {p['act_min']}, {p['act_max']}, {y.size}")
            calls.append(f"arm_elementwise_add_s8({ins}, {args});")
            return "arm_elementwise_add_s8", 0
        args = (f"{p['input1_offset']}, {p['input2_offset']}, {arena(op.outputs[0])}, {p['output_offset']}, "
                f"{p['output_multiplier']}, {p['output_shift']}, {p['act_min']}, {p['act_max']}, {y.size}")
        calls.append(f"arm_elementwise_mul_s8({ins}, {args});")
        return "arm_elementwise_mul_s8", 0
    if op.kind == "SOFTMAX":
        x = t[op.inputs[0]]
        depth = x.shape[-1]
        calls.append(f"arm_softmax_s8({arena(op.inputs[0])}, {x.size // depth}, {depth}, {p['input_multiplier']}, "
                     f"{p['input_left_shift']}, {p['diff_min']}, {arena(op.outputs[0])});")
        return "arm_softmax_s8", 0
    raise AssertionError(op.kind)


def export(graph: Graph, out_dir: str | pathlib.Path, config: Config | None = None) -> Lowered:
    """Write model.c, model.h, the kernel sources and a README of the memory map to ``out_dir``."""
    lowered = lower(graph, config)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.c").write_text(lowered.model_c)
    (out / "model.h").write_text(lowered.model_h)
    for name in ("tp_kernels.c", "tp_kernels.h"):
        shutil.copyfile(C_DIR / name, out / name)
    (out / "README.md").write_text(memory_map(graph, lowered))
    return lowered


def memory_map(graph: Graph, lowered: Lowered) -> str:
    plan = lowered.plan
    cmsis = "arm_nnfunctions.h" in lowered.model_c
    lines = [
        f"# {graph.name}: memory map",
        "",
        f"Arena (SRAM): {plan.peak_bytes} B. Const data (flash): {lowered.flash_bytes} B.",
        "",
        "API (`model.h`): `model_invoke(input, output)` runs one inference; the graph inputs and outputs are",
        "packed back to back; all activations live in one static arena inside `model.c`.",
        "Build: compile `model.c` and `tp_kernels.c` (C99)" + (
            " and link CMSIS-NN (its `Include/` on the include path)." if cmsis else "; nothing else is needed."),
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
