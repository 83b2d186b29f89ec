"""The graph IR's validation catches malformed graphs with errors naming the op/tensor."""
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
        (lambda g: g.ops[0].options.pop("activation"), "missing options"),
        (lambda g: g.ops[0].options.update(activation="TANH"), "activation 'TANH'"),
        (lambda g: g.ops[0].inputs.__setitem__(0, "nope"), "input 'nope' is not a tensor"),
        (lambda g: g.ops[0].outputs.__setitem__(0, "x"), "already a constant, graph input"),
        (lambda g: setattr(g.tensors["w"], "data", np.ones((4, 2), np.int8)), "constant data is int8"),
        (lambda g: setattr(g.tensors["x"], "dtype", "complex64"), "dtype 'complex64'"),
        (lambda g: setattr(g.tensors["w"].quantization, "quantized_dimension", 1), "per-channel scales"),
        (lambda g: g.outputs.append("ghost"), "'ghost' is not a tensor"),
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
