"""Data movement: PAD, TRANSPOSE, CONCATENATION, RESIZE_NEAREST_NEIGHBOR (portable kernels) and the
reshapes (RESHAPE, SQUEEZE, EXPAND_DIMS), which the memory plan aliases to their input."""
from __future__ import annotations

import numpy as np

from mcu.emit import Emitter, Layer, brace, pad6, register


@register
class PadEmitter(Emitter):
    kinds = ("PAD",)

    def portable(self, layer: Layer) -> str:
        op = layer.op
        xs, ys = layer.shape(op.inputs[0]), layer.shape(op.outputs[0])
        r = len(xs)
        before = [b for b, _ in op.options["paddings"]]
        if layer.pads is not None:
            before[1], before[2] = layer.pads
        init = (f"{{{r}, {brace(list(xs) + [1] * (6 - r))}, {brace(list(ys) + [1] * (6 - r))}, "
                f"{brace(before + [0] * (6 - r))}, {layer.params['pad_value']}}}")
        name = layer.struct("tp_pad_params", init)
        layer.out.call(f"tp_pad_s8(&{name}, {layer.ptr(op.inputs[0])}, {layer.ptr(op.outputs[0])});")
        return "tp_pad_s8"


@register
class AliasEmitter(Emitter):
    kinds = ("RESHAPE", "SQUEEZE", "EXPAND_DIMS")

    def portable(self, layer: Layer) -> str:
        return "(alias)"  # the plan gives the output the input's buffer (schema trait ALIAS)


@register
class TransposeEmitter(Emitter):
    kinds = ("TRANSPOSE",)

    def portable(self, layer: Layer) -> str:
        x, y = layer.tensor(0), layer.output
        perm = layer.op.options["perm"]
        in_strides = np.cumprod((list(x.shape[1:]) + [1])[::-1])[::-1]
        init = f"{{{len(perm)}, {brace(pad6(y.shape, 1))}, {brace(pad6([in_strides[d] for d in perm], 0))}}}"
        name = layer.struct("tp_transpose_params", init)
        layer.out.call(f"tp_transpose_s8(&{name}, {layer.ptr(layer.op.inputs[0])}, {layer.ptr(layer.op.outputs[0])});")
        return "tp_transpose_s8"


@register
class ConcatenationEmitter(Emitter):
    kinds = ("CONCATENATION",)

    def portable(self, layer: Layer) -> str:
        op, y = layer.op, layer.output
        axis = op.options["axis"]
        outer, inner_out = int(np.prod(y.shape[:axis])), int(np.prod(y.shape[axis:]))
        out = layer.ptr(op.outputs[0])
        col = 0
        for name in op.inputs:
            inner = int(np.prod(layer.graph.tensors[name].shape[axis:]))
            layer.out.call(f"for (int32_t r = 0; r < {outer}; r++) tp_copy({layer.ptr(name)} + r * {inner}, "
                           f"{out} + r * {inner_out} + {col}, {inner});")
            col += inner
        return "tp_copy"


@register
class ResizeEmitter(Emitter):
    kinds = ("RESIZE_NEAREST_NEIGHBOR",)

    def portable(self, layer: Layer) -> str:
        x, y, p = layer.tensor(0), layer.output, layer.params
        rows, cols = layer.const("int32_t", "rows", p["rows"]), layer.const("int32_t", "cols", p["cols"])
        fields = [x.shape[1], x.shape[2], x.shape[3], y.shape[1], y.shape[2]]
        name = layer.struct("tp_resize_params", f"{{{', '.join(str(int(f)) for f in fields)}, {rows}, {cols}}}")
        layer.per_image("tp_resize_nearest_s8", name)
        return "tp_resize_nearest_s8"
