"""Run a quantized graph in JAX: every op through the int8 kernels, the whole graph one jit.

``compile_graph(graph)`` returns a function of batched inputs that returns the graph outputs;
``intermediates=True`` also returns every activation, for the per-layer diff against TFLite
Micro (``models.diff``). Results are bit-exact with TFLite Micro's reference kernels. Which
tensors an op owns (its weights) comes from the op schema (``models.schema``); the JAX function
of each kind is one entry of ``INT8_OPS``.

Batches: an input is ``(B,) + shape[1:]`` for a graph input of shape ``shape``. When every
tensor has the graph's leading dimension ``n`` and no op reads across it (the usual case: batch
1 models, and batch-n models whose ops treat rows independently) the leading axis is a batch
axis and ``B`` may be any size. Otherwise ``B`` must be a multiple of ``n`` and the graph runs
``B / n`` times on its own shapes (``lax.map``); either way the result equals running the batch
elements one graph invocation at a time.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels import int8, quant
from models import schema
from models.ir import Graph, Op
from models.quantization import op_params


def _bias(graph: Graph, op: Op):
    if len(op.inputs) < 3 or op.inputs[2] is None:
        return None
    return graph.tensors[op.inputs[2]].data


def _conv_kwargs(graph: Graph, op: Op, p: dict) -> dict:
    o = op.options
    return {
        "stride": (o["stride_h"], o["stride_w"]), "dilation": (o["dilation_h"], o["dilation_w"]),
        "padding": p["padding"], "out_hw": graph.tensors[op.outputs[0]].shape[1:3], "input_offset": p["input_offset"],
        "output_offset": p["output_offset"], "multiplier": p["output_multiplier"], "shift": p["output_shift"],
        "act_min": p["act_min"], "act_max": p["act_max"],
    }


def _conv(graph, op, p, pallas):
    w, kw = graph.tensors[op.inputs[1]].data, _conv_kwargs(graph, op, p)
    return lambda x: int8.conv2d(x, w, _bias(graph, op), pallas=pallas, **kw)


def _depthwise(graph, op, p, pallas):
    w, kw = graph.tensors[op.inputs[1]].data, _conv_kwargs(graph, op, p)
    fn = int8.depthwise_conv2d if pallas else int8.depthwise_conv2d_reference
    return lambda x: fn(x, w, _bias(graph, op), depth_multiplier=op.options["depth_multiplier"], **kw)


def _fully_connected(graph, op, p, pallas):
    w = graph.tensors[op.inputs[1]].data
    kw = {"input_offset": p["input_offset"], "output_offset": p["output_offset"], "multiplier": p["output_multiplier"],
          "shift": p["output_shift"], "act_min": p["act_min"], "act_max": p["act_max"]}
    return lambda x: int8.fully_connected(x, w, _bias(graph, op), pallas=pallas, **kw)


def _pool(graph, op, p, pallas):
    o = op.options
    fn = int8.average_pool if op.kind == "AVERAGE_POOL_2D" else int8.max_pool
    out_hw = graph.tensors[op.outputs[0]].shape[1:3]
    return lambda x: fn(x, filter_hw=(o["filter_h"], o["filter_w"]), stride=(o["stride_h"], o["stride_w"]),
                        padding=p["padding"], out_hw=out_hw, act_min=p["act_min"], act_max=p["act_max"])


def _quantize(graph, op, p, pallas):
    if "table" in p:  # int8 -> int8 requantization
        return _table(graph, op, p, pallas)
    return lambda x: quant.affine_quantize(x, p["scale"], p["zero_point"], "int8")


def _table(graph, op, p, pallas):
    return lambda x: int8.lookup(x, p["table"])


def _binary(fn):
    return lambda graph, op, p, pallas: lambda a, b: fn(a, b, **p)


def _concatenation(graph, op, p, pallas):
    return lambda *xs: jnp.concatenate(xs, axis=op.options["axis"])


def _resize(graph, op, p, pallas):
    rows, cols = jnp.asarray(p["rows"]), jnp.asarray(p["cols"])
    return lambda x: x[:, rows][:, :, cols]


# The JAX function of each quantized op kind: (graph, op, prepared params, pallas) -> a function
# of the op's computed inputs (batched along the leading axis) returning its output.
INT8_OPS: dict[str, Callable] = {
    "CONV_2D": _conv,
    "DEPTHWISE_CONV_2D": _depthwise,
    "FULLY_CONNECTED": _fully_connected,
    "ADD": _binary(quant.add_int8),
    "SUB": _binary(quant.sub_int8),
    "MUL": _binary(quant.mul_int8),
    "PRELU": _binary(quant.prelu_int8),
    "AVERAGE_POOL_2D": _pool,
    "MAX_POOL_2D": _pool,
    "MEAN": lambda graph, op, p, pallas: lambda x: int8.mean(x, axes=op.options["axes"],
                                                            keep_dims=op.options["keep_dims"], **p),
    "SOFTMAX": lambda graph, op, p, pallas: lambda x: int8.softmax(x, **p),
    "QUANTIZE": _quantize,
    "DEQUANTIZE": lambda graph, op, p, pallas: lambda x: quant.dequantize(x, p["scale"], p["zero_point"]),
    "PAD": lambda graph, op, p, pallas: lambda x: jnp.pad(x, op.options["paddings"], constant_values=p["pad_value"]),
    "RESHAPE": lambda graph, op, p, pallas: lambda x: x,
    "SQUEEZE": lambda graph, op, p, pallas: lambda x: x,
    "EXPAND_DIMS": lambda graph, op, p, pallas: lambda x: x,
    "TRANSPOSE": lambda graph, op, p, pallas: lambda x: jnp.transpose(x, op.options["perm"]),
    "CONCATENATION": _concatenation,
    "RESIZE_NEAREST_NEIGHBOR": _resize,
    "HARD_SWISH": _table,
    "LOGISTIC": _table,
    "TANH": _table,
    "RELU": _table,
    "RELU6": _table,
    "LEAKY_RELU": _table,
}


def computed_inputs(op: Op) -> list[str]:
    """The inputs a runtime passes to an op's function: all but a weighted op's own constants."""
    if schema.has(op.kind, schema.WEIGHTED):
        return op.inputs[:1]
    return [n for n in op.inputs if n is not None]


def _batch_axis(graph: Graph) -> bool:
    """Whether the leading axis is a batch axis: every computed tensor has the graph's leading
    size ``n``, constants broadcast over it, and no op reads across it."""
    if not graph.inputs:
        return False
    n = graph.tensors[graph.inputs[0]].shape[0]
    for op in graph.ops:
        y = graph.tensors[op.outputs[0]]
        names = [*computed_inputs(op), op.outputs[0]]
        if any(graph.tensors[m].is_constant and len(graph.tensors[m].shape) == len(y.shape) and
               graph.tensors[m].shape[0] != 1 for m in names):
            return False  # a constant with its own leading axis: tiling it would change the op
        if any(not graph.tensors[m].is_constant and graph.tensors[m].shape[0] != n for m in names):
            return False  # a reshape or FULLY_CONNECTED that moves rows across the leading axis
        if schema.spec(op.kind).reads_across_batch(graph, op):
            return False
    return all(graph.tensors[m].shape[0] == n for m in graph.inputs + graph.outputs)


def compile_graph(graph: Graph, *, pallas: bool = True, intermediates: bool = False) -> Callable:
    """A jitted ``f(*inputs) -> list of outputs`` (plus ``{tensor name: value}`` if ``intermediates``).

    Inputs are batched versions of the graph inputs: ``(B,) + shape[1:]``, same dtype (see the
    module docstring for which ``B``). ``pallas=False`` runs conv/FC/depthwise through XLA's
    integer dot instead of the Pallas kernels (same integer math; used to cross-check the
    kernels and as the benchmark baseline). Graphs are refused as ``models.schema`` says:
    what the C export refuses, this refuses too.
    """
    graph.validate()
    schema.require_quantized(graph)
    fns = [INT8_OPS[op.kind](graph, op, op_params(graph, op), pallas) for op in graph.ops]
    constants = {n: jnp.asarray(t.data) for n, t in graph.tensors.items()
                 if t.is_constant and any(n in computed_inputs(op) for op in graph.ops)}
    batch_axis = _batch_axis(graph)

    def invoke(*inputs):
        env = dict(constants)
        env.update(zip(graph.inputs, inputs))
        lead = inputs[0].shape[0] if batch_axis else None  # every computed tensor's leading size
        for op, fn in zip(graph.ops, fns):
            y = graph.tensors[op.outputs[0]]
            out = fn(*(env[m] for m in computed_inputs(op)))
            env[op.outputs[0]] = out.reshape((lead or y.shape[0],) + y.shape[1:])
        return env

    def run(*inputs):
        if len(inputs) != len(graph.inputs):
            raise ValueError(f"graph {graph.name!r} takes {len(graph.inputs)} inputs, got {len(inputs)}")
        counts = set()
        for name, x in zip(graph.inputs, inputs):
            t = graph.tensors[name]
            if tuple(x.shape[1:]) != t.shape[1:] or jnp.dtype(x.dtype) != jnp.dtype(t.dtype) or x.ndim != len(t.shape):
                raise ValueError(
                    f"input {name!r} must be {t.dtype}(B, {', '.join(map(str, t.shape[1:]))}), got {x.dtype}{tuple(x.shape)}"
                )
            if not batch_axis and x.shape[0] % t.shape[0]:
                raise ValueError(f"graph {graph.name!r} reads across the leading axis of input {name!r} (size "
                                 f"{t.shape[0]}); its batch ({x.shape[0]}) must be a multiple of {t.shape[0]}")
            counts.add(x.shape[0] if batch_axis else x.shape[0] // t.shape[0])
        if len(counts) > 1:
            raise ValueError(f"graph {graph.name!r}: the inputs hold different numbers of graph invocations")
        if batch_axis:
            env = invoke(*inputs)
        else:
            count = counts.pop()
            names = [m for m in graph.tensors if not graph.tensors[m].is_constant and
                     (m in graph.inputs or any(m in op.outputs for op in graph.ops))]
            split = [x.reshape((count,) + graph.tensors[m].shape) for m, x in zip(graph.inputs, inputs)]
            stacked = jax.lax.map(lambda xs: {m: v for m, v in invoke(*xs).items() if m in names}, split)
            env = {m: v.reshape((-1,) + v.shape[2:]) for m, v in stacked.items()}
        outs = [env[m] for m in graph.outputs]
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


_FLOAT_UNARY = {
    "HARD_SWISH": lambda x, o: x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "LOGISTIC": lambda x, o: jax.nn.sigmoid(x),
    "TANH": lambda x, o: jnp.tanh(x),
    "RELU": lambda x, o: jnp.maximum(x, 0.0),
    "RELU6": lambda x, o: jnp.clip(x, 0.0, 6.0),
    "LEAKY_RELU": lambda x, o: jnp.where(x >= 0, x, x * o["alpha"]),
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
    if kind == "SUB":
        return act(args[0] - args[1])
    if kind == "MUL":
        return act(args[0] * args[1])
    if kind == "PRELU":
        return jnp.where(args[0] >= 0, args[0], args[0] * args[1])
    if kind in _FLOAT_UNARY:
        return _FLOAT_UNARY[kind](args[0], o)
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
    if schema.has(kind, schema.ALIAS):
        return args[0].reshape((args[0].shape[0],) + y.shape[1:])
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
    constants = {n: jnp.asarray(t.data) for n, t in graph.tensors.items() if t.is_constant}
    for op in graph.ops:
        args = [env[n] if n in env else constants[n] for n in computed_inputs(op)]
        env[op.outputs[0]] = _float_op(graph, op, params, args)
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
                 name=graph.name + "_float", metadata=dict(graph.metadata)).validate()
