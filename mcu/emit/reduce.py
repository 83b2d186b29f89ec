"""Reductions: MEAN (portable, int32 sums in scratch) and SOFTMAX (portable tp_softmax_s8 and
CMSIS-NN's arm_softmax_s8)."""
from __future__ import annotations

import numpy as np

from mcu.emit import Emitter, Layer, brace, pad6, register
from models.ir import Graph, Op


@register
class MeanEmitter(Emitter):
    kinds = ("MEAN",)

    def scratch_bytes(self, graph: Graph, op: Op, params: dict) -> int:
        return 4 * graph.tensors[op.outputs[0]].size  # int32 sums

    def portable(self, layer: Layer) -> str:
        x, y, p = layer.tensor(0), layer.output, layer.params
        axes = layer.op.options["axes"]
        kept = [d for d in range(len(x.shape)) if d not in axes]
        kept_shape = [x.shape[d] for d in kept]
        kept_strides = list(np.cumprod((kept_shape[1:] + [1])[::-1])[::-1])
        out_strides = [0 if d in axes else int(kept_strides[kept.index(d)]) for d in range(len(x.shape))]
        fields = [len(x.shape), brace(pad6(x.shape, 1)), brace(pad6(out_strides, 0)), y.size, p["input_zero_point"],
                  p["output_zero_point"], p["num_elements"], p["multiplier"], p["shift"]]
        name = layer.struct("tp_mean_params", f"{{{', '.join(str(f) for f in fields)}}}")
        layer.out.call(f"tp_mean_s8(&{name}, {layer.ptr(layer.op.inputs[0])}, {layer.ptr(layer.op.outputs[0])}, "
                       f"(int32_t *)({layer.scratch}));")
        return "tp_mean_s8"


@register
class SoftmaxEmitter(Emitter):
    kinds = ("SOFTMAX",)

    def portable(self, layer: Layer) -> str:
        x, p = layer.tensor(0), layer.params
        depth = x.shape[-1]
        name = layer.struct("tp_softmax_params", brace([x.size // depth, depth, p["input_multiplier"],
                                                        p["input_left_shift"], p["diff_min"]]))
        layer.out.call(f"tp_softmax_s8(&{name}, {layer.ptr(layer.op.inputs[0])}, {layer.ptr(layer.op.outputs[0])});")
        return "tp_softmax_s8"

    def cmsis_nn(self, layer: Layer) -> str | None:
        if not layer.whole:
            return None
        x, p = layer.tensor(0), layer.params
        depth = x.shape[-1]
        layer.out.call(f"arm_softmax_s8({layer.ptr(layer.op.inputs[0])}, {x.size // depth}, {depth}, "
                       f"{p['input_multiplier']}, {p['input_left_shift']}, {p['diff_min']}, "
                       f"{layer.ptr(layer.op.outputs[0])});")
        return "arm_softmax_s8"
