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
        """Whole tensors or a patch (its padding is never negative; rows and columns past the
        input's end are padding to CMSIS-NN, as at a patch's bottom or right edge)."""
        op, p, o = layer.op, layer.params, layer.op.options
        x, y = op.inputs[0], op.outputs[0]
        pt, pl = layer.pads if layer.pads is not None else (p["padding"][0][0], p["padding"][1][0])
        if min(pt, pl) < 0:
            return None  # a patch region wider than this op reads (CMSIS-NN has no row stride to skip it)
        fn = "arm_avgpool_s8" if op.kind == "AVERAGE_POOL_2D" else "arm_max_pool_s8"
        params = layer.struct("cmsis_nn_pool_params", f"{{{{{o['stride_w']}, {o['stride_h']}}}, {{{pl}, {pt}}}, "
                                                      f"{{{p['act_min']}, {p['act_max']}}}}}")
        in_dims, out_dims = (layer.struct("cmsis_nn_dims", dims(*layer.shape(n))) for n in (x, y))
        filter_dims = layer.struct("cmsis_nn_dims", dims(1, o["filter_h"], o["filter_w"], 1))
        call = (f"{fn}(&ctx, &{params}, &{in_dims}, {layer.ptr(x)}, &{filter_dims}, "
                f"&{out_dims}, {layer.ptr(y)})")
        layer.out.call(f"{{ cmsis_nn_context ctx = {{{layer.scratch}, {layer.scratch_bytes}}}; {layer.checked(call)}; }}")
        return fn
