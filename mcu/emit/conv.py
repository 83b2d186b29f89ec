"""CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED: the portable kernels (tp_conv*, tp_depthwise*,
tp_fully_connected_s8) and CMSIS-NN's s8 wrappers, per-channel requantization in both."""
from __future__ import annotations

import numpy as np

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


def _cmsis_conv_args(graph: Graph, op: Op, p: dict) -> dict:
    """C initialisers of the CMSIS-NN structs of a conv/depthwise."""
    x, w, y = graph.tensors[op.inputs[0]], graph.tensors[op.inputs[1]], graph.tensors[op.outputs[0]]
    o = op.options
    (pt, _), (pl, _) = p["padding"]
    act = f"{{{p['act_min']}, {p['act_max']}}}"
    tiles = f"{{{o['stride_w']}, {o['stride_h']}}}, {{{pl}, {pt}}}, {{{o['dilation_w']}, {o['dilation_h']}}}, {act}"
    d = {"in": dims(*x.shape), "out": dims(*y.shape), "bias": dims(1, 1, 1, y.shape[3])}
    if op.kind == "CONV_2D":
        d.update(ptype="cmsis_nn_conv_params", params=f"{{{p['input_offset']}, {p['output_offset']}, {tiles}}}",
                 filter=dims(*w.shape), fn="arm_convolve_wrapper_s8")
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

    def cmsis_nn_buffer(self, graph: Graph, op: Op, params: dict) -> str | None:
        d = _cmsis_conv_args(graph, op, params)
        args = (f"&({d['ptype']}){d['params']}, &(cmsis_nn_dims){d['in']}, &(cmsis_nn_dims){d['filter']}, "
                f"&(cmsis_nn_dims){d['out']}")
        return f"{d['fn']}_get_buffer_size({args});{d['fn']}_get_buffer_size_dsp({args})"

    def cmsis_nn(self, layer: Layer) -> str | None:
        if not layer.whole:
            return None
        op, pre = layer.op, layer.prefix
        d = _cmsis_conv_args(layer.graph, op, layer.params)
        filt, bias = layer.const("int8_t", "filter", layer.tensor(1).data), _bias(layer)
        mult, shift = _requantization(layer)
        consts = [f"static const {d['ptype']} {pre}_params = {d['params']};\n",
                  (f"static const cmsis_nn_per_channel_quant_params {pre}_quant = {{(int32_t *){mult}, "
                   f"(int32_t *){shift}}};\n")]
        consts += [f"static const cmsis_nn_dims {pre}_{k}_dims = {d[k]};\n" for k in ("in", "filter", "bias", "out")]
        layer.out.consts.extend(consts)
        layer.out.call(f"{{ cmsis_nn_context ctx = {{{_context(layer)}}}; {d['fn']}(&ctx, &{pre}_params, &{pre}_quant, "
                       f"&{pre}_in_dims, {layer.ptr(op.inputs[0])}, &{pre}_filter_dims, {filt}, &{pre}_bias_dims, "
                       f"{bias}, &{pre}_out_dims, {layer.ptr(op.outputs[0])}); }}")
        return d["fn"]


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

    def cmsis_nn_buffer(self, graph: Graph, op: Op, params: dict) -> str | None:
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
        layer.out.call(f"{{ cmsis_nn_context ctx = {{{_context(layer)}}}; {fn}(&ctx, &{pre}_params, &{pre}_quant, "
                       f"&{pre}_in_dims, {layer.ptr(op.inputs[0])}, &{pre}_filter_dims, {filt}, &{pre}_bias_dims, "
                       f"{bias}, &{pre}_out_dims, {layer.ptr(op.outputs[0])}); }}")
        return fn

