"""Elementwise ops: ADD, SUB, MUL, PRELU (broadcasting walks, CMSIS-NN's arm_elementwise_*_s8 where
both inputs have the output's shape), the unary int8 ops as 256-entry tables (tp_lut_s8), and
QUANTIZE / DEQUANTIZE at float edges."""
from __future__ import annotations

import typing

import numpy as np

from mcu import specialized
from mcu.emit import Emitter, Layer, brace, pad6, register
from models.ir import Graph, Op

ADD_KEYS = ("input1_offset", "input2_offset", "output_offset", "left_shift", "input1_multiplier", "input1_shift",
            "input2_multiplier", "input2_shift", "output_multiplier", "output_shift", "act_min", "act_max")
MUL_KEYS = ("input1_offset", "input2_offset", "output_offset", "output_multiplier", "output_shift", "act_min", "act_max")
PRELU_KEYS = ("input_offset", "alpha_offset", "output_offset", "output_multiplier_1", "output_shift_1",
              "output_multiplier_2", "output_shift_2")


def _strides(shape: tuple[int, ...], out: tuple[int, ...]) -> list[int]:
    """Element strides of ``shape`` (numpy-broadcast against ``out``), 0 where it broadcasts."""
    s = (1,) * (len(out) - len(shape)) + tuple(shape)
    contiguous = np.cumprod((list(s[1:]) + [1])[::-1])[::-1]
    return [0 if s[d] == 1 and out[d] != 1 else int(contiguous[d]) for d in range(len(out))]


def walk(a: tuple[int, ...], b: tuple[int, ...], y: tuple[int, ...]) -> str:
    """The ``tp_broadcast`` initialiser of an output ``y`` read from inputs of shapes ``a``, ``b``."""
    flat = int(tuple(a) == tuple(y) and tuple(b) == tuple(y))
    return (f"{{{int(np.prod(y))}, {flat}, {brace(pad6(y, 1))}, {brace(pad6(_strides(a, y), 0))}, "
            f"{brace(pad6(_strides(b, y), 0))}}}")


def _shapes(layer: Layer) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    op = layer.op
    return layer.shape(op.inputs[0]), layer.shape(op.inputs[1]), layer.shape(op.outputs[0])


@register
class BinaryEmitter(Emitter):
    kinds = ("SUB", "PRELU")
    FORMS: typing.ClassVar[dict] = {"ADD": ("tp_add_s8", "tp_add_params", ADD_KEYS), "SUB": ("tp_sub_s8", "tp_add_params", ADD_KEYS),
              "MUL": ("tp_mul_s8", "tp_mul_params", MUL_KEYS), "PRELU": ("tp_prelu_s8", "tp_prelu_params", PRELU_KEYS)}

    def portable(self, layer: Layer) -> str:
        kernel, ctype, keys = self.FORMS[layer.op.kind]
        p = layer.params
        name = layer.struct(ctype, f"{{{', '.join(str(int(p[k])) for k in keys)}, {walk(*_shapes(layer))}}}")
        layer.out.call(f"{kernel}(&{name}, {layer.operand(0)}, {layer.operand(1)}, {layer.ptr(layer.op.outputs[0])});")
        return kernel


@register
class AddMulEmitter(BinaryEmitter):
    kinds = ("ADD", "MUL")

    def cmsis_nn(self, layer: Layer) -> str | None:
        a, b, y = _shapes(layer)
        if not a == b == y:
            return None  # CMSIS-NN's elementwise functions do not broadcast
        p, size = layer.params, int(np.prod(y))
        ins, out = f"{layer.operand(0)}, {layer.operand(1)}", layer.ptr(layer.op.outputs[0])
        if layer.op.kind == "ADD":
            args = (f"{p['input1_offset']}, {p['input1_multiplier']}, {p['input1_shift']}, {p['input2_offset']}, "
                    f"{p['input2_multiplier']}, {p['input2_shift']}, {p['left_shift']}, {out}, {p['output_offset']}, "
                    f"{p['output_multiplier']}, {p['output_shift']}, {p['act_min']}, {p['act_max']}, {size}")
            layer.out.call(layer.checked(f"arm_elementwise_add_s8({ins}, {args})") + ";")
            return "arm_elementwise_add_s8"
        args = (f"{p['input1_offset']}, {p['input2_offset']}, {out}, {p['output_offset']}, {p['output_multiplier']}, "
                f"{p['output_shift']}, {p['act_min']}, {p['act_max']}, {size}")
        layer.out.call(layer.checked(f"arm_elementwise_mul_s8({ins}, {args})") + ";")
        return "arm_elementwise_mul_s8"

    def specialized_scratch(self, graph: Graph, op: Op, params: dict, options: dict) -> int | None:
        return 0 if op.kind == "ADD" else None

    def specialized(self, layer: Layer) -> str | None:
        """ADD of same-shape tensors: the rescaled inputs looked up in two 256-entry tables."""
        a, b, y = _shapes(layer)
        if (layer.op.kind != "ADD" or not a == b == y or any(layer.tensor(k).is_constant for k in (0, 1))
                or layer.shapes):  # patches run the portable form
            return None
        p = layer.params
        t1, t2 = specialized.add_tables(p)
        bound = int(np.abs(t1.astype(np.int64)).max() + np.abs(t2.astype(np.int64)).max())
        req = specialized.requantization(np.zeros(1), [p["output_multiplier"]], [p["output_shift"]], p["output_offset"],
                                         np.array([bound]), want_doubled=False)
        table1, table2 = layer.const("int32_t", "sp_table1", t1), layer.const("int32_t", "sp_table2", t2)
        out = req.records[0]
        struct = layer.struct("tp_sp_add_layer", f"{{{int(np.prod(y))}, {p['act_min']}, {p['act_max']}, {req.mode}, "
                                                 f"{brace(out)}, {table1}, {table2}}}")
        fn = f"{layer.prefix}_run"
        layer.out.consts.append(f"static __attribute__((noinline)) void {fn}(const int8_t *in1, const int8_t *in2, int8_t *out) "
                                f"{{ tp_sp_add(&{struct}, in1, in2, out); }}\n")
        layer.out.call(f"{fn}({layer.ptr(layer.op.inputs[0])}, {layer.ptr(layer.op.inputs[1])}, "
                       f"{layer.ptr(layer.op.outputs[0])});")
        return "tp_sp_add"


@register
class TableEmitter(Emitter):
    """Unary int8 ops: TFLite's integer arithmetic evaluated at export for all 256 inputs."""

    kinds = ("HARD_SWISH", "LOGISTIC", "TANH", "RELU", "RELU6", "LEAKY_RELU", "QUANTIZE", "DEQUANTIZE")

    def portable(self, layer: Layer) -> str:
        op, p = layer.op, layer.params
        x, y = op.inputs[0], op.outputs[0]
        size = int(np.prod(layer.shape(y)))
        if "table" in p:
            table = layer.const("int8_t", "table", p["table"])
            layer.out.call(f"tp_lut_s8({table}, {size}, {layer.ptr(x)}, {layer.ptr(y)});")
            return "tp_lut_s8"
        name = layer.struct("tp_quant_params", f"{{{size}, {float(np.float32(p['scale']))!r}f, {p['zero_point']}}}")
        kernel = "tp_quantize_f32_s8" if op.kind == "QUANTIZE" else "tp_dequantize_s8_f32"
        layer.out.call(f"{kernel}(&{name}, {layer.ptr(x)}, {layer.ptr(y)});")
        return kernel
