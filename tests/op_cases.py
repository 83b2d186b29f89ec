"""Single-op int8 graphs, one or more per op kind of the schema, with random quantization: the
shared cases every runtime (JAX, portable C, CMSIS-NN C) is checked on against TFLite Micro."""
from __future__ import annotations

import numpy as np

from models.ir import Graph, Op, Quantization, Tensor


def act(name: str, shape, rng, scale=None, zero_point=None) -> Tensor:
    scale = np.float32(rng.uniform(0.01, 0.1)) if scale is None else np.float32(scale)
    zero_point = int(rng.integers(-20, 20)) if zero_point is None else zero_point
    return Tensor(name, tuple(shape), "int8", Quantization(scale, zero_point))


def constant(name: str, shape, rng) -> Tensor:
    t = act(name, shape, rng)
    t.data = rng.integers(-128, 128, shape).astype(np.int8)
    return t


def graph(op: Op, *tensors: Tensor) -> Graph:
    inputs = [t.name for t in tensors if not t.is_constant and t.name in op.inputs]
    return Graph({t.name: t for t in tensors}, [op], inputs, list(op.outputs), name=op.kind.lower()).validate()


def unary(kind: str, in_shape, out_shape=None, options=None, seed=0, same_quant=False, out_quant=None) -> Graph:
    rng = np.random.default_rng(seed)
    x, y = act("x", in_shape, rng), act("y", out_shape or in_shape, rng)
    if same_quant:
        y.quantization = x.quantization
    if out_quant is not None:
        y.quantization = Quantization(np.float32(out_quant[0]), out_quant[1])
    return graph(Op(kind, ["x"], ["y"], options or {}), x, y)


def binary(kind: str, a_shape, b_shape, activation="NONE", b_constant=False, seed=0) -> Graph:
    rng = np.random.default_rng(seed)
    a = act("a", a_shape, rng)
    b = constant("b", b_shape, rng) if b_constant else act("b", b_shape, rng)
    y = act("y", np.broadcast_shapes(tuple(a_shape), tuple(b_shape)), rng)
    options = {} if kind == "PRELU" else {"activation": activation}
    return graph(Op(kind, ["a", "b"], ["y"], options), a, b, y)


def conv(kind: str, h, w, cin, cout_or_mult, k, stride, dilation, padding, activation, seed, batch=1,
         per_channel=True) -> Graph:
    rng = np.random.default_rng(seed)
    eff = (k - 1) * dilation + 1
    ho = -(-h // stride) if padding == "SAME" else (h - eff) // stride + 1
    wo = -(-w // stride) if padding == "SAME" else (w - eff) // stride + 1
    x = act("x", (batch, h, w, cin), rng)
    if kind == "CONV_2D":
        cout, wshape, axis = cout_or_mult, (cout_or_mult, k, k, cin), 0
    else:
        cout, axis = cin * cout_or_mult, 3
        wshape = (1, k, k, cout)
    n = cout if per_channel else 1
    wscale = rng.uniform(0.002, 0.02, n).astype(np.float32)
    wt = Tensor("w", wshape, "int8", Quantization(wscale, np.zeros(n, np.int64), axis),
                rng.integers(-127, 128, wshape).astype(np.int8))
    b = Tensor("b", (cout,), "int32", Quantization(np.broadcast_to(x.quantization.scale[0] * wscale, (n,)),
                                                     np.zeros(n, np.int64)), rng.integers(-3000, 3000, cout).astype(np.int32))
    y = act("y", (batch, ho, wo, cout), rng, scale=x.quantization.scale[0] * 2.0, zero_point=int(rng.integers(-10, 10)))
    options = {"stride_h": stride, "stride_w": stride, "padding": padding, "dilation_h": dilation,
               "dilation_w": dilation, "activation": activation}
    if kind == "DEPTHWISE_CONV_2D":
        options["depth_multiplier"] = cout_or_mult
    return graph(Op(kind, ["x", "w", "b"], ["y"], options), x, wt, b, y)


def fully_connected(rows: int, in_features: int, out_features: int, per_channel: bool, seed=5,
                    steps: int | None = None) -> Graph:
    """FULLY_CONNECTED on (rows, in), or with ``steps`` on (rows, steps, in) keeping the dims (a
    Dense layer after a Conv1D)."""
    rng = np.random.default_rng(seed)
    lead = (rows,) if steps is None else (rows, steps)
    x = act("x", lead + (in_features,), rng)
    n = out_features if per_channel else 1
    ws = rng.uniform(0.002, 0.02, n).astype(np.float32)
    w = Tensor("w", (out_features, in_features), "int8", Quantization(ws, np.zeros(n, np.int64)),
               rng.integers(-127, 128, (out_features, in_features)).astype(np.int8))
    b = Tensor("b", (out_features,), "int32", Quantization(np.broadcast_to(x.quantization.scale[0] * ws, (n,)),
                                                             np.zeros(n, np.int64)),
               rng.integers(-900, 900, out_features).astype(np.int32))
    y = act("y", lead + (out_features,), rng)
    return graph(Op("FULLY_CONNECTED", ["x", "w", "b"], ["y"], {"activation": "RELU", "keep_num_dims": steps is not None}),
                 x, w, b, y)


def concatenation(seed=4) -> Graph:
    rng = np.random.default_rng(seed)
    a = act("a", (1, 3, 4, 2), rng)
    b = Tensor("b", (1, 3, 4, 5), "int8", a.quantization)
    y = Tensor("y", (1, 3, 4, 7), "int8", a.quantization)
    return graph(Op("CONCATENATION", ["a", "b"], ["y"], {"axis": 3, "activation": "NONE"}), a, b, y)


def quantize_float(seed=6) -> Graph:
    rng = np.random.default_rng(seed)
    x = Tensor("x", (1, 5, 7), "float32")
    return graph(Op("QUANTIZE", ["x"], ["y"], {}), x, act("y", (1, 5, 7), rng))


def dequantize(seed=7) -> Graph:
    rng = np.random.default_rng(seed)
    return graph(Op("DEQUANTIZE", ["x"], ["y"], {}), act("x", (1, 5, 7), rng), Tensor("y", (1, 5, 7), "float32"))


POOL = {"stride_h": 2, "stride_w": 2, "activation": "RELU", "filter_h": 3, "filter_w": 3, "padding": "SAME"}
SOFTMAX_OUT = (1 / 256, -128)


def cases() -> dict[str, Graph]:
    """Every op kind of the schema, with the variants converters emit (broadcast constants,
    per-channel and per-tensor weights, batch 2, depth multiplier 2, fixed output scales)."""
    c = {
        "add": binary("ADD", (1, 4, 5, 3), (1, 4, 5, 3), "RELU6"),
        "add_per_channel_constant": binary("ADD", (1, 4, 5, 3), (3,), b_constant=True, seed=1),
        "add_scalar_constant": binary("ADD", (1, 4, 5, 3), (1,), "RELU6", b_constant=True, seed=2),
        "sub": binary("SUB", (1, 4, 5, 3), (1, 4, 5, 3), seed=3),
        "sub_broadcast": binary("SUB", (2, 4, 3), (1, 1, 3), "RELU", seed=4),
        "mul": binary("MUL", (1, 4, 5, 3), (1, 4, 5, 3), "RELU", seed=5),
        "mul_squeeze_excite": binary("MUL", (1, 4, 5, 6), (1, 1, 1, 6), seed=6),
        "mul_per_channel_constant": binary("MUL", (1, 25, 5, 16), (16,), b_constant=True, seed=7),
        "mul_scalar_constant": binary("MUL", (1, 6, 4), (), b_constant=True, seed=8),
        "prelu": binary("PRELU", (1, 4, 5, 3), (1, 1, 3), b_constant=True, seed=9),
        "hard_swish": unary("HARD_SWISH", (1, 6, 5, 4), seed=10),
        "hard_swish_wide_input": unary("HARD_SWISH", (1, 64), seed=11),
        "logistic": unary("LOGISTIC", (1, 5, 9), out_quant=SOFTMAX_OUT, seed=12),
        "tanh": unary("TANH", (2, 5, 9), out_quant=(1 / 128, 0), seed=13),
        "relu": unary("RELU", (1, 4, 5, 3), seed=14),
        "relu6": unary("RELU6", (1, 4, 5, 3), same_quant=True, seed=15),
        "leaky_relu": unary("LEAKY_RELU", (1, 4, 5, 3), options={"alpha": 0.2}, seed=16),
        "leaky_relu_negative_alpha": unary("LEAKY_RELU", (1, 30), options={"alpha": -0.5}, seed=17),
        "quantize_int8": unary("QUANTIZE", (1, 4, 5, 3), seed=18),
        "quantize_float": quantize_float(),
        "dequantize": dequantize(),
        "max_pool": unary("MAX_POOL_2D", (1, 7, 6, 3), (1, 4, 3, 3), POOL, same_quant=True, seed=19),
        "average_pool": unary("AVERAGE_POOL_2D", (1, 7, 6, 3), (1, 4, 3, 3), POOL, same_quant=True, seed=20),
        "average_pool_batch2": unary("AVERAGE_POOL_2D", (2, 7, 6, 3), (2, 4, 3, 3), POOL, same_quant=True, seed=21),
        "mean": unary("MEAN", (1, 5, 4, 6), (1, 1, 1, 6), {"axes": (1, 2), "keep_dims": True}, seed=22),
        "mean_flat": unary("MEAN", (1, 5, 4, 6), (1, 6), {"axes": (1, 2), "keep_dims": False}, seed=23),
        "concatenation": concatenation(),
        "pad": unary("PAD", (1, 3, 4, 2), (1, 5, 7, 2), {"paddings": ((0, 0), (1, 1), (2, 1), (0, 0))},
                     same_quant=True, seed=24),
        "reshape": unary("RESHAPE", (1, 3, 4, 2), (1, 24), {"new_shape": (1, 24)}, same_quant=True, seed=25),
        "squeeze": unary("SQUEEZE", (1, 1, 4, 6), (1, 4, 6), {"squeeze_dims": (1,)}, same_quant=True, seed=26),
        "expand_dims": unary("EXPAND_DIMS", (1, 4, 6), (1, 1, 4, 6), {"axis": 1}, same_quant=True, seed=27),
        "transpose": unary("TRANSPOSE", (1, 3, 4, 2), (1, 2, 3, 4), {"perm": (0, 3, 1, 2)}, same_quant=True, seed=28),
        "softmax": unary("SOFTMAX", (1, 3, 17), options={"beta": 1.0}, out_quant=SOFTMAX_OUT, seed=29),
        "resize_nearest": unary("RESIZE_NEAREST_NEIGHBOR", (1, 3, 5, 2), (1, 7, 8, 2),
                                {"size": (7, 8), "align_corners": False, "half_pixel_centers": True}, same_quant=True),
        "conv": conv("CONV_2D", 7, 6, 3, 5, 3, 2, 1, "SAME", "RELU6", 30),
        "conv_dilated": conv("CONV_2D", 9, 8, 2, 4, 3, 1, 2, "VALID", "NONE", 31),
        "conv_per_tensor_batch2": conv("CONV_2D", 6, 6, 3, 4, 3, 1, 1, "SAME", "RELU", 32, batch=2, per_channel=False),
        "depthwise_multiplier2": conv("DEPTHWISE_CONV_2D", 8, 5, 3, 2, 3, 1, 1, "SAME", "RELU", 33),
        "depthwise_batch2": conv("DEPTHWISE_CONV_2D", 6, 6, 4, 1, 3, 2, 1, "VALID", "RELU6", 34, batch=2),
        "fully_connected_per_channel": fully_connected(1, 20, 7, True),
        "fully_connected_per_tensor_batch2": fully_connected(2, 20, 7, False, seed=35),
        "fully_connected_per_channel_batch2": fully_connected(2, 33, 9, True, seed=36),
        "fully_connected_keep_num_dims": fully_connected(1, 8, 6, True, seed=37, steps=5),
    }
    return c


def union(graphs: dict[str, Graph]) -> Graph:
    """The cases side by side in one graph (tensors prefixed by the case name): one TFLite
    Micro model, one jit, one C build for all of them. Each output is named after its case."""
    tensors, ops, inputs, outputs = {}, [], [], []
    for case, g in graphs.items():
        def rename(n, case=case):
            return None if n is None else f"{case}/{n}"

        for n, t in g.tensors.items():
            tensors[rename(n)] = Tensor(rename(n), t.shape, t.dtype, t.quantization, t.data)
        ops += [Op(op.kind, [rename(n) for n in op.inputs], [rename(n) for n in op.outputs], dict(op.options))
                for op in g.ops]
        inputs += [rename(n) for n in g.inputs]
        outputs += [rename(n) for n in g.outputs]
    return Graph(tensors, ops, inputs, outputs, name="op_cases").validate()


def int8_io(graphs: dict[str, Graph]) -> dict[str, Graph]:
    """The cases whose inputs and outputs are int8 (a C export takes one I/O type)."""
    return {k: g for k, g in graphs.items()
            if all(g.tensors[n].dtype == "int8" for n in g.inputs + g.outputs)}
