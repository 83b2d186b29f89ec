"""Post-training quantization of a float IR graph to the int8 IR, with a calibration set.

The scheme TFLite's converter and TFLite Micro expect: weights int8 symmetric per output channel
(zero point 0, range [-127, 127]); activations int8 asymmetric per tensor from the calibrated
min/max (range widened to include 0); biases int32 with scale ``input_scale * weight_scale``;
pooling/reshape/pad outputs share their input's quantization; softmax outputs scale 1/256, zero
point -128 (LOGISTIC too; TANH 1/128 and 0); constant operands of elementwise ops (a per-channel
scale, a scalar) int8 per tensor from their own range. ``float_io=True`` keeps float32 graph
inputs/outputs behind QUANTIZE/DEQUANTIZE ops.
"""
from __future__ import annotations

import copy

import numpy as np

from models import execute, schema
from models.ir import Graph, Op, Quantization, Tensor
from models.quantization import tflite_round

# Outputs whose quantization TFLite fixes: (scale, zero point).
FIXED_OUTPUT = {"SOFTMAX": (1.0 / 256, -128), "LOGISTIC": (1.0 / 256, -128), "TANH": (1.0 / 128, 0)}
# Ops whose output is calibrated (the rest carry their input's quantization, schema trait
# SAME_QUANTIZATION, or a fixed one).
CALIBRATED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "PRELU", "MEAN", "HARD_SWISH",
              "RELU", "LEAKY_RELU")


def calibrate(graph: Graph, calibration_inputs: list[np.ndarray], params: dict | None = None,
              batch_size: int = 256) -> dict[str, tuple[float, float]]:
    """(min, max) of every activation tensor over the calibration set (float execution)."""
    params = execute.float_params(graph) if params is None else params
    import jax

    run = jax.jit(lambda *xs: execute.float_forward(graph, params, *xs, intermediates=True)[1])
    n = calibration_inputs[0].shape[0]
    ranges: dict[str, tuple[float, float]] = {}
    for start in range(0, n, batch_size):
        env = run(*(x[start:start + batch_size] for x in calibration_inputs))
        for name, value in env.items():
            if graph.tensors[name].is_constant:
                continue
            v = np.asarray(value)
            lo, hi = float(v.min()), float(v.max())
            if name in ranges:
                lo, hi = min(lo, ranges[name][0]), max(hi, ranges[name][1])
            ranges[name] = (lo, hi)
    return ranges


def activation_quantization(lo: float, hi: float) -> Quantization:
    """Asymmetric int8: the range [min(lo, 0), max(hi, 0)] onto [-128, 127] with 0 exact."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = np.float32((hi - lo) / 255.0)
    zero_point = int(np.clip(tflite_round(-128 - lo / float(scale)), -128, 127))
    return Quantization(scale, zero_point)


def quantize_weights(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, Quantization]:
    """Symmetric int8 (zero point 0, [-127, 127]): per channel along ``axis``, or per tensor
    when ``axis`` is None."""
    reduce_axes = tuple(a for a in range(w.ndim) if a != axis)
    max_abs = np.atleast_1d(np.abs(w).max(axis=reduce_axes))
    scale = np.where(max_abs > 0, max_abs / 127.0, 1e-8).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.vectorize(tflite_round)(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, Quantization(scale, np.zeros(scale.size, np.int64), 0 if axis is None else axis)


def quantize(graph: Graph, calibration_inputs: list[np.ndarray], *, params: dict | None = None,
             float_io: bool = True, per_channel_dense: bool = True) -> Graph:
    """The int8 IR of a float ``graph`` (weights from ``params`` if given, e.g. after training).

    ``per_channel_dense=False`` quantizes FULLY_CONNECTED weights per tensor, as TFLite's
    converter writes them (and as every MLPerf Tiny reference model has them)."""
    graph.validate()
    params = execute.float_params(graph) if params is None else params
    ranges = calibrate(graph, calibration_inputs, params)
    tensors: dict[str, Tensor] = {}
    act_q: dict[str, Quantization] = {}

    def activation(name: str, q: Quantization) -> None:
        act_q[name] = q
        t = graph.tensors[name]
        tensors[name] = Tensor(name, t.shape, "int8", q)

    for name in graph.inputs:
        activation(name, activation_quantization(*ranges[name]))
    ops: list[Op] = []
    for op in graph.ops:
        out = op.outputs[0]
        spec = schema.spec(op.kind)
        if spec.has(schema.SAME_QUANTIZATION):
            activation(out, act_q[op.inputs[0]])
        elif op.kind in FIXED_OUTPUT:
            activation(out, Quantization(np.float32(FIXED_OUTPUT[op.kind][0]), FIXED_OUTPUT[op.kind][1]))
        elif op.kind in CALIBRATED:
            activation(out, activation_quantization(*ranges[out]))
        else:
            raise ValueError(f"op {op.kind} {op.name!r}: post-training quantization of this op kind is not supported")
        for operand, name in zip(spec.operands, op.inputs):
            if name is None or not graph.tensors[name].is_constant:
                continue
            value = np.asarray(params.get(name, graph.tensors[name].data), np.float32)
            if operand.role == "weights":
                per_tensor = op.kind == "FULLY_CONNECTED" and not per_channel_dense
                qw, wq = quantize_weights(value, None if per_tensor else operand.axis)
                tensors[name] = Tensor(name, value.shape, "int8", wq, qw)
            elif operand.role == "operand":  # a constant scale, shift or alpha: int8 per tensor
                cq = activation_quantization(float(value.min()), float(value.max()))
                qv = np.clip(np.vectorize(tflite_round)(value / cq.scale[0]) + cq.zero_point[0], -128, 127)
                tensors[name] = Tensor(name, value.shape, "int8", cq, qv.astype(np.int8))
        if spec.has(schema.WEIGHTED):
            w_name, b_name = op.inputs[1], (op.inputs[2] if len(op.inputs) > 2 else None)
            wq = tensors[w_name].quantization
            if b_name is not None:
                b = np.asarray(params[b_name], np.float64)
                bias_scale = float(act_q[op.inputs[0]].scale[0]) * wq.scale.astype(np.float64)
                qb = np.array([tflite_round(v) for v in b / bias_scale], np.float64)
                if np.abs(qb).max(initial=0) >= 2**31:
                    raise ValueError(f"op {op.kind} {op.name!r}: bias does not fit int32 at scale {bias_scale.min():.3g}")
                tensors[b_name] = Tensor(b_name, b.shape, "int32",
                                         Quantization(bias_scale.astype(np.float32), np.zeros(bias_scale.size, np.int64)),
                                         qb.astype(np.int32))
        ops.append(copy.deepcopy(op))

    inputs, outputs = list(graph.inputs), list(graph.outputs)
    if float_io:
        for i, name in enumerate(graph.inputs):
            float_name = name + "_float"
            tensors[float_name] = Tensor(float_name, graph.tensors[name].shape, "float32")
            ops.insert(i, Op("QUANTIZE", [float_name], [name], {}))
            inputs[i] = float_name
        for i, name in enumerate(graph.outputs):
            float_name = name + "_float"
            tensors[float_name] = Tensor(float_name, graph.tensors[name].shape, "float32")
            ops.append(Op("DEQUANTIZE", [name], [float_name], {}))
            outputs[i] = float_name
    return Graph(tensors, ops, inputs, outputs, name=graph.name + "_int8").validate()
