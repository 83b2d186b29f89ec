"""Int8 execution through the Pallas kernels is bit-exact with TFLite Micro on every reference
model (or on the stand-ins built in their place)."""
import jax.numpy as jnp
import numpy as np
import pytest

from models import diff, execute, tflite_import, tflm, zoo

NUM_INPUTS = 20
KWS = "mlperf_tiny_kws01_dscnn_int8"
AD = "mlperf_tiny_ad01_fc_autoencoder_int8"


@pytest.mark.parametrize("name", zoo.suite_models())
def test_int8_graph_matches_tflm_bit_exact(name, model_path):
    path = model_path(name)
    data = path.read_bytes()
    graph = tflite_import.from_bytes(data, name=path.name)
    inputs = tflm.random_inputs(graph, NUM_INPUTS, seed=1)
    want = tflm.run(data, *inputs)
    got = execute.compile_graph(graph)(*(jnp.asarray(x) for x in inputs))  # Pallas kernels, one jit, batch 20
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape
        mismatched = int((g.view(np.uint8) != w.view(np.uint8)).sum())
        assert mismatched == 0, f"{mismatched} of {g.nbytes} output bytes differ from TFLite Micro"


def test_diff_names_first_layer_and_element_that_differ(model_path):
    data = model_path(KWS).read_bytes()
    graph = tflite_import.from_bytes(data)
    assert diff.first_difference(graph, data, pallas=False) is None
    # Perturb the bias of the 4th op (a depthwise conv): that op is the first to differ.
    op = graph.ops[3]
    bias = graph.tensors[op.inputs[2]]
    bias.data = bias.data + np.int32(1 << 14)
    d = diff.first_difference(graph, data, pallas=False)
    assert d is not None and d.op_index == 3 and d.op_kind == op.kind and d.tensor == op.outputs[0]
    assert d.mismatches > 0 and d.ours != d.tflm
    assert f"op 3 ({op.kind}" in str(d)


def test_diff_command_line_reports_bit_exact(model_path, capsys):
    assert diff.main([str(model_path(AD))]) == 0
    assert "bit-exact" in capsys.readouterr().out


def test_wrong_input_shape_is_a_clear_error(model_path):
    graph = tflite_import.load(model_path(AD))
    with pytest.raises(ValueError, match=r"input .* must be int8\(B, 640\)"):
        execute.compile_graph(graph)(jnp.zeros((2, 641), jnp.int8))
