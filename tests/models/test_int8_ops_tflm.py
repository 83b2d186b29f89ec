"""Single int8 ops, built in the IR with random shapes/quantization, against TFLite Micro.

Each graph is written to .tflite (models.tflite_export) so TFLite Micro runs exactly the op the
JAX executor runs: every op kind of the schema (tests/op_cases.py, shared with the C backends'
tests), property tests of conv and depthwise geometry, batch > 1 graphs and 16x8 refusal.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import execute, schema, tflite_export, tflite_import, tflm
from models.ir import Graph, Op, Tensor
from tests import op_cases

ACTS = ["NONE", "RELU", "RELU6"]


def assert_matches_tflm(graph: Graph, batch: int = 3, seed: int = 0):
    data = tflite_export.to_bytes(graph)
    graph = tflite_import.from_bytes(data)
    inputs = tflm.random_inputs(graph, batch, seed)
    want = tflm.run(data, *inputs)
    got = execute.compile_graph(graph)(*(jnp.asarray(x) for x in inputs))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


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
    assert_matches_tflm(op_cases.conv("CONV_2D", *case))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv_cases)
def test_int8_depthwise_conv_matches_tflm(case):
    h, w, cin, mult, *rest = case
    assert_matches_tflm(op_cases.conv("DEPTHWISE_CONV_2D", h, w, cin, 1 + mult % 2, *rest))


@pytest.fixture(scope="module")
def all_ops():
    """Every int8-I/O case of tests/op_cases.py in one graph, written to .tflite and read back."""
    data = tflite_export.to_bytes(op_cases.union(op_cases.int8_io(op_cases.cases())))
    return data, tflite_import.from_bytes(data)


@pytest.mark.parametrize("pallas", [True, False], ids=["pallas", "xla"])
def test_every_op_kind_matches_tflm(all_ops, pallas):
    """One case per op kind and variant (broadcast constants, fixed output scales, batch 2, ...)."""
    data, graph = all_ops
    assert {op.kind for op in graph.ops} | {"DEQUANTIZE"} == set(schema.SCHEMA)  # every op kind is covered
    inputs = tflm.random_inputs(graph, 3, seed=1)
    want = tflm.run(data, *inputs)
    got = execute.compile_graph(graph, pallas=pallas)(*(jnp.asarray(x) for x in inputs))
    for name, g, w in zip(graph.outputs, got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=f"case {name.split('/')[0]} differs from TFLite Micro")


@pytest.mark.parametrize("case", ["quantize_float", "dequantize"])
def test_float_edges_match_tflm(case):
    assert_matches_tflm(op_cases.cases()[case])


@pytest.mark.parametrize("kind", ["RESIZE_NEAREST_NEIGHBOR"])
@pytest.mark.parametrize("align_corners, half_pixel", [(False, False), (True, False), (False, True)])
def test_resize_variants_match_tflm(kind, align_corners, half_pixel):
    g = op_cases.unary(kind, (1, 3, 5, 2), (1, 7, 8, 2),
                       {"size": (7, 8), "align_corners": align_corners, "half_pixel_centers": half_pixel},
                       same_quant=True)
    assert_matches_tflm(g)


def test_batch_graph_equals_its_elements_one_by_one():
    """A batch-2 graph (FC and depthwise on batch 2) gives what running each element alone gives."""
    for graph in (op_cases.fully_connected(2, 20, 7, True), op_cases.conv("DEPTHWISE_CONV_2D", 6, 6, 4, 1, 3, 2, 1,
                                                                           "VALID", "RELU6", 34, batch=2)):
        x = tflm.random_inputs(graph, 3, seed=2)[0]  # three invocations of batch 2
        whole = np.asarray(execute.compile_graph(graph)(jnp.asarray(x))[0])
        single = graph_with_batch(graph, 1)
        f = execute.compile_graph(single)
        one_by_one = np.concatenate([np.asarray(f(jnp.asarray(x[i:i + 1]))[0]) for i in range(len(x))])
        np.testing.assert_array_equal(whole, one_by_one)
        np.testing.assert_array_equal(whole, tflm.run(tflite_export.to_bytes(graph), x)[0])


def graph_with_batch(graph, batch):
    import copy

    g = copy.deepcopy(graph)
    for t in g.tensors.values():
        if not t.is_constant:
            t.shape = (batch,) + t.shape[1:]
    return g.validate()


def test_graph_that_reads_across_its_batch_runs_per_invocation():
    """A RESHAPE that folds the batch into features: the leading axis is not a batch axis, so
    inputs come in whole graph invocations (multiples of 2 rows) and run one at a time."""
    rng = np.random.default_rng(3)
    x = op_cases.act("x", (2, 6), rng)
    y = Tensor("y", (1, 12), "int8", x.quantization)
    g = Graph({"x": x, "y": y}, [Op("RESHAPE", ["x"], ["y"], {"new_shape": (1, 12)})], ["x"], ["y"]).validate()
    xs = rng.integers(-128, 128, (6, 6), dtype=np.int8)
    out = np.asarray(execute.compile_graph(g)(jnp.asarray(xs))[0])
    np.testing.assert_array_equal(out, xs.reshape(3, 12))
    with pytest.raises(ValueError, match="must be a multiple of 2"):
        execute.compile_graph(g)(jnp.asarray(xs[:5]))


def test_16x8_model_is_refused_naming_op_and_dtype():
    g = op_cases.conv("CONV_2D", 5, 5, 2, 3, 3, 1, 1, "SAME", "NONE", 40)
    for name in ("x", "y"):
        g.tensors[name].dtype = "int16"
    with pytest.raises(ValueError, match=r"op 0 \(CONV_2D 'y'\): output: tensor 'y' is int16: 16x8 quantization"):
        g.validate()
