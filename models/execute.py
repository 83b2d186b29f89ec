"""Run a quantized graph in JAX: every op through the int8 kernels, the whole graph one jit.

``compile_graph(graph)`` returns a function of batched inputs (leading dimension = batch, any
size) that returns the graph outputs; ``intermediates=True`` also returns every activation, for
the per-layer diff against TFLite Micro (``models.diff``). Results are bit-exact with TFLite
Micro's reference kernels.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels import int8, quant
from models.ir import Graph, Op
from models.quantization import op_params

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _conv_like_kwargs(graph: Graph, op: Op, params: dict) -> dict:
    o = op.options
    y = graph.tensors[op.outputs[0]]
    return {
        "stride": (o["stride_h"], o["stride_w"]), "dilation": (o["dilation_h"], o["dilation_w"]),
        "padding": params["padding"], "out_hw": y.shape[1:3], "input_offset": params["input_offset"],
        "output_offset": params["output_offset"], "multiplier": params["output_multiplier"],
        "shift": params["output_shift"], "act_min": params["act_min"], "act_max": params["act_max"],
    }


def _bias(graph: Graph, op: Op):
    if len(op.inputs) < 3 or op.inputs[2] is None:
        return None
    return graph.tensors[op.inputs[2]].data


def _op_function(graph: Graph, op: Op, pallas: bool) -> Callable:
    """A jnp function of the op's non-constant inputs (batched) -> its output."""
    t = graph.tensors
    p = op_params(graph, op)
    kind = op.kind
    y = t[op.outputs[0]]
    batched_out = y.shape[1:]
    if kind == "CONV_2D":
        w, kw = t[op.inputs[1]].data, _conv_like_kwargs(graph, op, p)
        return lambda x: int8.conv2d(x, w, _bias(graph, op), pallas=pallas, **kw)
    if kind == "DEPTHWISE_CONV_2D":
        w, kw = t[op.inputs[1]].data, _conv_like_kwargs(graph, op, p)
        fn = int8.depthwise_conv2d if pallas else int8.depthwise_conv2d_reference
        return lambda x: fn(x, w, _bias(graph, op), depth_multiplier=op.options["depth_multiplier"], **kw)
    if kind == "FULLY_CONNECTED":
        w = t[op.inputs[1]].data
        kw = {"input_offset": p["input_offset"], "output_offset": p["output_offset"],
              "multiplier": p["output_multiplier"], "shift": p["output_shift"], "act_min": p["act_min"],
              "act_max": p["act_max"]}
        return lambda x: int8.fully_connected(x, w, _bias(graph, op), pallas=pallas, **kw).reshape(
            (x.shape[0],) + batched_out)
    if kind == "ADD":
        return lambda a, b: int8.add(a, b, **p)
    if kind == "MUL":
        return lambda a, b: int8.mul(a, b, **p)
    if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        o = op.options
        fn = int8.average_pool if kind == "AVERAGE_POOL_2D" else int8.max_pool
        return lambda x: fn(x, filter_hw=(o["filter_h"], o["filter_w"]), stride=(o["stride_h"], o["stride_w"]),
                            padding=p["padding"], out_hw=y.shape[1:3], act_min=p["act_min"], act_max=p["act_max"])
    if kind == "MEAN":
        if 0 in op.options["axes"]:
            raise ValueError(f"op MEAN {op.name!r}: reducing over the batch axis is not supported")
        return lambda x: int8.mean(x, axes=op.options["axes"], keep_dims=op.options["keep_dims"], **p)
    if kind == "SOFTMAX":
        if op.options["beta"] <= 0:
            raise ValueError(f"op SOFTMAX {op.name!r}: beta must be positive")
        return lambda x: int8.softmax(x, **p)
    if kind == "QUANTIZE":
        return lambda x: quant.affine_quantize(x, p["scale"], p["zero_point"], y.dtype)
    if kind == "DEQUANTIZE":
        return lambda x: quant.dequantize(x, p["scale"], p["zero_point"])
    if kind == "PAD":
        pads = op.options["paddings"]
        if pads[0] != (0, 0):
            raise ValueError(f"op PAD {op.name!r}: padding the batch axis is not supported")
        return lambda x: jnp.pad(x, pads, constant_values=p["pad_value"])
    if kind == "RESHAPE":
        return lambda x: x.reshape((x.shape[0],) + tuple(op.options["new_shape"][1:]))
    if kind == "TRANSPOSE":
        perm = op.options["perm"]
        if perm[0] != 0:
            raise ValueError(f"op TRANSPOSE {op.name!r}: moving the batch axis (perm {perm}) is not supported")
        return lambda x: jnp.transpose(x, perm)
    if kind == "CONCATENATION":
        axis = op.options["axis"]
        if op.options["activation"] != "NONE":
            raise ValueError(f"op CONCATENATION {op.name!r}: fused activation {op.options['activation']} not supported")
        return lambda *xs: jnp.concatenate(xs, axis=axis)
    if kind == "RESIZE_NEAREST_NEIGHBOR":
        rows, cols = jnp.asarray(p["rows"]), jnp.asarray(p["cols"])
        return lambda x: x[:, rows][:, :, cols]
    raise ValueError(f"op {kind} {op.name!r}: no int8 execution for this op kind")


def compile_graph(graph: Graph, *, pallas: bool = True, intermediates: bool = False) -> Callable:
    """A jitted ``f(*inputs) -> list of outputs`` (plus ``{tensor name: value}`` if ``intermediates``).

    Inputs are batched versions of the graph inputs: shape ``(B,) + shape[1:]``, same dtype.
    ``pallas=False`` runs conv/FC/depthwise through XLA's integer dot instead of the Pallas
    kernels (same integer math; used to cross-check the kernels and as the benchmark baseline).
    """
    graph.validate()
    for name, t in graph.tensors.items():
        if not t.is_constant and (not t.shape or t.shape[0] != 1):
            raise ValueError(
                f"tensor {name!r} has shape {t.shape}; the executor batches along a leading dimension of size 1"
            )
    fns = [_op_function(graph, op, pallas) for op in graph.ops]
    constants = {n: jnp.asarray(t.data) for n, t in graph.tensors.items()
                 if t.is_constant and any(n in op.inputs for op in graph.ops if op.kind not in _WEIGHTED)}

    def run(*inputs):
        if len(inputs) != len(graph.inputs):
            raise ValueError(f"graph {graph.name!r} takes {len(graph.inputs)} inputs, got {len(inputs)}")
        env = dict(constants)
        for name, x in zip(graph.inputs, inputs):
            t = graph.tensors[name]
            if tuple(x.shape[1:]) != t.shape[1:] or jnp.dtype(x.dtype) != jnp.dtype(t.dtype):
                raise ValueError(
                    f"input {name!r} must be {t.dtype}(B, {', '.join(map(str, t.shape[1:]))}), got {x.dtype}{tuple(x.shape)}"
                )
            env[name] = x
        for op, fn in zip(graph.ops, fns):
            # conv/depthwise/FC own their weights and bias (prepared in numpy); other ops get all inputs.
            names = op.inputs[:1] if op.kind in _WEIGHTED else [n for n in op.inputs if n is not None]
            args = [env[n] for n in names]
            env[op.outputs[0]] = fn(*args)
        outs = [env[n] for n in graph.outputs]
        return (outs, env) if intermediates else outs

    return jax.jit(run)


def run(graph: Graph, *inputs, pallas: bool = True) -> list[np.ndarray]:
    """Convenience: compile and run once on numpy inputs; returns numpy outputs."""
    outs = compile_graph(graph, pallas=pallas)(*(jnp.asarray(x) for x in inputs))
    return [np.asarray(o) for o in outs]


# ----------------------------------------------------------------------------------------
# Float execution of the same IR (float32 tensors, float weights), through XLA.
# ----------------------------------------------------------------------------------------

_FLOAT_ACTIVATIONS = {
    "NONE": lambda x: x,
    "RELU": lambda x: jnp.maximum(x, 0.0),
    "RELU6": lambda x: jnp.clip(x, 0.0, 6.0),
    "RELU_N1_TO_1": lambda x: jnp.clip(x, -1.0, 1.0),
}


def _float_op(graph: Graph, op: Op, params: dict, args: list):
    """One op in float32: ``params`` holds the (possibly trained) constants by tensor name."""
    from jax import lax

    from models.quantization import conv_padding, nearest_neighbor_index

    o = op.options
    t = graph.tensors
    y = t[op.outputs[0]]
    act = _FLOAT_ACTIVATIONS.get(o.get("activation", "NONE"))
    kind = op.kind
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        x = args[0]
        w = params[op.inputs[1]]
        pad = conv_padding(op, t[op.inputs[0]].shape[1:3], t[op.inputs[1]].shape[1:3], y.shape[1:3])
        if kind == "CONV_2D":
            rhs, groups = jnp.transpose(w, (1, 2, 3, 0)), 1
        else:
            rhs, groups = jnp.transpose(w, (1, 2, 0, 3)), x.shape[-1]
        out = lax.conv_general_dilated(
            x, rhs, (o["stride_h"], o["stride_w"]), pad, rhs_dilation=(o["dilation_h"], o["dilation_w"]),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
            precision=lax.Precision.HIGHEST)
        if len(op.inputs) > 2 and op.inputs[2] is not None:
            out = out + params[op.inputs[2]]
        return act(out)
    if kind == "FULLY_CONNECTED":
        w = params[op.inputs[1]]
        out = jnp.dot(args[0].reshape(-1, w.shape[1]), w.T, precision=lax.Precision.HIGHEST)
        if len(op.inputs) > 2 and op.inputs[2] is not None:
            out = out + params[op.inputs[2]]
        return act(out).reshape((args[0].shape[0],) + y.shape[1:])
    if kind == "ADD":
        return act(args[0] + args[1])
    if kind == "MUL":
        return act(args[0] * args[1])
    if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        x = args[0]
        filt = (o["filter_h"], o["filter_w"])
        pad = conv_padding(op, x.shape[1:3], filt, y.shape[1:3])
        window, strides = (1, *filt, 1), (1, o["stride_h"], o["stride_w"], 1)
        full_pad = ((0, 0), *pad, (0, 0))
        if kind == "MAX_POOL_2D":
            return act(lax.reduce_window(x, -jnp.inf, lax.max, window, strides, full_pad))
        total = lax.reduce_window(x, 0.0, lax.add, window, strides, full_pad)
        count = lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, lax.add, window, strides, full_pad)
        return act(total / count)
    if kind == "MEAN":
        return jnp.mean(args[0], axis=o["axes"], keepdims=o["keep_dims"])
    if kind == "SOFTMAX":
        return jax.nn.softmax(args[0] * o["beta"], axis=-1)
    if kind in ("QUANTIZE", "DEQUANTIZE"):
        return args[0].astype(jnp.float32)
    if kind == "PAD":
        return jnp.pad(args[0], o["paddings"])
    if kind == "RESHAPE":
        return args[0].reshape((args[0].shape[0],) + tuple(o["new_shape"][1:]))
    if kind == "TRANSPOSE":
        return jnp.transpose(args[0], o["perm"])
    if kind == "CONCATENATION":
        return act(jnp.concatenate(args, axis=o["axis"]))
    if kind == "RESIZE_NEAREST_NEIGHBOR":
        x = args[0]
        rows = nearest_neighbor_index(x.shape[1], y.shape[1], o["align_corners"], o["half_pixel_centers"])
        cols = nearest_neighbor_index(x.shape[2], y.shape[2], o["align_corners"], o["half_pixel_centers"])
        return x[:, rows][:, :, cols]
    raise ValueError(f"op {kind} {op.name!r}: no float execution for this op kind")


def float_params(graph: Graph) -> dict:
    """The graph's float constants (weights, biases) by tensor name, as jnp arrays (trainable)."""
    return {n: jnp.asarray(t.data) for n, t in graph.tensors.items()
            if t.is_constant and t.dtype == "float32"}


def float_forward(graph: Graph, params: dict, *inputs, intermediates: bool = False):
    """Run a float graph (differentiable in ``params``); outputs list (and all activations)."""
    env = dict(params)
    for name, x in zip(graph.inputs, inputs):
        env[name] = jnp.asarray(x, jnp.float32)
    for op in graph.ops:
        names = op.inputs[:1] if op.kind in _WEIGHTED else [n for n in op.inputs if n is not None]
        env[op.outputs[0]] = _float_op(graph, op, params, [env[n] for n in names])
    outs = [env[n] for n in graph.outputs]
    return (outs, env) if intermediates else outs


def compile_float_graph(graph: Graph) -> Callable:
    """A jitted float ``f(*inputs) -> outputs`` with the graph's own constants."""
    params = float_params(graph)
    return jax.jit(lambda *xs: float_forward(graph, params, *xs))


def dequantized_graph(graph: Graph) -> Graph:
    """The float counterpart of a quantized graph: constants dequantized, activations float32,
    QUANTIZE/DEQUANTIZE kept as casts. Same ops, same names: the float baseline of a benchmark."""
    import copy

    tensors = {}
    for name, t in graph.tensors.items():
        t2 = copy.copy(t)
        t2.dtype, t2.quantization = "float32", None
        if t.is_constant and t.quantization is not None:
            q = t.quantization
            shape = [1] * len(t.shape)
            if q.per_channel:
                shape[q.quantized_dimension] = q.scale.size
            scale = q.scale.reshape(shape) if q.per_channel else q.scale[0]
            zp = q.zero_point.reshape(shape) if q.per_channel else q.zero_point[0]
            t2.data = (scale * (t.data.astype(np.float64) - zp)).astype(np.float32)
        elif t.is_constant:
            t2.data = t.data.astype(np.float32)
        tensors[name] = t2
    return Graph(tensors, [copy.deepcopy(op) for op in graph.ops], list(graph.inputs), list(graph.outputs),
                 name=graph.name + "_float", metadata=dict(graph.metadata))
