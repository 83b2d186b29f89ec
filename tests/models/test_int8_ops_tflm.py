"""Single int8 ops, built in the IR with random shapes/quantization, against TFLite Micro.

Each graph is written to .tflite (models.tflite_export) so TFLite Micro runs exactly the op the
JAX executor runs; the ops the reference models do not use (MUL, CONCATENATION, RESIZE variants,
SAME pooling, dilation, depth multiplier) are covered here.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import execute, tflite_export, tflite_import, tflm
from models.ir import Graph, Op, Quantization, Tensor

ACTS = ["NONE", "RELU", "RELU6"]


def act_tensor(name, shape, rng):
    return Tensor(name, shape, "int8", Quantization(np.float32(rng.uniform(0.01, 0.1)), int(rng.integers(-20, 20))))


def assert_matches_tflm(graph: Graph, batch: int = 3, seed: int = 0):
    data = tflite_export.to_bytes(graph)
    graph = tflite_import.from_bytes(data)
    inputs = tflm.random_inputs(graph, batch, seed)
    want = tflm.run(data, *inputs)
    got = execute.compile_graph(graph)(*(jnp.asarray(x) for x in inputs))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


def conv_graph(kind, h, w, cin, cout_or_mult, k, stride, dilation, padding, act, seed):
    rng = np.random.default_rng(seed)
    eff = (k - 1) * dilation + 1
    ho = -(-h // stride) if padding == "SAME" else (h - eff) // stride + 1
    wo = -(-w // stride) if padding == "SAME" else (w - eff) // stride + 1
    x = act_tensor("x", (1, h, w, cin), rng)
    if kind == "CONV_2D":
        cout, wshape, axis = cout_or_mult, (cout_or_mult, k, k, cin), 0
    else:
        cout, axis = cin * cout_or_mult, 3
        wshape = (1, k, k, cout)
    wscale = rng.uniform(0.002, 0.02, cout).astype(np.float32)
    wt = Tensor("w", wshape, "int8", Quantization(wscale, np.zeros(cout, np.int64), axis),
                rng.integers(-127, 128, wshape).astype(np.int8))
    bscale = (x.quantization.scale[0] * wscale).astype(np.float32)
    b = Tensor("b", (cout,), "int32", Quantization(bscale, np.zeros(cout, np.int64)),
               rng.integers(-3000, 3000, cout).astype(np.int32))
    y = act_tensor("y", (1, ho, wo, cout), rng)
    y.quantization = Quantization(np.float32(x.quantization.scale[0] * 2.0), int(rng.integers(-10, 10)))
    options = {"stride_h": stride, "stride_w": stride, "padding": padding, "dilation_h": dilation,
               "dilation_w": dilation, "activation": act}
    if kind == "DEPTHWISE_CONV_2D":
        options["depth_multiplier"] = cout_or_mult
    op = Op(kind, ["x", "w", "b"], ["y"], options)
    return Graph({t.name: t for t in (x, wt, b, y)}, [op], ["x"], ["y"]).validate()


conv_cases = st.tuples(
    st.integers(3, 9), st.integers(3, 9), st.integers(1, 5), st.integers(1, 6), st.integers(1, 3),
    st.integers(1, 2), st.integers(1, 2), st.sampled_from(["SAME", "VALID"]), st.sampled_from(ACTS),
    st.integers(0, 1000),
).filter(lambda c: c[7] == "SAME" or (c[4] - 1) * c[6] + 1 <= min(c[0], c[1]))
# TFLite (and TFLite Micro) only allow dilation together with stride 1
conv_cases = conv_cases.filter(lambda c: c[6] == 1 or c[5] == 1)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv_cases)
def test_int8_conv_matches_tflm(case):
    assert_matches_tflm(conv_graph("CONV_2D", *case))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv_cases)
def test_int8_depthwise_conv_matches_tflm(case):
    h, w, cin, mult, *rest = case
    assert_matches_tflm(conv_graph("DEPTHWISE_CONV_2D", h, w, cin, 1 + mult % 2, *rest))


def unary_graph(kind, in_shape, out_shape, options, seed=0, same_quant=False, out_quant=None):
    rng = np.random.default_rng(seed)
    x = act_tensor("x", in_shape, rng)
    y = act_tensor("y", out_shape, rng)
    if same_quant:
        y.quantization = x.quantization
    if out_quant is not None:
        y.quantization = out_quant
    return Graph({"x": x, "y": y}, [Op(kind, ["x"], ["y"], options)], ["x"], ["y"]).validate()


POOL = {"stride_h": 2, "stride_w": 2, "activation": "RELU"}


@pytest.mark.parametrize("graph", [
    unary_graph("MAX_POOL_2D", (1, 7, 6, 3), (1, 4, 3, 3), {**POOL, "filter_h": 3, "filter_w": 3, "padding": "SAME"},
                same_quant=True),
    unary_graph("AVERAGE_POOL_2D", (1, 7, 6, 3), (1, 4, 3, 3), {**POOL, "filter_h": 3, "filter_w": 3, "padding": "SAME"},
                same_quant=True),
    unary_graph("MEAN", (1, 5, 4, 6), (1, 1, 1, 6), {"axes": (1, 2), "keep_dims": True}),
    unary_graph("MEAN", (1, 5, 4, 6), (1, 6), {"axes": (1, 2), "keep_dims": False}),
    unary_graph("PAD", (1, 3, 4, 2), (1, 5, 7, 2), {"paddings": ((0, 0), (1, 1), (2, 1), (0, 0))}, same_quant=True),
    unary_graph("TRANSPOSE", (1, 3, 4, 2), (1, 2, 3, 4), {"perm": (0, 3, 1, 2)}, same_quant=True),
    unary_graph("RESHAPE", (1, 3, 4, 2), (1, 24), {"new_shape": (1, 24)}, same_quant=True),
    unary_graph("SOFTMAX", (1, 3, 17), (1, 3, 17), {"beta": 1.0},
                out_quant=Quantization(np.float32(1 / 256), -128)),
    unary_graph("SOFTMAX", (1, 10), (1, 10), {"beta": 0.5}, out_quant=Quantization(np.float32(1 / 256), -128)),
] + [
    unary_graph("RESIZE_NEAREST_NEIGHBOR", (1, 3, 5, 2), (1, 7, 8, 2),
                {"size": (7, 8), "align_corners": ac, "half_pixel_centers": hp}, same_quant=True)
    for ac, hp in ((False, False), (True, False), (False, True))
], ids=lambda g: g.ops[0].kind)
def test_int8_unary_op_matches_tflm(graph):
    assert_matches_tflm(graph)


@pytest.mark.parametrize("kind, act", [("ADD", "RELU6"), ("ADD", "NONE"), ("MUL", "NONE"), ("MUL", "RELU")])
def test_int8_binary_op_matches_tflm(kind, act):
    rng = np.random.default_rng(3)
    shape = (1, 4, 5, 3)
    a, b, y = act_tensor("a", shape, rng), act_tensor("b", shape, rng), act_tensor("y", shape, rng)
    g = Graph({"a": a, "b": b, "y": y}, [Op(kind, ["a", "b"], ["y"], {"activation": act})], ["a", "b"], ["y"])
    assert_matches_tflm(g.validate())


def test_int8_concatenation_matches_tflm():
    rng = np.random.default_rng(4)
    a = act_tensor("a", (1, 3, 4, 2), rng)
    b = Tensor("b", (1, 3, 4, 5), "int8", a.quantization)
    y = Tensor("y", (1, 3, 4, 7), "int8", a.quantization)
    g = Graph({"a": a, "b": b, "y": y}, [Op("CONCATENATION", ["a", "b"], ["y"], {"axis": 3, "activation": "NONE"})],
              ["a", "b"], ["y"])
    assert_matches_tflm(g.validate())


def test_fully_connected_per_channel_and_per_tensor_match_tflm():
    rng = np.random.default_rng(5)
    for per_channel in (True, False):
        x = act_tensor("x", (1, 20), rng)
        n = 7 if per_channel else 1
        ws = rng.uniform(0.002, 0.02, n).astype(np.float32)
        w = Tensor("w", (7, 20), "int8", Quantization(ws, np.zeros(n, np.int64)), rng.integers(-127, 128, (7, 20)).astype(np.int8))
        b = Tensor("b", (7,), "int32", Quantization(np.broadcast_to(x.quantization.scale[0] * ws, 7 if per_channel else 1),
                                                     np.zeros(n, np.int64)), rng.integers(-900, 900, 7).astype(np.int32))
        y = act_tensor("y", (1, 7), rng)
        g = Graph({t.name: t for t in (x, w, b, y)},
                  [Op("FULLY_CONNECTED", ["x", "w", "b"], ["y"], {"activation": "RELU", "keep_num_dims": False})],
                  ["x"], ["y"])
        assert_matches_tflm(g.validate())
