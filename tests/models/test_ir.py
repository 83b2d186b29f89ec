"""The graph IR's validation (the op schema applied to every op) catches malformed graphs with
errors naming the op's index, kind and field."""
import numpy as np
import pytest

from models.ir import Graph, Op, Quantization, Tensor


def tiny_graph() -> Graph:
    q = Quantization(0.1, -3)
    tensors = {
        "x": Tensor("x", (1, 4), "int8", q),
        "w": Tensor("w", (2, 4), "int8", Quantization([0.01, 0.02], [0, 0]), np.ones((2, 4), np.int8)),
        "b": Tensor("b", (2,), "int32", Quantization([0.001, 0.002], [0, 0]), np.zeros(2, np.int32)),
        "y": Tensor("y", (1, 2), "int8", q),
    }
    op = Op("FULLY_CONNECTED", ["x", "w", "b"], ["y"], {"activation": "RELU", "keep_num_dims": False})
    return Graph(tensors, [op], ["x"], ["y"])


def test_valid_graph_passes_and_reports_structure():
    g = tiny_graph().validate()
    assert g.op_kinds() == {"FULLY_CONNECTED": 1}
    assert g.producer() == {"y": 0}
    assert g.consumers()["x"] == [0]
    assert g.tensors["w"].quantization.per_channel and not g.tensors["x"].quantization.per_channel
    assert "FULLY_CONNECTED" in g.summary()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda g: setattr(g.ops[0], "kind", "LSTM"), "unknown op kind"),
        (lambda g: g.ops[0].options.pop("activation"), r"op 0 \(FULLY_CONNECTED .y.\): activation: option is missing"),
        (lambda g: g.ops[0].options.update(activation="TANH"), r"activation: .TANH. is not one of"),
        (lambda g: g.ops[0].inputs.__setitem__(0, "nope"), "input 'nope' is not a tensor"),
        (lambda g: g.ops[0].outputs.__setitem__(0, "x"), "already a constant, graph input"),
        (lambda g: setattr(g.tensors["w"], "data", np.ones((4, 2), np.int8)), "constant data is int8"),
        (lambda g: setattr(g.tensors["x"], "dtype", "complex64"), "dtype 'complex64'"),
        (lambda g: setattr(g.tensors["w"].quantization, "quantized_dimension", 1), "per-channel scales"),
        (lambda g: g.outputs.append("ghost"), "'ghost' is not a tensor"),
        (lambda g: g.outputs.append("w"), "graph output 'w' is a constant"),
    ],
)
def test_validate_names_the_problem(mutate, message):
    g = tiny_graph()
    mutate(g)
    with pytest.raises(ValueError, match=message):
        g.validate()


def test_ops_out_of_topological_order_are_rejected():
    g = tiny_graph()
    g.tensors["z"] = Tensor("z", (1, 2), "int8", Quantization(0.1, 0))
    g.ops.insert(0, Op("RESHAPE", ["y"], ["z"], {"new_shape": (1, 2)}))
    with pytest.raises(ValueError, match="used before it is produced"):
        g.validate()


def test_quantization_shapes_are_checked():
    with pytest.raises(ValueError, match="same non-zero length"):
        Quantization([0.1, 0.2], [0])


def conv_graph(**change) -> Graph:
    q = Quantization(0.05, 2)
    x = Tensor("x", (1, 6, 6, 2), "int8", q)
    w = Tensor("w", (4, 3, 3, 2), "int8", Quantization([0.01] * 4, [0] * 4), np.ones((4, 3, 3, 2), np.int8))
    b = Tensor("b", (4,), "int32", Quantization([5e-4] * 4, [0] * 4), np.zeros(4, np.int32))
    y = Tensor("y", change.pop("out_shape", (1, 3, 3, 4)), change.pop("out_dtype", "int8"), Quantization(0.1, -1))
    options = {"stride_h": 2, "stride_w": 2, "padding": "SAME", "dilation_h": 1, "dilation_w": 1, "activation": "NONE"}
    options.update(change)
    return Graph({t.name: t for t in (x, w, b, y)}, [Op("CONV_2D", ["x", "w", "b"], ["y"], options)], ["x"], ["y"])


@pytest.mark.parametrize(
    "graph, message",
    [
        (conv_graph(), None),
        (conv_graph(out_shape=(1, 6, 6, 4)), (r"op 0 \(CONV_2D 'y'\): output: .* shape \(1, 6, 6, 4\) but the inputs "
                                              r"and options give \(1, 3, 3, 4\)")),
        (conv_graph(stride_h=0), r"op 0 \(CONV_2D 'y'\): stride_h: 0 is not a positive integer"),
        (conv_graph(padding="VALID", out_shape=(1, 2, 2, 4), dilation_h=4), r"stride_h/padding: a 3-tap window"),
        (conv_graph(out_dtype="int16", out_shape=(1, 3, 3, 4)), r"output: tensor 'y' is int16: 16x8 quantization"),
    ],
)
def test_schema_checks_shapes_options_and_dtypes(graph, message):
    if message is None:
        graph.validate()
        return
    with pytest.raises(ValueError, match=message):
        graph.validate()


def test_depth_multiplier_zero_and_rank_zero_are_refused():
    q = Quantization(0.05, 0)
    x = Tensor("x", (1, 4, 4, 2), "int8", q)
    w = Tensor("w", (1, 3, 3, 2), "int8", Quantization([0.01] * 2, [0] * 2, 3), np.ones((1, 3, 3, 2), np.int8))
    y = Tensor("y", (1, 4, 4, 2), "int8", q)
    options = {"stride_h": 1, "stride_w": 1, "padding": "SAME", "dilation_h": 1, "dilation_w": 1,
               "depth_multiplier": 0, "activation": "NONE"}
    g = Graph({t.name: t for t in (x, w, y)}, [Op("DEPTHWISE_CONV_2D", ["x", "w"], ["y"], options)], ["x"], ["y"])
    with pytest.raises(ValueError, match=r"op 0 \(DEPTHWISE_CONV_2D 'y'\): depth_multiplier: 0 is not a positive"):
        g.validate()
    g.tensors["x"] = Tensor("x", (), "int8", q)
    with pytest.raises(ValueError, match="rank-0 activation"):
        g.validate()


def test_every_schema_kind_has_a_jax_function_and_its_runtimes():
    from models import execute, schema

    assert set(execute.INT8_OPS) == set(schema.SCHEMA)
    for spec in schema.SCHEMA.values():
        assert {"jax", "portable"} <= spec.runtimes  # JAX and the C export accept the same graphs
