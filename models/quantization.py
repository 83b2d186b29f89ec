"""The integer parameters each quantized op needs, computed as TFLite Micro's Prepare() does.

``op_params(graph, op)`` turns an IR op's scales and zero points into the exact integers
(multipliers, shifts, offsets, clamp bounds, paddings) that TFLite Micro's reference kernels
use. The JAX int8 executor and the MCU C generator both read them from here; the integer
arithmetic itself is ``kernels.quant`` (re-exported below), so there is one source of truth.
"""
from __future__ import annotations

import numpy as np

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
ADD_LEFT_SHIFT = 20  # TFLite's left_shift for int8 ADD


def _q(t: Tensor, where: str):
    if t.quantization is None:
        raise ValueError(f"{where}: tensor {t.name!r} ({t.dtype}) has no quantization parameters")
    return t.quantization


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


def op_params(graph: Graph, op: Op) -> dict:
    """TFLite Micro's prepared integer parameters for ``op`` (int8 ops; float edges for
    QUANTIZE/DEQUANTIZE). Keys by kind:

    CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED: ``input_offset`` (= -input zero point),
      ``output_offset``, ``output_multiplier`` and ``output_shift`` (int32 arrays, one per
      output channel, per-tensor broadcast), ``act_min``/``act_max``; convs add ``padding``
      ((top, bottom), (left, right)).
    ADD: ``input1_offset``, ``input2_offset``, ``output_offset``, ``left_shift``,
      ``input1_multiplier``/``input1_shift``, ``input2_multiplier``/``input2_shift``,
      ``output_multiplier``/``output_shift``, ``act_min``/``act_max``.
    MUL: ``input1_offset``, ``input2_offset``, ``output_offset``, ``output_multiplier``,
      ``output_shift``, ``act_min``/``act_max``.
    AVERAGE_POOL_2D / MAX_POOL_2D: ``padding``, ``act_min``/``act_max``.
    MEAN: ``input_zero_point``, ``output_zero_point``, ``num_elements``, ``multiplier``/``shift``
      (with 1/num_elements folded in as TFLite does).
    SOFTMAX: ``input_multiplier``, ``input_left_shift``, ``diff_min``.
    QUANTIZE / DEQUANTIZE: ``scale``, ``zero_point``.
    PAD: ``pad_value`` (the output zero point). RESIZE_NEAREST_NEIGHBOR: ``rows``, ``cols``
      (source index of each output row/column). Others: ``{}``.
    """
    where = f"op {op.kind} {op.name!r}"
    t = graph.tensors
    kind = op.kind
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        x, w, y = t[op.inputs[0]], t[op.inputs[1]], t[op.outputs[0]]
        qx, qw, qy = _q(x, where), _q(w, where), _q(y, where)
        channels = y.shape[-1]
        sx, sy = float(qx.scalar_scale), float(qy.scalar_scale)
        if kind == "FULLY_CONNECTED" and not qw.per_channel:
            # GetQuantizedConvolutionMultipler: the input*filter product is taken in float32.
            real = np.full(channels, float(np.float32(qx.scale[0]) * np.float32(qw.scale[0])) / sy)
        else:
            ws = np.broadcast_to(qw.scale.astype(np.float64), (channels,))
            real = sx * ws / sy
        mult, shift = quantize_multipliers(real)
        act_min, act_max = activation_range(op.options["activation"], qy.scale[0], qy.scalar_zero_point, y.dtype)
        params = {
            "input_offset": -qx.scalar_zero_point,
            "output_offset": qy.scalar_zero_point,
            "output_multiplier": mult,
            "output_shift": shift,
            "act_min": act_min,
            "act_max": act_max,
        }
        if kind != "FULLY_CONNECTED":
            params["padding"] = conv_padding(op, x.shape[1:3], w.shape[1:3], y.shape[1:3])
        return params
    if kind == "ADD":
        a, b, y = (t[n] for n in (*op.inputs, op.outputs[0]))
        qa, qb, qy = _q(a, where), _q(b, where), _q(y, where)
        sa, sb, sy = float(qa.scale[0]), float(qb.scale[0]), float(qy.scale[0])
        twice_max = 2.0 * max(sa, sb)
        m1, s1 = quantize_multiplier(sa / twice_max)
        m2, s2 = quantize_multiplier(sb / twice_max)
        mo, so = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * sy))
        act_min, act_max = activation_range(op.options["activation"], qy.scale[0], qy.scalar_zero_point, y.dtype)
        return {
            "input1_offset": -qa.scalar_zero_point, "input2_offset": -qb.scalar_zero_point,
            "output_offset": qy.scalar_zero_point, "left_shift": ADD_LEFT_SHIFT,
            "input1_multiplier": m1, "input1_shift": s1, "input2_multiplier": m2, "input2_shift": s2,
            "output_multiplier": mo, "output_shift": so, "act_min": act_min, "act_max": act_max,
        }
    if kind == "MUL":
        a, b, y = (t[n] for n in (*op.inputs, op.outputs[0]))
        qa, qb, qy = _q(a, where), _q(b, where), _q(y, where)
        mo, so = quantize_multiplier(float(qa.scale[0]) * float(qb.scale[0]) / float(qy.scale[0]))
        act_min, act_max = activation_range(op.options["activation"], qy.scale[0], qy.scalar_zero_point, y.dtype)
        return {
            "input1_offset": -qa.scalar_zero_point, "input2_offset": -qb.scalar_zero_point,
            "output_offset": qy.scalar_zero_point, "output_multiplier": mo, "output_shift": so,
            "act_min": act_min, "act_max": act_max,
        }
    if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        x, y = t[op.inputs[0]], t[op.outputs[0]]
        qy = _q(y, where)
        if x.quantization is not None and (
            x.quantization.scalar_zero_point != qy.scalar_zero_point or x.quantization.scale[0] != qy.scale[0]
        ):
            raise ValueError(f"{where}: int8 pooling needs equal input and output quantization (TFLite requires it)")
        act_min, act_max = activation_range(op.options["activation"], qy.scale[0], qy.scalar_zero_point, y.dtype)
        filt = (op.options["filter_h"], op.options["filter_w"])
        return {"padding": conv_padding(op, x.shape[1:3], filt, y.shape[1:3]), "act_min": act_min, "act_max": act_max}
    if kind == "MEAN":
        x, y = t[op.inputs[0]], t[op.outputs[0]]
        qx, qy = _q(x, where), _q(y, where)
        mult, shift = quantize_multiplier(float(qx.scale[0]) / float(qy.scale[0]))
        n = int(np.prod([x.shape[a] for a in op.options["axes"]]))
        # reference_ops::QuantizedMeanOrSum folds 1/n into the multiplier with integer division.
        bits = min(n.bit_length() - 1, 32, 31 + shift)
        mult = int((mult << bits) // n)
        return {"input_zero_point": qx.scalar_zero_point, "output_zero_point": qy.scalar_zero_point,
                "num_elements": n, "multiplier": mult, "shift": shift - bits}
    if kind == "SOFTMAX":
        x, y = t[op.inputs[0]], t[op.outputs[0]]
        qx, qy = _q(x, where), _q(y, where)
        if y.dtype != "int8" or qy.scalar_zero_point != -128 or float(qy.scale[0]) != 1.0 / 256:
            raise ValueError(f"{where}: int8 softmax output must have scale 1/256 and zero point -128 (TFLite requires it)")
        bits = SOFTMAX_SCALED_DIFF_INTEGER_BITS
        real = min(op.options["beta"] * float(qx.scale[0]) * (1 << (31 - bits)), (1 << 31) - 1.0)
        mult, left_shift = quantize_multiplier(real)
        # CalculateInputRadius: floor of the largest rescaled input difference that stays finite.
        radius = int(np.floor(((1 << bits) - 1) * (1 << (31 - bits)) / (1 << left_shift)))
        return {"input_multiplier": mult, "input_left_shift": left_shift, "diff_min": -radius}
    if kind == "QUANTIZE":
        x, y = t[op.inputs[0]], t[op.outputs[0]]
        if x.dtype != "float32":
            raise ValueError(f"{where}: only float32 -> int8 QUANTIZE is supported, got {x.dtype} -> {y.dtype}")
        qy = _q(y, where)
        return {"scale": float(qy.scale[0]), "zero_point": qy.scalar_zero_point}
    if kind == "DEQUANTIZE":
        qx = _q(t[op.inputs[0]], where)
        return {"scale": float(qx.scale[0]), "zero_point": qx.scalar_zero_point}
    if kind == "PAD":
        y = t[op.outputs[0]]
        return {"pad_value": 0 if y.quantization is None else y.quantization.scalar_zero_point}
    if kind == "CONCATENATION":
        y = t[op.outputs[0]]
        for name in op.inputs:
            qa, qy = t[name].quantization, y.quantization
            if qa is not None and qy is not None and (
                qa.scale[0] != qy.scale[0] or qa.scalar_zero_point != qy.scalar_zero_point
            ):
                raise ValueError(f"{where}: int8 CONCATENATION needs equal input and output quantization ({name!r} differs)")
        return {}
    if kind == "RESIZE_NEAREST_NEIGHBOR":
        x, y = t[op.inputs[0]], t[op.outputs[0]]
        o = op.options
        return {
            "rows": nearest_neighbor_index(x.shape[1], y.shape[1], o["align_corners"], o["half_pixel_centers"]),
            "cols": nearest_neighbor_index(x.shape[2], y.shape[2], o["align_corners"], o["half_pixel_centers"]),
        }
    return {}


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
