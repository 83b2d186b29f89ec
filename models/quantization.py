"""The integer parameters each quantized op needs, computed as TFLite Micro's Prepare() does.

One function per op family turns an IR op's scales and zero points into the exact integers
(multipliers, shifts, offsets, clamp bounds, paddings, int8 lookup tables) that TFLite Micro's
reference kernels use; the op schema (``models.schema``) names the function of each kind and
``op_params(graph, op)`` dispatches through it. The JAX int8 executor and the MCU C generator
both read them from here; the integer arithmetic itself is ``kernels.quant`` (re-exported
below), so there is one source of truth. A parameter TFLite Micro could not prepare (a
multiplier out of range, a scale that is not positive) raises ``ValueError`` here, which the
graph validation reports with the op's index.
"""
from __future__ import annotations

import math

import numpy as np

from kernels import quant
from kernels.quant import (  # noqa: F401  (re-exported: the quantization math of the IR)
    activation_range,
    affine_quantize,
    dequantize,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    softmax_int8,
    tflite_round,
)
from models.ir import Graph, Op, Tensor

SOFTMAX_SCALED_DIFF_INTEGER_BITS = 5  # TFLite's kScaledDiffIntegerBits for int8 softmax
ADD_LEFT_SHIFT = 20  # TFLite's left_shift for int8 ADD/SUB


def _q(t: Tensor, where: str):
    if t.quantization is None:
        raise ValueError(f"{where}: tensor {t.name!r} ({t.dtype}) has no quantization parameters")
    return t.quantization


def _scale(t: Tensor, where: str) -> float:
    return float(_q(t, where).scale[0])


def _zp(t: Tensor, where: str) -> int:
    return int(_q(t, where).zero_point[0])


def _f32(x) -> float:
    return float(np.float32(x))


def _smaller_than_one(real: float, what: str, where: str) -> tuple[int, int]:
    """``QuantizeMultiplierSmallerThanOneExp``: TFLite checks 0 < real < 1 (and aborts otherwise)."""
    if not 0.0 < real < 1.0:
        raise ValueError(f"{where}: {what} multiplier {real:.6g} is not in (0, 1); the tensor scales are out of range")
    return quantize_multiplier(real)


def same_padding(in_size: int, filter_size: int, stride: int, dilation: int, out_size: int) -> tuple[int, int]:
    """TFLite ``ComputePaddingWithOffset``: (before, after) padding of one spatial dim."""
    effective = (filter_size - 1) * dilation + 1
    total = max((out_size - 1) * stride + effective - in_size, 0)
    return total // 2, total - total // 2


def conv_padding(op: Op, in_hw: tuple[int, int], filter_hw: tuple[int, int], out_hw: tuple[int, int]):
    """((top, bottom), (left, right)) for a conv/pool op with SAME or VALID padding."""
    if op.options["padding"] == "VALID":
        return (0, 0), (0, 0)
    dh, dw = op.options.get("dilation_h", 1), op.options.get("dilation_w", 1)
    return (
        same_padding(in_hw[0], filter_hw[0], op.options["stride_h"], dh, out_hw[0]),
        same_padding(in_hw[1], filter_hw[1], op.options["stride_w"], dw, out_hw[1]),
    )


def _activation(op: Op, y: Tensor, where: str) -> tuple[int, int]:
    return activation_range(op.options.get("activation", "NONE"), _scale(y, where), _zp(y, where), y.dtype)


def weighted_params(graph: Graph, op: Op, where: str) -> dict:
    """CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED: ``input_offset`` (= -input zero point),
    ``output_offset``, ``output_multiplier``/``output_shift`` (int32 arrays, one per output
    channel, per-tensor broadcast), ``act_min``/``act_max``; convs add ``padding``
    ((top, bottom), (left, right))."""
    t = graph.tensors
    x, w, y = t[op.inputs[0]], t[op.inputs[1]], t[op.outputs[0]]
    qw = _q(w, where)
    channels = y.shape[-1]
    sx, sy = _scale(x, where), _scale(y, where)
    if op.kind == "FULLY_CONNECTED" and not qw.per_channel:
        # GetQuantizedConvolutionMultipler: the input*filter product is taken in float32.
        real = np.full(channels, float(np.float32(sx) * np.float32(qw.scale[0])) / sy)
    else:
        real = sx * np.broadcast_to(qw.scale.astype(np.float64), (channels,)) / sy
    mult, shift = quantize_multipliers(real)
    act_min, act_max = _activation(op, y, where)
    params = {"input_offset": -_zp(x, where), "output_offset": _zp(y, where), "output_multiplier": mult,
              "output_shift": shift, "act_min": act_min, "act_max": act_max}
    if op.kind != "FULLY_CONNECTED":
        params["padding"] = conv_padding(op, x.shape[1:3], w.shape[1:3], y.shape[1:3])
    return params


def add_sub_params(graph: Graph, op: Op, where: str) -> dict:
    """ADD (add_common.cc: the scales in double) and SUB (sub_common.cc: in float32):
    ``input{1,2}_offset``, ``output_offset``, ``left_shift``, ``input{1,2}_multiplier``/``_shift``,
    ``output_multiplier``/``output_shift``, ``act_min``/``act_max``."""
    a, b, y = (graph.tensors[n] for n in (*op.inputs, op.outputs[0]))
    sa, sb, sy = _scale(a, where), _scale(b, where), _scale(y, where)
    if op.kind == "ADD":
        twice_max = 2.0 * max(sa, sb)
        r1, r2, ro = sa / twice_max, sb / twice_max, twice_max / ((1 << ADD_LEFT_SHIFT) * sy)
    else:
        twice_max = _f32(2.0 * _f32(max(sa, sb)))
        r1, r2 = _f32(sa / twice_max), _f32(sb / twice_max)
        ro = _f32(twice_max / _f32((1 << ADD_LEFT_SHIFT) * sy))
    m1, s1 = _smaller_than_one(r1, "input 1", where)
    m2, s2 = _smaller_than_one(r2, "input 2", where)
    mo, so = _smaller_than_one(ro, "output", where)
    act_min, act_max = _activation(op, y, where)
    return {"input1_offset": -_zp(a, where), "input2_offset": -_zp(b, where), "output_offset": _zp(y, where),
            "left_shift": ADD_LEFT_SHIFT, "input1_multiplier": m1, "input1_shift": s1, "input2_multiplier": m2,
            "input2_shift": s2, "output_multiplier": mo, "output_shift": so, "act_min": act_min, "act_max": act_max}


def mul_params(graph: Graph, op: Op, where: str) -> dict:
    """MUL (mul_common.cc): ``input{1,2}_offset``, ``output_offset``, ``output_multiplier``/``_shift``,
    ``act_min``/``act_max``."""
    a, b, y = (graph.tensors[n] for n in (*op.inputs, op.outputs[0]))
    mo, so = quantize_multiplier(_scale(a, where) * _scale(b, where) / _scale(y, where))
    act_min, act_max = _activation(op, y, where)
    return {"input1_offset": -_zp(a, where), "input2_offset": -_zp(b, where), "output_offset": _zp(y, where),
            "output_multiplier": mo, "output_shift": so, "act_min": act_min, "act_max": act_max}


def prelu_params(graph: Graph, op: Op, where: str) -> dict:
    """PRELU (prelu_common.cc): the positive side rescaled by s_in/s_out, the negative side's
    product with alpha by s_in*s_alpha/s_out."""
    x, alpha, y = (graph.tensors[n] for n in (*op.inputs, op.outputs[0]))
    m1, s1 = quantize_multiplier(_scale(x, where) / _scale(y, where))
    m2, s2 = quantize_multiplier(_scale(x, where) * _scale(alpha, where) / _scale(y, where))
    return {"input_offset": -_zp(x, where), "alpha_offset": -_zp(alpha, where), "output_offset": _zp(y, where),
            "output_multiplier_1": m1, "output_shift_1": s1, "output_multiplier_2": m2, "output_shift_2": s2}


def pool_params(graph: Graph, op: Op, where: str) -> dict:
    """AVERAGE_POOL_2D / MAX_POOL_2D: ``padding``, ``act_min``/``act_max``; TFLite Micro requires
    the input and output quantization to match (scales within 1e-6)."""
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    if abs(_scale(x, where) - _scale(y, where)) > 1e-6 or _zp(x, where) != _zp(y, where):
        raise ValueError(f"{where}: int8 pooling needs equal input and output quantization (TFLite requires it)")
    act_min, act_max = _activation(op, y, where)
    filt = (op.options["filter_h"], op.options["filter_w"])
    return {"padding": conv_padding(op, x.shape[1:3], filt, y.shape[1:3]), "act_min": act_min, "act_max": act_max}


def mean_params(graph: Graph, op: Op, where: str) -> dict:
    """MEAN: ``input_zero_point``, ``output_zero_point``, ``num_elements``, ``multiplier``/``shift``
    (with 1/num_elements folded in as TFLite does)."""
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    mult, shift = quantize_multiplier(_scale(x, where) / _scale(y, where))
    n = int(np.prod([x.shape[a] for a in op.options["axes"]]))
    # reference_ops::QuantizedMeanOrSum folds 1/n into the multiplier with integer division.
    bits = min(n.bit_length() - 1, 32, 31 + shift)
    if bits < 0:
        raise ValueError(f"{where}: input/output scale ratio {_scale(x, where) / _scale(y, where):.3g} is too small")
    mult = int((mult << bits) // n)
    return {"input_zero_point": _zp(x, where), "output_zero_point": _zp(y, where), "num_elements": n,
            "multiplier": mult, "shift": shift - bits}


def softmax_params(graph: Graph, op: Op, where: str) -> dict:
    """SOFTMAX: ``input_multiplier``, ``input_left_shift``, ``diff_min``."""
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    if y.dtype != "int8" or _zp(y, where) != -128 or _scale(y, where) != 1.0 / 256:
        raise ValueError(f"{where}: int8 softmax output must have scale 1/256 and zero point -128 (TFLite requires it)")
    bits = SOFTMAX_SCALED_DIFF_INTEGER_BITS
    real = min(op.options["beta"] * _scale(x, where) * (1 << (31 - bits)), (1 << 31) - 1.0)
    mult, left_shift = quantize_multiplier(real)
    if not 0 <= left_shift <= 31:
        raise ValueError(f"{where}: input scale {_scale(x, where):.3g} with beta {op.options['beta']} is out of range")
    # CalculateInputRadius: floor of the largest rescaled input difference that stays finite.
    radius = quant.input_radius(bits, left_shift)
    return {"input_multiplier": mult, "input_left_shift": left_shift, "diff_min": -radius}


def quantize_params(graph: Graph, op: Op, where: str) -> dict:
    """QUANTIZE: float -> int8 ``scale``/``zero_point``; int8 -> int8 also its 256-entry ``table``
    (``reference_ops::Requantize``)."""
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    params = {"scale": _scale(y, where), "zero_point": _zp(y, where)}
    if x.dtype == "int8":
        mult, shift = quantize_multiplier(_scale(x, where) / _scale(y, where))
        params["table"] = quant.unary_table(quant.requantize_int8, input_zero_point=_zp(x, where),
                                            output_zero_point=_zp(y, where), multiplier=mult, shift=shift)
    return params


def dequantize_params(graph: Graph, op: Op, where: str) -> dict:
    """DEQUANTIZE: ``scale``, ``zero_point`` of the int8 input."""
    x = graph.tensors[op.inputs[0]]
    return {"scale": _scale(x, where), "zero_point": _zp(x, where)}


def pad_params(graph: Graph, op: Op, where: str) -> dict:
    """PAD: ``pad_value`` (the output zero point)."""
    y = graph.tensors[op.outputs[0]]
    return {"pad_value": 0 if y.quantization is None else _zp(y, where)}


def concatenation_params(graph: Graph, op: Op, where: str) -> dict:
    """CONCATENATION: no parameters; TFLite Micro requires equal input and output quantization."""
    y = graph.tensors[op.outputs[0]]
    for name in op.inputs:
        x = graph.tensors[name]
        if _scale(x, where) != _scale(y, where) or _zp(x, where) != _zp(y, where):
            raise ValueError(f"{where}: int8 CONCATENATION needs equal input and output quantization ({name!r} differs)")
    return {}


def resize_params(graph: Graph, op: Op, where: str) -> dict:
    """RESIZE_NEAREST_NEIGHBOR: ``rows``, ``cols`` (source index of each output row/column)."""
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    o = op.options
    return {
        "rows": nearest_neighbor_index(x.shape[1], y.shape[1], o["align_corners"], o["half_pixel_centers"]),
        "cols": nearest_neighbor_index(x.shape[2], y.shape[2], o["align_corners"], o["half_pixel_centers"]),
    }


def no_params(graph: Graph, op: Op, where: str) -> dict:
    """RESHAPE, SQUEEZE, EXPAND_DIMS, TRANSPOSE: data movement, no parameters."""
    return {}


# Unary int8 ops: each prepares the arguments of its kernels.quant function and returns the
# 256-entry ``table`` the runtimes gather from.


def _table(fn, where: str, **params) -> dict:
    return {"table": quant.unary_table(fn, **params), **params}


def hard_swish_params(graph: Graph, op: Op, where: str) -> dict:
    """HARD_SWISH (hard_swish_common.cc): the scales in float32, multipliers cut to int16."""
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    hires = _f32(_f32(1.0 / 128.0) * _f32(_scale(x, where)))
    out_m, out_e = quantize_multiplier(_f32(hires / _f32(_scale(y, where))))
    relu_m, relu_e = quantize_multiplier(_f32(hires / _f32(3.0 / 32768.0)))
    if not -31 <= out_e <= 0 or not -31 <= relu_e <= 31:
        raise ValueError(f"{where}: input/output scales {_scale(x, where):.3g}/{_scale(y, where):.3g} are out of the "
                         "range TFLite's int8 HARD_SWISH supports")
    return _table(quant.hard_swish_int8, where, input_zero_point=_zp(x, where), output_zero_point=_zp(y, where),
                  reluish_multiplier=quant.downscale_multiplier_to_int16(relu_m), reluish_exponent=relu_e,
                  output_multiplier=quant.downscale_multiplier_to_int16(out_m), output_exponent=out_e)


def _sigmoid_input(x: Tensor, where: str) -> dict:
    """logistic_common.cc / tanh.cc: the input rescaled to Q4.27 (frexp of scale * 2**27)."""
    fraction, left_shift = math.frexp(_scale(x, where) * float(1 << 27))
    multiplier = int(tflite_round(fraction * (1 << 31)))
    if multiplier >= 1 << 31 or not 0 <= left_shift <= 30:
        raise ValueError(f"{where}: input scale {_scale(x, where):.3g} is out of the range TFLite's int8 "
                         "LOGISTIC/TANH support")
    return {"input_zero_point": _zp(x, where), "input_range_radius": quant.input_radius(4, left_shift),
            "input_multiplier": multiplier, "input_left_shift": left_shift}


def logistic_params(graph: Graph, op: Op, where: str) -> dict:
    """LOGISTIC: output zero point -128 (TFLite Micro requires it; the scale is taken as 1/256)."""
    y = graph.tensors[op.outputs[0]]
    if _zp(y, where) != -128:
        raise ValueError(f"{where}: int8 LOGISTIC output must have zero point -128 (TFLite requires it)")
    return _table(quant.logistic_int8, where, **_sigmoid_input(graph.tensors[op.inputs[0]], where))


def tanh_params(graph: Graph, op: Op, where: str) -> dict:
    """TANH: the output is scale 1/128, zero point 0 whatever the tensor says (as TFLite Micro)."""
    return _table(quant.tanh_int8, where, **_sigmoid_input(graph.tensors[op.inputs[0]], where))


def leaky_relu_params(graph: Graph, op: Op, where: str) -> dict:
    """LEAKY_RELU (leaky_relu_common.cc): identity and alpha multipliers, products in float32."""
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    sx, sy = _f32(_scale(x, where)), _f32(_scale(y, where))
    am, ash = quantize_multiplier(_f32(_f32(sx * _f32(op.options["alpha"])) / sy))
    im, ish = quantize_multiplier(_f32(sx / sy))
    return _table(quant.leaky_relu_int8, where, input_zero_point=_zp(x, where), output_zero_point=_zp(y, where),
                  identity_multiplier=im, identity_shift=ish, alpha_multiplier=am, alpha_shift=ash)


def relu_params(graph: Graph, op: Op, where: str) -> dict:
    """RELU (activations_common.cc ``CalculateReluOpData``): requantize and clamp at the output's zero."""
    x, y = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    mult, shift = quantize_multiplier(_f32(_f32(_scale(x, where)) / _f32(_scale(y, where))))
    return _table(quant.requantize_int8, where, input_zero_point=_zp(x, where), output_zero_point=_zp(y, where),
                  multiplier=mult, shift=shift, act_min=max(-128, _zp(y, where)), act_max=127)


def relu6_params(graph: Graph, op: Op, where: str) -> dict:
    """RELU6 (``Relu6Prepare``): a clamp of the raw values to [zero, six] on the input's scale; the
    output quantization is not used (TFLite Micro assumes it equals the input's)."""
    x = graph.tensors[op.inputs[0]]
    zero = _zp(x, where)
    quotient = float(np.float32(6.0) / np.float32(_scale(x, where)))
    if not abs(quotient) < 2**30:
        raise ValueError(f"{where}: input scale {_scale(x, where):.3g} is out of the range TFLite's int8 RELU6 supports")
    six = int(min(max(tflite_round(quotient) + zero, -128), 127))
    v = np.arange(-128, 128)
    table = np.where(v > six, six, np.where(v < zero, zero, v))  # Relu6Quantized's comparison order
    return {"table": table.astype(np.int8), "zero": zero, "six": six}


def op_params(graph: Graph, op: Op) -> dict:
    """TFLite Micro's prepared integer parameters for ``op`` (int8 ops; float edges for
    QUANTIZE/DEQUANTIZE); the function of each kind is named in ``models.schema``."""
    from models import schema

    return schema.spec(op.kind).params(graph, op, f"op {op.kind} {op.name!r}")


def nearest_neighbor_index(in_size: int, out_size: int, align_corners: bool, half_pixel_centers: bool) -> np.ndarray:
    """TFLite ``GetNearestNeighbor`` for every output index (float32 arithmetic, as TFLite)."""
    if align_corners and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    offset = np.float32(0.5 if half_pixel_centers else 0.0)
    out = []
    for i in range(out_size):
        v = (np.float32(i) + offset) * scale
        j = int(tflite_round(float(v))) if align_corners else int(np.floor(v))
        j = min(j, in_size - 1)
        if half_pixel_centers:
            j = max(0, j)
        out.append(j)
    return np.array(out, dtype=np.int32)
