"""AVERAGE_POOL_2D and MAX_POOL_2D: the portable tp_avgpool_s8 / tp_maxpool_s8 and CMSIS-NN's
arm_avgpool_s8 / arm_max_pool_s8."""
from __future__ import annotations

from mcu.emit import Emitter, Layer, brace, dims, register
from models.ir import Graph, Op


@register
class PoolEmitter(Emitter):
    kinds = ("AVERAGE_POOL_2D", "MAX_POOL_2D")

    def portable(self, layer: Layer) -> str:
        op, p, o = layer.op, layer.params, layer.op.options
        xs, ys = layer.shape(op.inputs[0]), layer.shape(op.outputs[0])
        pt, pl = layer.pads if layer.pads is not None else (p["padding"][0][0], p["padding"][1][0])
        fields = [xs[1], xs[2], xs[3], ys[1], ys[2], o["filter_h"], o["filter_w"], o["stride_h"], o["stride_w"], pt, pl,
                  p["act_min"], p["act_max"]]
        kernel = "tp_avgpool_s8" if op.kind == "AVERAGE_POOL_2D" else "tp_maxpool_s8"
        layer.per_image(kernel, layer.struct("tp_pool_params", brace(fields)))
        return kernel

    def cmsis_nn_buffer(self, graph: Graph, op: Op, params: dict, options: dict | None = None) -> str | None:
        if op.kind != "AVERAGE_POOL_2D":
            return None
        _, _, w, c = graph.tensors[op.outputs[0]].shape
        return f"arm_avgpool_s8_get_buffer_size({w}, {c});arm_avgpool_s8_get_buffer_size_dsp({w}, {c})"

    def cmsis_nn(self, layer: Layer) -> str | None:
        if not layer.whole:
            return None
        op, p, o, pre = layer.op, layer.params, layer.op.options, layer.prefix
        x, y = layer.tensor(0), layer.output
        (pt, _), (pl, _) = p["padding"]
        fn = "arm_avgpool_s8" if op.kind == "AVERAGE_POOL_2D" else "arm_max_pool_s8"
        layer.out.consts.extend([
            (f"static const cmsis_nn_pool_params {pre}_params = {{{{{o['stride_w']}, {o['stride_h']}}}, {{{pl}, {pt}}}, "
             f"{{{p['act_min']}, {p['act_max']}}}}};\n"),
            f"static const cmsis_nn_dims {pre}_in_dims = {dims(*x.shape)};\n",
            f"static const cmsis_nn_dims {pre}_filter_dims = {dims(1, o['filter_h'], o['filter_w'], 1)};\n",
            f"static const cmsis_nn_dims {pre}_out_dims = {dims(*y.shape)};\n",
        ])
        call = (f"{fn}(&ctx, &{pre}_params, &{pre}_in_dims, {layer.ptr(op.inputs[0])}, &{pre}_filter_dims, "
                f"&{pre}_out_dims, {layer.ptr(op.outputs[0])})")
        layer.out.call(f"{{ cmsis_nn_context ctx = {{{layer.scratch}, {layer.scratch_bytes}}}; {layer.checked(call)}; }}")
        return fn
