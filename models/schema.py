"""The op schema: every op kind the graph IR supports, in one table.

Each entry (``OpSpec``) holds an op's operands, its options and their legal values, the rule
that gives its output shape from its inputs and options, the dtype rule, the quantization rule
(TFLite Micro's Prepare(), a function of ``models.quantization``), the traits the runtimes plan
with, the runtimes that implement it, and how it is written in a .tflite file. ``check_op``
applies an entry to one op; ``Graph.validate`` applies it to every op of a graph, so a graph
that passes runs in every runtime the entry names, and one that does not is refused with a
``ValueError`` naming the op's index, kind and the field at fault.

Adding an op is one entry here plus its integer math (``kernels.quant`` / ``kernels.int8``),
its JAX function (``models.execute.INT8_OPS``) and its C emitter (``mcu.emit``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from models import quantization as qz
from models.ir import ACTIVATIONS, PADDINGS, Graph, Op, Tensor

RUNTIMES = ("jax", "portable", "cmsis-nn")

# Traits the runtimes plan with (``OpSpec.traits``):
WEIGHTED = "weighted"  # operands after the first are the op's own constants (filter, bias)
WINDOW = "window"  # each output pixel reads a kh x kw window of an NHWC input, in output order
ELEMENTWISE = "elementwise"  # output element i reads element i of each input of the output's shape
TABLE = "table"  # int8 -> int8 through the 256-entry ``table`` of its parameters
ALIAS = "alias"  # the output is the input's bytes under another shape (no kernel runs)
SAME_QUANTIZATION = "same_quantization"  # post-training quantization gives the output the input's
PATCHABLE = "patchable"  # may run patch by patch on NHWC regions (mcu.patch)
MAX_RANK = 6  # the C kernels index up to six dimensions
MAX_BROADCAST_RANK = 4  # TFLite Micro's BroadcastAdd4DSlow / BroadcastMul4DSlow / BroadcastPrelu4DSlow
MAX_ELEMENTS = 1 << 28  # per tensor: far beyond any microcontroller, and within int32 byte offsets


class Invalid(Exception):
    """A rule failed: ``field`` names what (an operand, option or output), ``message`` why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class Operand:
    """One input of an op. role: ``activation`` (computed, int8 when quantized), ``weights``
    (constant int8, symmetric, per-channel along ``axis``), ``bias`` (constant int32),
    ``operand`` (an int8 tensor computed or constant), ``float_or_int8`` (QUANTIZE's input)."""

    name: str
    role: str = "activation"
    optional: bool = False
    axis: int = 0  # weights: the per-channel quantized dimension TFLite uses


@dataclasses.dataclass(frozen=True)
class Option:
    """A static attribute. ``check(value)`` returns None or what is wrong; ``tflite`` is the
    accessor in the op's TFLite options table and ``codec`` how its value is encoded there."""

    name: str
    check: Callable[[Any], str | None]
    tflite: str | None = None
    codec: str = "int"  # int | bool | float | activation | padding | int_vector


@dataclasses.dataclass(frozen=True)
class OpSpec:
    kind: str
    operands: tuple[Operand, ...]
    shape: Callable[[Graph, Op], tuple[int, ...]]  # the output shape the inputs and options give
    params: Callable[[Graph, Op, str], dict]  # TFLite Micro's prepared integers (models.quantization)
    options: tuple[Option, ...] = ()
    traits: frozenset[str] = frozenset()
    runtimes: frozenset[str] = frozenset({"jax", "portable"})
    variadic: bool = False  # the single operand repeats (CONCATENATION)
    output: str = "int8"  # int8 | float32 (DEQUANTIZE)
    tflite_options: str | None = None  # TFLite options table, e.g. "Conv2DOptions"
    tflite_operand: str | None = None  # option written as TFLite's constant int32 second input
    # whether the op combines elements across its leading axis (then that axis is no batch axis)
    reads_across_batch: Callable[[Graph, Op], bool] = lambda graph, op: False

    def has(self, trait: str) -> bool:
        return trait in self.traits


# ----------------------------------------------------------------------------------------
# Option checks
# ----------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def positive_int(v) -> str | None:
    return None if _is_int(v) and 1 <= v <= 1 << 16 else f"{v!r} is not a positive integer"


def one_of(choices: tuple) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"{v!r} is not one of {choices}"


def boolean(v) -> str | None:
    return None if isinstance(v, bool | np.bool_) else f"{v!r} is not a boolean"


def finite_float(v) -> str | None:
    return None if isinstance(v, float | int | np.floating) and math.isfinite(float(v)) else f"{v!r} is not finite"


def int_tuple(v) -> str | None:
    ok = isinstance(v, tuple | list) and all(_is_int(x) for x in v)
    return None if ok else f"{v!r} is not a tuple of integers"


def pairs(v) -> str | None:
    ok = isinstance(v, tuple | list) and all(isinstance(p, tuple | list) and len(p) == 2 and all(_is_int(x) for x in p)
                                             for p in v)
    return None if ok else f"{v!r} is not a tuple of (before, after) pairs"


def any_value(v) -> str | None:
    return None


STRIDES = (Option("stride_h", positive_int, "StrideH"), Option("stride_w", positive_int, "StrideW"))
DILATIONS = (Option("dilation_h", positive_int, "DilationHFactor"),
             Option("dilation_w", positive_int, "DilationWFactor"))
PADDING = Option("padding", one_of(PADDINGS), "Padding", "padding")
ACTIVATION = Option("activation", one_of(ACTIVATIONS), "FusedActivationFunction", "activation")


# ----------------------------------------------------------------------------------------
# Shape rules
# ----------------------------------------------------------------------------------------


def _t(graph: Graph, op: Op, k: int) -> Tensor:
    return graph.tensors[op.inputs[k]]


def _rank(t: Tensor, ranks: tuple[int, ...], field: str) -> None:
    if len(t.shape) not in ranks:
        raise Invalid(field, f"tensor {t.name!r} has shape {t.shape}; expected rank {' or '.join(map(str, ranks))}")


def out_size(size: int, kernel: int, stride: int, dilation: int, padding: str, field: str) -> int:
    """TFLite ``ComputeOutSize``."""
    effective = (kernel - 1) * dilation + 1
    n = (size + stride - 1) // stride if padding == "SAME" else (size + stride - effective) // stride
    if n < 1:
        raise Invalid(field, f"a {kernel}-tap window (dilation {dilation}, {padding}) does not fit an input of {size}")
    return n


def _window_shape(graph: Graph, op: Op, kernel: tuple[int, int], channels: int) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    _rank(x, (4,), "input")
    o = op.options
    dh, dw = o.get("dilation_h", 1), o.get("dilation_w", 1)
    return (x.shape[0], out_size(x.shape[1], kernel[0], o["stride_h"], dh, o["padding"], "stride_h/padding"),
            out_size(x.shape[2], kernel[1], o["stride_w"], dw, o["padding"], "stride_w/padding"), channels)


def _bias(graph: Graph, op: Op, channels: int) -> None:
    if len(op.inputs) > 2 and op.inputs[2] is not None:
        b = _t(graph, op, 2)
        if b.shape != (channels,):
            raise Invalid("bias", f"tensor {b.name!r} has shape {b.shape}; expected ({channels},)")


def conv_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x, w = _t(graph, op, 0), _t(graph, op, 1)
    _rank(x, (4,), "input")
    _rank(w, (4,), "filter")
    if w.shape[3] != x.shape[3]:
        raise Invalid("filter", f"filter {w.shape} (OHWI) has {w.shape[3]} input channels but the input has {x.shape[3]}")
    _bias(graph, op, w.shape[0])
    return _window_shape(graph, op, w.shape[1:3], w.shape[0])


def depthwise_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x, w = _t(graph, op, 0), _t(graph, op, 1)
    _rank(x, (4,), "input")
    _rank(w, (4,), "filter")
    m = op.options["depth_multiplier"]
    if w.shape[0] != 1 or w.shape[3] != x.shape[3] * m:
        raise Invalid("depth_multiplier", f"filter {w.shape} must be (1, kh, kw, {x.shape[3]} input channels x depth "
                                          f"multiplier {m} = {x.shape[3] * m})")
    _bias(graph, op, w.shape[3])
    return _window_shape(graph, op, w.shape[1:3], w.shape[3])


def fully_connected_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x, w = _t(graph, op, 0), _t(graph, op, 1)
    _rank(w, (2,), "weights")
    if len(x.shape) < 1 or x.size % w.shape[1]:
        raise Invalid("input", f"input {x.shape} does not split into rows of {w.shape[1]} features")
    _bias(graph, op, w.shape[0])
    y = graph.tensors[op.outputs[0]]
    rows = x.size // w.shape[1]
    if op.options["keep_num_dims"]:
        if x.shape[-1] != w.shape[1]:
            raise Invalid("keep_num_dims", f"input {x.shape} must end in {w.shape[1]} features")
        return x.shape[:-1] + (w.shape[0],)
    # TFLite takes the rows as the batch: (rows, out) or the same elements under the output's rank
    if len(y.shape) >= 1 and y.shape[-1] == w.shape[0] and y.size == rows * w.shape[0]:
        return y.shape
    return (rows, w.shape[0])


def pool_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    _rank(x, (4,), "input")
    return _window_shape(graph, op, (op.options["filter_h"], op.options["filter_w"]), x.shape[3])


def broadcast_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    a, b = _t(graph, op, 0), _t(graph, op, 1)
    try:
        shape = tuple(int(d) for d in np.broadcast_shapes(a.shape, b.shape))
    except ValueError:
        raise Invalid("inputs", f"shapes {a.shape} and {b.shape} do not broadcast") from None
    if a.shape != b.shape and len(shape) > MAX_BROADCAST_RANK:
        raise Invalid("inputs", f"broadcasting {a.shape} with {b.shape} needs rank <= {MAX_BROADCAST_RANK} "
                                "(TFLite Micro's limit)")
    return shape


def same_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    return _t(graph, op, 0).shape


def mean_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    axes = op.options["axes"]
    if not axes or len(set(axes)) != len(axes) or not all(0 <= a < len(x.shape) for a in axes):
        raise Invalid("axes", f"{axes} are not distinct axes of the rank-{len(x.shape)} input")
    if op.options["keep_dims"]:
        return tuple(1 if d in axes else n for d, n in enumerate(x.shape))
    return tuple(n for d, n in enumerate(x.shape) if d not in axes)


def pad_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    pads = op.options["paddings"]
    if len(pads) != len(x.shape) or any(p < 0 for pair in pads for p in pair) or any(p > 1 << 16 for pair in pads
                                                                                     for p in pair):
        raise Invalid("paddings", f"{pads} are not {len(x.shape)} non-negative (before, after) pairs")
    return tuple(n + a + b for n, (a, b) in zip(x.shape, pads))


def reshape_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    new = tuple(op.options["new_shape"])
    if any(d < 1 for d in new) or int(np.prod(new, dtype=np.int64)) != x.size:
        raise Invalid("new_shape", f"{new} does not hold the {x.size} elements of the input {x.shape}")
    return new


def squeeze_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    dims = tuple(op.options["squeeze_dims"]) or tuple(d for d, n in enumerate(x.shape) if n == 1)
    if not all(0 <= d < len(x.shape) and x.shape[d] == 1 for d in dims):
        raise Invalid("squeeze_dims", f"{dims} are not size-1 axes of the input {x.shape}")
    return tuple(n for d, n in enumerate(x.shape) if d not in dims)


def expand_dims_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    axis = op.options["axis"]
    if not 0 <= axis <= len(x.shape):
        raise Invalid("axis", f"{axis} is not in 0..{len(x.shape)} for the input {x.shape}")
    return x.shape[:axis] + (1,) + x.shape[axis:]


def transpose_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    perm = tuple(op.options["perm"])
    if sorted(perm) != list(range(len(x.shape))):
        raise Invalid("perm", f"{perm} is not a permutation of the {len(x.shape)} axes of the input")
    return tuple(x.shape[p] for p in perm)


def concatenation_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    shapes = [graph.tensors[n].shape for n in op.inputs]
    axis = op.options["axis"]
    rank = len(shapes[0])
    if not 0 <= axis < rank:
        raise Invalid("axis", f"{axis} is not an axis of the rank-{rank} inputs")
    for k, s in enumerate(shapes):
        if len(s) != rank or any(s[d] != shapes[0][d] for d in range(rank) if d != axis):
            raise Invalid(f"input {k}", f"shape {s} does not match {shapes[0]} outside axis {axis}")
    if op.options["activation"] != "NONE":
        raise Invalid("activation", f"{op.options['activation']} (TFLite Micro runs CONCATENATION without one)")
    return shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]


def resize_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    x = _t(graph, op, 0)
    _rank(x, (4,), "input")
    size = tuple(op.options["size"])
    if len(size) != 2 or any(s < 1 for s in size):
        raise Invalid("size", f"{size} is not a (height, width) pair of positive sizes")
    if op.options["align_corners"] and op.options["half_pixel_centers"]:
        raise Invalid("half_pixel_centers", "cannot be set together with align_corners (TFLite refuses it)")
    return (x.shape[0], *size, x.shape[3])


def softmax_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    if not op.options["beta"] > 0:
        raise Invalid("beta", f"{op.options['beta']} must be positive")
    return same_shape(graph, op)


# ----------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------

X = (Operand("input"),)
CONV_OPERANDS = (Operand("input"), Operand("filter", "weights", axis=0), Operand("bias", "bias", optional=True))
STREAM = frozenset({ELEMENTWISE, PATCHABLE})
UNARY_TABLE = frozenset({ELEMENTWISE, TABLE, PATCHABLE})


def _specs() -> list[OpSpec]:
    return [
        OpSpec("CONV_2D", CONV_OPERANDS, conv_shape, qz.weighted_params,
               (*STRIDES, PADDING, *DILATIONS, ACTIVATION), frozenset({WEIGHTED, WINDOW, PATCHABLE}),
               frozenset(RUNTIMES), tflite_options="Conv2DOptions"),
        OpSpec("DEPTHWISE_CONV_2D", (Operand("input"), Operand("filter", "weights", axis=3),
                                     Operand("bias", "bias", optional=True)), depthwise_shape, qz.weighted_params,
               (*STRIDES, PADDING, *DILATIONS, Option("depth_multiplier", positive_int, "DepthMultiplier"), ACTIVATION),
               frozenset({WEIGHTED, WINDOW, PATCHABLE}), frozenset(RUNTIMES), tflite_options="DepthwiseConv2DOptions"),
        OpSpec("FULLY_CONNECTED", (Operand("input"), Operand("weights", "weights", axis=0),
                                   Operand("bias", "bias", optional=True)), fully_connected_shape, qz.weighted_params,
               (ACTIVATION, Option("keep_num_dims", boolean, "KeepNumDims", "bool")), frozenset({WEIGHTED}),
               frozenset(RUNTIMES), tflite_options="FullyConnectedOptions"),
        OpSpec("ADD", (Operand("input1", "operand"), Operand("input2", "operand")), broadcast_shape, qz.add_sub_params,
               (ACTIVATION,), STREAM, frozenset(RUNTIMES), tflite_options="AddOptions"),
        OpSpec("SUB", (Operand("input1", "operand"), Operand("input2", "operand")), broadcast_shape, qz.add_sub_params,
               (ACTIVATION,), STREAM, tflite_options="SubOptions"),
        OpSpec("MUL", (Operand("input1", "operand"), Operand("input2", "operand")), broadcast_shape, qz.mul_params,
               (ACTIVATION,), STREAM, frozenset(RUNTIMES), tflite_options="MulOptions"),
        OpSpec("PRELU", (Operand("input"), Operand("alpha", "operand")), broadcast_shape, qz.prelu_params,
               (), STREAM),
        OpSpec("AVERAGE_POOL_2D", X, pool_shape, qz.pool_params,
               (Option("filter_h", positive_int, "FilterHeight"), Option("filter_w", positive_int, "FilterWidth"),
                *STRIDES, PADDING, ACTIVATION), frozenset({WINDOW, PATCHABLE, SAME_QUANTIZATION}), frozenset(RUNTIMES),
               tflite_options="Pool2DOptions"),
        OpSpec("MAX_POOL_2D", X, pool_shape, qz.pool_params,
               (Option("filter_h", positive_int, "FilterHeight"), Option("filter_w", positive_int, "FilterWidth"),
                *STRIDES, PADDING, ACTIVATION), frozenset({WINDOW, PATCHABLE, SAME_QUANTIZATION}), frozenset(RUNTIMES),
               tflite_options="Pool2DOptions"),
        OpSpec("MEAN", X, mean_shape, qz.mean_params, (Option("axes", int_tuple), Option("keep_dims", boolean,
                                                                                           "KeepDims", "bool")),
               tflite_options="ReducerOptions", tflite_operand="axes",
               reads_across_batch=lambda graph, op: 0 in op.options["axes"]),
        OpSpec("PAD", X, pad_shape, qz.pad_params, (Option("paddings", pairs),),
               frozenset({PATCHABLE, SAME_QUANTIZATION}), tflite_options="PadOptions", tflite_operand="paddings",
               reads_across_batch=lambda graph, op: tuple(op.options["paddings"][0]) != (0, 0)),
        OpSpec("RESHAPE", X, reshape_shape, qz.no_params, (Option("new_shape", int_tuple),),
               frozenset({ALIAS, SAME_QUANTIZATION}), tflite_options="ReshapeOptions", tflite_operand="new_shape"),
        OpSpec("SQUEEZE", X, squeeze_shape, qz.no_params,
               (Option("squeeze_dims", int_tuple, "SqueezeDims", "int_vector"),), frozenset({ALIAS, SAME_QUANTIZATION}),
               tflite_options="SqueezeOptions"),
        OpSpec("EXPAND_DIMS", X, expand_dims_shape, qz.no_params, (Option("axis", lambda v: None if _is_int(v)
                                                                             else f"{v!r} is not an integer"),),
               frozenset({ALIAS, SAME_QUANTIZATION}), tflite_options="ExpandDimsOptions", tflite_operand="axis"),
        OpSpec("TRANSPOSE", X, transpose_shape, qz.no_params, (Option("perm", int_tuple),),
               frozenset({SAME_QUANTIZATION}), tflite_options="TransposeOptions", tflite_operand="perm",
               reads_across_batch=lambda graph, op: op.options["perm"][0] != 0),
        OpSpec("CONCATENATION", X, concatenation_shape, qz.concatenation_params,
               (Option("axis", lambda v: None if _is_int(v) else f"{v!r} is not an integer", "Axis"), ACTIVATION),
               variadic=True, tflite_options="ConcatenationOptions",
               reads_across_batch=lambda graph, op: op.options["axis"] == 0),
        OpSpec("RESIZE_NEAREST_NEIGHBOR", X, resize_shape, qz.resize_params,
               (Option("size", int_tuple), Option("align_corners", boolean, "AlignCorners", "bool"),
                Option("half_pixel_centers", boolean, "HalfPixelCenters", "bool")), frozenset({SAME_QUANTIZATION}),
               tflite_options="ResizeNearestNeighborOptions", tflite_operand="size"),
        OpSpec("SOFTMAX", X, softmax_shape, qz.softmax_params, (Option("beta", finite_float, "Beta", "float"),),
               runtimes=frozenset(RUNTIMES), tflite_options="SoftmaxOptions",
               reads_across_batch=lambda graph, op: len(graph.tensors[op.inputs[0]].shape) < 2),
        OpSpec("QUANTIZE", (Operand("input", "float_or_int8"),), same_shape, qz.quantize_params, (), STREAM,
               tflite_options="QuantizeOptions"),
        OpSpec("DEQUANTIZE", X, same_shape, qz.dequantize_params, (), frozenset({ELEMENTWISE}), output="float32",
               tflite_options="DequantizeOptions"),
        OpSpec("HARD_SWISH", X, same_shape, qz.hard_swish_params, (), UNARY_TABLE, tflite_options="HardSwishOptions"),
        OpSpec("LOGISTIC", X, same_shape, qz.logistic_params, (), UNARY_TABLE),
        OpSpec("TANH", X, same_shape, qz.tanh_params, (), UNARY_TABLE),
        OpSpec("RELU", X, same_shape, qz.relu_params, (), UNARY_TABLE),
        OpSpec("RELU6", X, same_shape, qz.relu6_params, (), UNARY_TABLE | {SAME_QUANTIZATION}),
        OpSpec("LEAKY_RELU", X, same_shape, qz.leaky_relu_params, (Option("alpha", finite_float, "Alpha", "float"),),
               UNARY_TABLE, tflite_options="LeakyReluOptions"),
    ]


SCHEMA: dict[str, OpSpec] = {s.kind: s for s in _specs()}


def spec(kind: str) -> OpSpec:
    try:
        return SCHEMA[kind]
    except KeyError:
        raise ValueError(f"unknown op kind {kind!r}; the IR supports {sorted(SCHEMA)}") from None


def has(kind: str, trait: str) -> bool:
    """``trait`` of a kind; False for kinds outside the schema (e.g. the planner's folded segments)."""
    s = SCHEMA.get(kind)
    return s is not None and trait in s.traits


def kinds_with(trait: str) -> tuple[str, ...]:
    return tuple(k for k, s in SCHEMA.items() if trait in s.traits)


# ----------------------------------------------------------------------------------------
# Applying an entry
# ----------------------------------------------------------------------------------------


def _activation_tensor(t: Tensor, field: str) -> None:
    if t.dtype == "int16":
        raise Invalid(field, f"tensor {t.name!r} is int16: 16x8 quantization (int16 activations) is not supported; "
                             "convert the model with int8 activations")
    if t.dtype != "int8":
        raise Invalid(field, f"tensor {t.name!r} is {t.dtype}; quantized ops take int8 activations")
    _per_tensor(t, field)


def _per_tensor(t: Tensor, field: str) -> None:
    q = t.quantization
    if q is None:
        raise Invalid(field, f"int8 tensor {t.name!r} has no quantization parameters")
    if q.per_channel:
        raise Invalid(field, f"tensor {t.name!r} has {q.scale.size} scales; activations are quantized per tensor")
    _scales(t, field)
    if not -128 <= int(q.zero_point[0]) <= 127:
        raise Invalid(field, f"tensor {t.name!r} has zero point {int(q.zero_point[0])} outside int8")


def _scales(t: Tensor, field: str) -> None:
    s = t.quantization.scale.astype(np.float64)
    if not np.all(np.isfinite(s)) or not np.all(s > 0) or not np.all(s < 2.0**64):
        raise Invalid(field, f"tensor {t.name!r} has scale {s[:4].tolist()}; scales must be finite and positive")


def _check_dtypes(graph: Graph, op: Op, s: OpSpec) -> bool:
    """The dtype and quantization rule; returns whether the op is quantized (else all float32)."""
    y = graph.tensors[op.outputs[0]]
    names = [(f"input {k}" if s.variadic else s.operands[k].name, n, s.operands[0 if s.variadic else k])
             for k, n in enumerate(op.inputs) if n is not None]
    if y.dtype == "float32" and s.output != "float32":
        for field, n, _ in names:
            t = graph.tensors[n]
            if t.dtype != "float32" or t.quantization is not None:
                raise Invalid(field, f"tensor {n!r} is {t.dtype}{' (quantized)' if t.quantization else ''} but the "
                                     "output is float32; an op is either all float32 or quantized")
        return False
    if s.output == "float32":
        if all(graph.tensors[n].dtype == "float32" and graph.tensors[n].quantization is None for _, n, _ in names):
            return False  # a float cast in a float graph (execute.dequantized_graph)
        if y.dtype != "float32":
            raise Invalid("output", f"tensor {y.name!r} is {y.dtype}; DEQUANTIZE writes float32")
    else:
        _activation_tensor(y, "output")
    for field, n, operand in names:
        t = graph.tensors[n]
        if operand.role in ("activation", "operand"):
            _activation_tensor(t, field)
        elif operand.role == "float_or_int8":
            if t.dtype == "float32":
                continue
            _activation_tensor(t, field)
        elif operand.role == "weights":
            if t.dtype != "int8":
                hint = " (int8 weights with int16 activations)" if t.dtype == "int16" else ""
                raise Invalid(field, f"tensor {n!r} is {t.dtype}{hint}; quantized ops take int8 weights")
            if t.quantization is None:
                raise Invalid(field, f"tensor {n!r} has no quantization parameters")
            _scales(t, field)
            if np.any(t.quantization.zero_point != 0):
                raise Invalid(field, f"tensor {n!r} has non-zero zero points; int8 weights are symmetric (zero point 0)")
            if t.quantization.per_channel and t.quantization.quantized_dimension != operand.axis:
                raise Invalid(field, f"tensor {n!r} is quantized per channel along axis "
                                     f"{t.quantization.quantized_dimension}; TFLite uses axis {operand.axis}")
        elif operand.role == "bias" and t.dtype != "int32":
            raise Invalid(field, f"tensor {n!r} is {t.dtype}; int8 ops take an int32 bias")
    return True


def check_op(graph: Graph, index: int, op: Op) -> bool:
    """Apply the op's schema entry (operands, options, shape, dtypes, quantization); returns
    whether the op is quantized. Raises ``ValueError("op INDEX (KIND 'name'): FIELD: why")``."""
    where = f"op {index} ({op.kind} {op.name!r})"
    if op.kind not in SCHEMA:
        raise ValueError(f"{where}: unknown op kind; the IR supports {sorted(SCHEMA)}")
    s = SCHEMA[op.kind]
    try:
        n_required = sum(not o.optional for o in s.operands)
        hi = 64 if s.variadic else len(s.operands)
        if not n_required <= len(op.inputs) <= hi:
            raise Invalid("inputs", f"{len(op.inputs)} inputs, expected {n_required}..{hi}")
        if len(op.outputs) != 1:
            raise Invalid("outputs", f"{len(op.outputs)} outputs, expected 1")
        for k, name in enumerate(op.inputs):
            operand = s.operands[0 if s.variadic else k]
            field = f"input {k}" if s.variadic else operand.name
            if name is None:
                if not operand.optional:
                    raise Invalid(field, "is missing")
                continue
            t = graph.tensors[name]
            if operand.role in ("weights", "bias") and not t.is_constant:
                raise Invalid(field, f"tensor {name!r} must be a constant")
            if operand.role in ("activation", "float_or_int8") and t.is_constant:
                raise Invalid(field, f"tensor {name!r} is a constant; this input must be computed")
        for option in s.options:
            if option.name not in op.options:
                raise Invalid(option.name, "option is missing")
            problem = option.check(op.options[option.name])
            if problem:
                raise Invalid(option.name, problem)
        expected = tuple(int(d) for d in s.shape(graph, op))
        y = graph.tensors[op.outputs[0]]
        if y.shape != expected:
            raise Invalid("output", f"tensor {y.name!r} has shape {y.shape} but the inputs and options give {expected}")
        quantized = _check_dtypes(graph, op, s)
        if quantized:
            try:
                s.params(graph, op, where)
            except ValueError as e:
                message = str(e).removeprefix(f"{where}: ")
                raise Invalid("quantization", message) from None
        return quantized
    except Invalid as e:
        raise ValueError(f"{where}: {e.field}: {e.message}") from None


def check_tensor(t: Tensor) -> None:
    """Rank and size limits every runtime shares; raises ``ValueError`` naming the tensor."""
    if len(t.shape) > MAX_RANK:
        raise ValueError(f"tensor {t.name!r} has rank {len(t.shape)}; at most {MAX_RANK} dimensions are supported")
    if any(d < 1 for d in t.shape):
        raise ValueError(f"tensor {t.name!r} has shape {t.shape}; every dimension must be at least 1")
    if t.size > MAX_ELEMENTS:
        raise ValueError(f"tensor {t.name!r} has {t.size} elements; more than the {MAX_ELEMENTS} supported")
    if not t.is_constant and not t.shape:
        raise ValueError(f"tensor {t.name!r} is a rank-0 activation; activations need a leading (batch) dimension")


def require_quantized(graph: Graph) -> None:
    """What the int8 runtimes (the JAX executor and the C export) both need beyond validation:
    every op quantized, the graph inputs all int8 or all float32, and so the outputs."""
    for i, op in enumerate(graph.ops):
        if not check_op(graph, i, op) and op.kind not in ("QUANTIZE", "DEQUANTIZE"):
            raise ValueError(f"op {i} ({op.kind} {op.name!r}): float32 op; the int8 runtimes run quantized graphs "
                             "(quantize it with models.ptq)")
    for side, names in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        kinds = {graph.tensors[n].dtype for n in names}
        if len(kinds) != 1 or not kinds <= {"int8", "float32"}:
            raise ValueError(f"graph {side} must all be int8 or all float32, got {sorted(kinds)}")
