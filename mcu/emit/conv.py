"""CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED: the portable kernels (tp_conv*, tp_depthwise*,
tp_fully_connected_s8) and CMSIS-NN's s8 wrappers, per-channel requantization in both."""
from __future__ import annotations

import numpy as np

from mcu import specialized
from mcu.emit import Emitter, Layer, dims, register
from models.ir import Graph, Op

CONV_KERNELS = {"direct": "tp_conv_s8", "1x1": "tp_conv1x1_s8", "1x1_unroll4": "tp_conv1x1_unroll4_s8"}


def is_pointwise(graph: Graph, op: Op, params: dict) -> bool:
    """A 1x1, stride-1, unpadded, undilated CONV_2D: a plain matrix product over pixels."""
    if op.kind != "CONV_2D":
        return False
    w = graph.tensors[op.inputs[1]]
    o = op.options
    return w.shape[1:3] == (1, 1) and o["stride_h"] == o["stride_w"] == 1 and params["padding"] == ((0, 0), (0, 0))


def _bias(layer: Layer) -> str:
    if len(layer.op.inputs) > 2 and layer.op.inputs[2] is not None:
        return layer.const("int32_t", "bias", layer.tensor(2).data)
    return "0"


def _requantization(layer: Layer) -> tuple[str, str]:
    p = layer.params
    return layer.const("int32_t", "mult", p["output_multiplier"]), layer.const("int32_t", "shift", p["output_shift"])


def _cmsis_conv_args(graph: Graph, op: Op, p: dict, options: dict | None = None, shapes: tuple | None = None,
                     pads: tuple[int, int] | None = None) -> dict:
    """C initialisers of the CMSIS-NN structs of a conv/depthwise; ``options["kernel"] ==
    "general"`` calls arm_convolve_s8 itself (pixel by pixel, so its output may overlap the
    input) instead of the wrapper's choice (a 1x1 conv's arm_convolve_1x1_s8_fast may not).
    ``shapes`` (input, output) and ``pads`` (top, left): a patch's (mcu.patch), whose padding is
    never negative: CMSIS-NN pads the top and left as given and reads rows and columns past the
    input's end as padding, as a patch at the bottom or right edge needs."""
    x, w, y = graph.tensors[op.inputs[0]], graph.tensors[op.inputs[1]], graph.tensors[op.outputs[0]]
    xs, ys = shapes if shapes is not None else (x.shape, y.shape)
    o = op.options
    (pt, _), (pl, _) = p["padding"]
    if pads is not None:
        pt, pl = pads
    act = f"{{{p['act_min']}, {p['act_max']}}}"
    tiles = f"{{{o['stride_w']}, {o['stride_h']}}}, {{{pl}, {pt}}}, {{{o['dilation_w']}, {o['dilation_h']}}}, {act}"
    d = {"in": dims(*xs), "out": dims(*ys), "bias": dims(1, 1, 1, ys[3])}
    if op.kind == "CONV_2D":
        d.update(ptype="cmsis_nn_conv_params", params=f"{{{p['input_offset']}, {p['output_offset']}, {tiles}}}",
                 filter=dims(*w.shape),
                 fn="arm_convolve_s8" if (options or {}).get("kernel") == "general" else "arm_convolve_wrapper_s8")
    else:
        d.update(ptype="cmsis_nn_dw_conv_params", fn="arm_depthwise_conv_wrapper_s8",
                 params=f"{{{p['input_offset']}, {p['output_offset']}, {o['depth_multiplier']}, {tiles}}}",
                 filter=dims(1, w.shape[1], w.shape[2], w.shape[3]))
    return d


@register
class ConvEmitter(Emitter):
    kinds = ("CONV_2D", "DEPTHWISE_CONV_2D")

    def scratch_bytes(self, graph: Graph, op: Op, params: dict) -> int:
        if op.kind == "CONV_2D":
            return int(np.prod(graph.tensors[op.inputs[1]].shape[1:]))  # one receptive field (tp_conv_s8)
        return 0

    def portable(self, layer: Layer) -> str:
        op, p = layer.op, layer.params
        x, y = op.inputs[0], op.outputs[0]
        xs, ys = layer.shape(x), layer.shape(y)
        w = layer.tensor(1)
        o = op.options
        pt, pl = layer.pads if layer.pads is not None else (p["padding"][0][0], p["padding"][1][0])
        filt, bias = layer.const("int8_t", "filter", w.data), _bias(layer)
        mult, shift = _requantization(layer)
        fields = [xs[1], xs[2], xs[3], ys[1], ys[2], ys[3], w.shape[1], w.shape[2], o["stride_h"], o["stride_w"], pt, pl,
                  o["dilation_h"], o["dilation_w"], o.get("depth_multiplier", 1), p["input_offset"],
                  p["output_offset"], p["act_min"], p["act_max"]]
        name = layer.struct("tp_conv_params", f"{{{', '.join(str(int(v)) for v in fields)}, {filt}, {bias}, {mult}, "
                                              f"{shift}}}")
        if op.kind == "DEPTHWISE_CONV_2D":
            if layer.channel_in_place:
                layer.out.call(f"tp_depthwise_inplace_s8(&{name}, {layer.ptr(x)}, (int8_t *)({layer.scratch}));")
                return "tp_depthwise_inplace_s8"
            layer.per_image("tp_depthwise_s8", name)
            return "tp_depthwise_s8"
        pointwise = is_pointwise(layer.graph, op, p) and xs[1:3] == ys[1:3] and (pt, pl) == (0, 0)
        kernel = CONV_KERNELS[layer.conv1x1 if pointwise else "direct"]
        layer.per_image(kernel, name, f", (int8_t *)({layer.scratch})" if kernel == "tp_conv_s8" else "")
        return kernel

    def cmsis_nn_buffer(self, graph: Graph, op: Op, params: dict, options: dict | None = None) -> str | None:
        d = _cmsis_conv_args(graph, op, params, options)
        if d["fn"] == "arm_convolve_s8":  # one size for every core without MVE
            args = f"&(cmsis_nn_dims){d['in']}, &(cmsis_nn_dims){d['filter']}"
            return f"arm_convolve_s8_get_buffer_size({args});arm_convolve_s8_get_buffer_size({args})"
        args = (f"&({d['ptype']}){d['params']}, &(cmsis_nn_dims){d['in']}, &(cmsis_nn_dims){d['filter']}, "
                f"&(cmsis_nn_dims){d['out']}")
        return f"{d['fn']}_get_buffer_size({args});{d['fn']}_get_buffer_size_dsp({args})"

    def cmsis_nn(self, layer: Layer) -> str | None:
        op = layer.op
        x, y = op.inputs[0], op.outputs[0]
        if layer.pads is not None and min(layer.pads) < 0:
            return None  # a patch region wider than this op reads (CMSIS-NN has no row stride to skip it)
        d = _cmsis_conv_args(layer.graph, op, layer.params, layer.options, (layer.shape(x), layer.shape(y)), layer.pads)
        filt, bias = layer.const("int8_t", "filter", layer.tensor(1).data), _bias(layer)
        mult, shift = _requantization(layer)
        params = layer.struct(d["ptype"], d["params"])  # one per geometry: the patches of a layer share them
        quant = layer.struct("cmsis_nn_per_channel_quant_params", f"{{(int32_t *){mult}, (int32_t *){shift}}}")
        dim = {k: layer.struct("cmsis_nn_dims", d[k]) for k in ("in", "filter", "bias", "out")}
        call = (f"{d['fn']}(&ctx, &{params}, &{quant}, &{dim['in']}, {layer.ptr(x)}, "
                f"&{dim['filter']}, {filt}, &{dim['bias']}, {bias}, "
                f"{'NULL, ' if d['fn'] == 'arm_convolve_s8' else ''}&{dim['out']}, {layer.ptr(y)})")
        layer.out.call(f"{{ cmsis_nn_context ctx = {{{_context(layer)}}}; {layer.checked(call)}; }}")
        return d["fn"]

    def specialized_scratch(self, graph: Graph, op: Op, params: dict, options: dict) -> int | None:
        return _conv_specialized_scratch(graph, op, params, options)

    def specialized(self, layer: Layer) -> str | None:
        return _conv_specialized(layer)


def _context(layer: Layer) -> str:
    return f"{layer.scratch}, {layer.scratch_bytes}"


@register
class FullyConnectedEmitter(Emitter):
    kinds = ("FULLY_CONNECTED",)

    def portable(self, layer: Layer) -> str:
        op, p = layer.op, layer.params
        w = layer.tensor(1)
        filt, bias = layer.const("int8_t", "filter", w.data), _bias(layer)
        per_channel = int(np.unique(p["output_multiplier"]).size > 1 or np.unique(p["output_shift"]).size > 1)
        mult = layer.const("int32_t", "mult", p["output_multiplier"] if per_channel else p["output_multiplier"][:1])
        shift = layer.const("int32_t", "shift", p["output_shift"] if per_channel else p["output_shift"][:1])
        fields = [layer.tensor(0).size // w.shape[1], w.shape[1], w.shape[0],
                  p["input_offset"], p["output_offset"], p["act_min"], p["act_max"], per_channel]
        name = layer.struct("tp_fc_params", f"{{{', '.join(str(int(v)) for v in fields)}, {filt}, {bias}, {mult}, "
                                            f"{shift}}}")
        layer.out.call(f"tp_fully_connected_s8(&{name}, {layer.ptr(op.inputs[0])}, {layer.ptr(op.outputs[0])});")
        return "tp_fully_connected_s8"

    def cmsis_nn_buffer(self, graph: Graph, op: Op, params: dict, options: dict | None = None) -> str | None:
        w = graph.tensors[op.inputs[1]]
        f = f"&(cmsis_nn_dims){dims(w.shape[1], 1, 1, w.shape[0])}"
        return f"arm_fully_connected_s8_get_buffer_size({f});arm_fully_connected_s8_get_buffer_size_dsp({f})"

    def cmsis_nn(self, layer: Layer) -> str | None:
        if not layer.whole:
            return None
        op, p, pre = layer.op, layer.params, layer.prefix
        w = layer.tensor(1)
        batches = layer.tensor(0).size // w.shape[1]
        filt, bias = layer.const("int8_t", "filter", w.data), _bias(layer)
        act = f"{{{p['act_min']}, {p['act_max']}}}"
        consts = [(f"static const cmsis_nn_fc_params {pre}_params = {{{p['input_offset']}, 0, {p['output_offset']}, "
                   f"{act}}};\n")]
        if np.unique(p["output_multiplier"]).size == 1 and np.unique(p["output_shift"]).size == 1:
            fn = "arm_fully_connected_s8"
            consts.append(f"static const cmsis_nn_per_tensor_quant_params {pre}_quant = "
                          f"{{{int(p['output_multiplier'][0])}, {int(p['output_shift'][0])}}};\n")
        else:
            fn = "arm_fully_connected_per_channel_s8"
            mult, shift = _requantization(layer)
            consts.append(f"static const cmsis_nn_per_channel_quant_params {pre}_quant = {{(int32_t *){mult}, "
                          f"(int32_t *){shift}}};\n")
        for k, v in (("in", dims(batches, 1, 1, w.shape[1])), ("filter", dims(w.shape[1], 1, 1, w.shape[0])),
                     ("bias", dims(1, 1, 1, w.shape[0])), ("out", dims(batches, 1, 1, w.shape[0]))):
            consts.append(f"static const cmsis_nn_dims {pre}_{k}_dims = {v};\n")
        layer.out.consts.extend(consts)
        call = (f"{fn}(&ctx, &{pre}_params, &{pre}_quant, &{pre}_in_dims, {layer.ptr(op.inputs[0])}, "
                f"&{pre}_filter_dims, {filt}, &{pre}_bias_dims, {bias}, &{pre}_out_dims, {layer.ptr(op.outputs[0])})")
        layer.out.call(f"{{ cmsis_nn_context ctx = {{{_context(layer)}}}; {layer.checked(call)}; }}")
        return fn

    def specialized_scratch(self, graph: Graph, op: Op, params: dict, options: dict) -> int | None:
        return 0

    def specialized(self, layer: Layer) -> str | None:
        return _fc_specialized(layer)



# ---- the specialized backend (mcu/c/tp_specialized.h, arithmetic in mcu.specialized) ----


def _bias_values(graph: Graph, op: Op) -> np.ndarray:
    channels = graph.tensors[op.outputs[0]].shape[-1]
    if len(op.inputs) > 2 and op.inputs[2] is not None:
        return graph.tensors[op.inputs[2]].data.astype(np.int64)
    return np.zeros(channels, dtype=np.int64)


def _acc_bound(graph: Graph, op: Op, p: dict, per_channel_weights: np.ndarray) -> np.ndarray:
    """|bias| + max|x + input_offset| * sum|w| per output channel: bounds the accumulator."""
    return np.abs(_bias_values(graph, op)) + specialized.input_magnitude(p["input_offset"]) * per_channel_weights


def _words(values: np.ndarray, dtype) -> np.ndarray:
    """An int16/int8 array (a whole number of words) as the int32 words the kernels load."""
    return np.ascontiguousarray(np.asarray(values).astype(dtype)).view("<i4")


def _sp_function(layer: Layer, kernel: str, struct: str, params: list[tuple[str, str]]) -> None:
    """The layer as its own function (the kernel inlined with the layer's constants) and its call;
    ``params``: (C declaration, argument) pairs."""
    fn = f"{layer.prefix}_run"
    names = ", ".join(decl.split()[-1].lstrip("*") for decl, _ in params)
    layer.out.consts.append(f"static __attribute__((noinline)) void {fn}({', '.join(d for d, _ in params)}) {{ {kernel}(&{struct}, {names}); }}\n")
    layer.out.call(f"{fn}({', '.join(a for _, a in params)});")


def _strip_in_place_ok(g: dict, strip: int) -> bool:
    """Whether passes of ``strip`` output rows stay exact when the output is written over the
    input: before each pass loads its new input rows, the output pixels written so far (channel
    c, pixel index < first output row * out_w) must all lie before the first of those rows."""
    for s0 in range(strip, g["out_h"], strip):
        loaded_to = (s0 - 1) * g["stride_h"] + g["k_h"]
        first_new = max(s0 * g["stride_h"], loaded_to) - g["pad_top"]
        if first_new < g["rows_in"] and s0 * g["out_w"] > max(first_new, 0) * g["in_w"]:
            return False
    return True


def depthwise_geometry(graph: Graph, op: Op, p: dict, strip: str = "all") -> dict | None:
    """The plane of the specialized depthwise, or None where it does not apply (depth multiplier
    other than 1, dilation, batches). ``strip``: output rows per pass over the plane (the
    smallest at least that large which is exact in place; "all": the whole plane). A depthwise
    fused with the 1x1 conv before it (``p["pointwise"]``, mcu.codegen.fuse_pointwise) has that
    conv's output as its input."""
    x_name = p["pointwise"][0].outputs[0] if "pointwise" in p else op.inputs[0]
    x, w, y = graph.tensors[x_name], graph.tensors[op.inputs[1]], graph.tensors[op.outputs[0]]
    o = op.options
    if (o["depth_multiplier"] != 1 or o["dilation_h"] != 1 or o["dilation_w"] != 1 or x.shape[0] != 1
            or x.shape[3] != y.shape[3]):
        return None
    _, ih, iw, c = x.shape
    _, oh, ow, _ = y.shape
    kh, kw = w.shape[1:3]
    (pt, _), (pl, _) = p["padding"]
    sh, sw = o["stride_h"], o["stride_w"]
    transposed = iw == ow == kw == 1 and kh > 1  # a column (H x 1) is laid out as a row (1 x H): filter along the row
    if transposed:
        ih, iw, oh, ow, kh, kw, pt, pl, sh, sw = iw, ih, ow, oh, kw, kh, pl, pt, sw, sh
    groups = -(-kw // 4)
    plane_w = specialized.round_up((ow - 1) * sw + 4 * groups, 4)
    g = {"in_h": ih, "in_w": iw, "channels": c, "out_h": oh, "out_w": ow, "k_h": kh, "k_w": kw, "stride_h": sh,
         "stride_w": sw, "pad_top": pt, "pad_left": pl, "plane_w": plane_w, "groups": groups, "transposed": transposed,
         "rows_in": max(0, min(ih, (oh - 1) * sh + kh - pt)), "cols_in": max(0, min(iw, plane_w - pl))}
    rows = oh if strip == "all" else min(int(strip), oh)
    while rows < oh and not _strip_in_place_ok(g, rows):
        rows += 1
    return {**g, "strip": rows, "plane_h": (rows - 1) * sh + kh}


def _pointwise_source(layer: Layer, pw: Op, p: dict, planes: int) -> str:
    """The tp_sp_pw_source of the 1x1 conv ``pw`` fused into the depthwise ``layer`` (its constants
    are this layer's): int16 weights in blocks of ``planes`` channels, one record per channel."""
    graph = layer.graph
    w = graph.tensors[pw.inputs[1]]
    filt = w.data.astype(np.int64).reshape(w.shape[0], w.shape[3])
    req = specialized.requantization(_bias_values(graph, pw), p["output_multiplier"], p["output_shift"],
                                     p["output_offset"], _acc_bound(graph, pw, p, np.abs(filt).sum(axis=1)),
                                     want_doubled=True)
    weights = layer.const("int32_t", "pw_weights",
                          _words(specialized.fc_weights(filt, planes, "s16", req.doubled), np.int16))
    records = layer.const("int32_t", "pw_channels", req.records)
    fields = [w.shape[3], -(-w.shape[3] // 4), p["input_offset"], p["act_min"], p["act_max"], req.mode, int(req.doubled)]
    return layer.out.struct("tp_sp_pw_source", f"{layer.prefix}_pw", f"{{{', '.join(str(int(v)) for v in fields)}, "
                                                                    f"(const tp_sp_word *){weights}, "
                                                                    f"(const tp_sp_channel *){records}}}")


def _sp_conv_column(graph: Graph, op: Op) -> specialized.ConvColumn:
    w = graph.tensors[op.inputs[1]]
    return specialized.conv_column(w.shape[1], w.shape[2], w.shape[3], op.options["dilation_w"])


def direct_mode(graph: Graph, op: Op, params: dict) -> int:
    """How tp_sp_conv_direct reads a pixel's receptive field (TP_SP_DIRECT_*)."""
    w = graph.tensors[op.inputs[1]]
    if is_pointwise(graph, op, params):
        return specialized.DIRECT_POINTWISE
    if w.shape[3] % 4 == 0 and w.shape[1] * w.shape[2] <= specialized.MAX_TAPS:
        return specialized.DIRECT_TAPS
    return specialized.DIRECT_COLUMN


def _conv_specialized_scratch(graph: Graph, op: Op, params: dict, options: dict) -> int | None:
    if graph.tensors[op.inputs[0]].shape[0] != 1:
        return None
    if op.kind == "CONV_2D":
        col = _sp_conv_column(graph, op)
        if options.get("kernel") == "portable":
            return None
        if options.get("kernel", "col2") == "direct":
            return col.column if direct_mode(graph, op, params) == specialized.DIRECT_COLUMN else 0
        return 4 * col.column + specialized.round_up(col.segment, 4)
    g = depthwise_geometry(graph, op, params, options.get("strip", "all"))
    if g is None or options.get("kernel") == "portable":
        return None
    return g["plane_h"] * g["plane_w"] * (fused_planes(options, g) if "pointwise" in params else 1)


def fused_planes(options: dict, g: dict) -> int:
    """Channels per pass of a fused depthwise (the ``planes`` knob, at most its channels)."""
    return min(int(options.get("planes", 1)), g["channels"])


def _conv_specialized(layer: Layer) -> str | None:
    graph, op, p = layer.graph, layer.op, layer.params
    if layer.shapes or layer.pads is not None or _conv_specialized_scratch(graph, op, p, layer.options) is None:
        return None  # patches run the portable form
    x, w, y = layer.tensor(0), layer.tensor(1), layer.output
    o = op.options
    (pt, _), (pl, _) = p["padding"]
    filt = w.data.astype(np.int64)
    x_arg, y_arg = layer.ptr(op.inputs[0]), layer.ptr(op.outputs[0])
    if op.kind == "DEPTHWISE_CONV_2D":
        g = depthwise_geometry(graph, op, p, layer.options.get("strip", "all"))
        req = specialized.requantization(_bias_values(graph, op), p["output_multiplier"], p["output_shift"],
                                         p["output_offset"], _acc_bound(graph, op, p, np.abs(filt[0]).sum(axis=(0, 1))),
                                         want_doubled=True)
        taps = filt.transpose(0, 2, 1, 3) if g["transposed"] else filt
        weights = layer.const("int32_t", "sp_weights", _words(specialized.depthwise_weights(taps, req.doubled), np.int16))
        records = layer.const("int32_t", "sp_channels", req.records)
        fields = [*(g[k] for k in ("in_h", "in_w", "channels", "out_h", "out_w", "k_h", "k_w", "stride_h", "stride_w",
                                   "pad_top", "pad_left")),
                  p["input_offset"], p["act_min"], p["act_max"], req.mode, int(req.doubled),
                  g["plane_h"], g["plane_w"], g["rows_in"], g["cols_in"], g["groups"], g["strip"]]
        planes, source = 1, "0"
        if "pointwise" in p:
            planes = fused_planes(layer.options, g)
            source = "&" + _pointwise_source(layer, *p["pointwise"], planes)
        struct = layer.struct("tp_sp_dw_layer", f"{{{', '.join(str(int(v)) for v in fields)}, "
                                                f"(const tp_sp_word *){weights}, (const tp_sp_channel *){records}, "
                                                f"{planes}, {source}}}")
        # in place (TinyEngine) when the plan gave the output the input's buffer: the same pointer
        _sp_function(layer, "tp_sp_depthwise", struct, [("const int8_t *in", x_arg), ("int8_t *out", y_arg),
                                                        ("int8_t *plane", f"(int8_t *)({layer.scratch})")])
        return ("tp_sp_depthwise" + (f" (strips of {g['strip']})" if g["strip"] < g["out_h"] else "")
                + (f" (fused 1x1, {planes} planes)" if "pointwise" in p else ""))
    fmt = layer.options.get("weights", "s16")
    unroll = int(layer.options.get("unroll", 2))
    col = _sp_conv_column(graph, op)
    req = specialized.requantization(_bias_values(graph, op), p["output_multiplier"], p["output_shift"],
                                     p["output_offset"], _acc_bound(graph, op, p, np.abs(filt).sum(axis=(1, 2, 3))),
                                     want_doubled=fmt == "s16")
    if layer.options.get("kernel", "col2") == "direct":
        return _conv_direct(layer, col, fmt, req)
    packed = specialized.conv_weights(filt, col, fmt, req.doubled)
    weights = layer.const("int32_t", "sp_weights", _words(packed, np.int16 if fmt == "s16" else np.int8))
    records = layer.const("int32_t", "sp_channels", req.records)
    fields = [x.shape[1], x.shape[2], x.shape[3], y.shape[1], y.shape[2], y.shape[3], w.shape[1], w.shape[2],
              o["stride_h"], o["stride_w"], pt, pl, o["dilation_h"], o["dilation_w"], p["input_offset"], p["act_min"],
              p["act_max"], col.segment, col.segment_padded, col.segments, col.column, int(fmt == "s16"),
              int(req.doubled), req.mode, unroll]
    struct = layer.struct("tp_sp_conv_layer", f"{{{', '.join(str(int(v)) for v in fields)}, {weights}, "
                                              f"(const tp_sp_channel *){records}}}")
    _sp_function(layer, "tp_sp_conv", struct, [("const int8_t *in", x_arg), ("int8_t *out", y_arg),
                                               ("int16_t *col", f"(int16_t *)({layer.scratch})")])
    return f"tp_sp_conv ({fmt}, unroll {unroll})"




def _conv_direct(layer: Layer, col: specialized.ConvColumn, fmt: str, req: specialized.Requantization) -> str:
    graph, op, p = layer.graph, layer.op, layer.params
    x, w, y = layer.tensor(0), layer.tensor(1), layer.output
    o = op.options
    (pt, _), (pl, _) = p["padding"]
    rows = int(layer.options.get("rows", 4))
    mode = direct_mode(graph, op, p)
    if mode == specialized.DIRECT_POINTWISE:
        taps, tap_len = 1, x.shape[3]
    elif mode == specialized.DIRECT_TAPS:
        taps, tap_len = w.shape[1] * w.shape[2], x.shape[3]
    else:
        taps, tap_len = 1, col.column
    packed = specialized.conv_weights(w.data.astype(np.int64), col, fmt, req.doubled, block=rows)
    weights = layer.const("int32_t", "sp_weights", _words(packed, np.int16 if fmt == "s16" else np.int8))
    records = layer.const("int32_t", "sp_channels", req.records)
    zero = layer.const("int8_t", "sp_zero", np.full(x.shape[3], -p["input_offset"])) if mode == specialized.DIRECT_TAPS \
        else "0"
    fields = [x.shape[1], x.shape[2], x.shape[3], y.shape[1], y.shape[2], y.shape[3], w.shape[1], w.shape[2],
              o["stride_h"], o["stride_w"], pt, pl, o["dilation_h"], o["dilation_w"], p["input_offset"], p["act_min"],
              p["act_max"], mode, taps, tap_len, col.segment, col.segment_padded, col.segments, col.column,
              int(fmt == "s16"), int(req.doubled), req.mode, rows]
    struct = layer.struct("tp_sp_conv_direct_layer", f"{{{', '.join(str(int(v)) for v in fields)}, "
                                                     f"(const tp_sp_word *){weights}, "
                                                     f"(const tp_sp_channel *){records}, {zero}}}")
    _sp_function(layer, "tp_sp_conv_direct", struct, [("const int8_t *in", layer.ptr(op.inputs[0])),
                                                      ("int8_t *out", layer.ptr(op.outputs[0])),
                                                      ("int8_t *col", f"(int8_t *)({layer.scratch})")])
    return f"tp_sp_conv_direct ({fmt}, {rows} rows)"


def _fc_specialized(layer: Layer) -> str | None:
    op, p = layer.op, layer.params
    w = layer.tensor(1)
    filt = w.data.astype(np.int64)
    fmt = layer.options.get("weights", "s16")
    rows = int(layer.options.get("rows", 4))
    bias = _bias_values(layer.graph, op)
    req = specialized.requantization(bias + p["input_offset"] * filt.sum(axis=1), p["output_multiplier"],
                                     p["output_shift"], p["output_offset"],
                                     _acc_bound(layer.graph, op, p, np.abs(filt).sum(axis=1)), want_doubled=fmt == "s16")
    packed = specialized.fc_weights(filt, rows, fmt, req.doubled)
    weights = layer.const("int32_t", "sp_weights", _words(packed, np.int16 if fmt == "s16" else np.int8))
    records = layer.const("int32_t", "sp_channels", req.records)
    fields = [layer.tensor(0).size // w.shape[1], w.shape[1], w.shape[0], p["act_min"], p["act_max"], req.mode,
              int(fmt == "s16"), int(req.doubled), rows]
    struct = layer.struct("tp_sp_fc_layer", f"{{{', '.join(str(int(v)) for v in fields)}, (const tp_sp_word *){weights}, "
                                            f"(const tp_sp_channel *){records}}}")
    _sp_function(layer, "tp_sp_fully_connected", struct, [("const int8_t *in", layer.ptr(op.inputs[0])),
                                                          ("int8_t *out", layer.ptr(op.outputs[0]))])
    return f"tp_sp_fully_connected ({fmt}, {rows} rows)"


