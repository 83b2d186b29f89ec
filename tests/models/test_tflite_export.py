"""Writing the IR back to .tflite: the nine reference models (or the stand-ins built in their
place) round-trip, and TFLite Micro gives the same outputs on the rewritten file as on the original."""
import numpy as np
import pytest

from models import tflite_export, tflite_import, tflm, zoo


@pytest.mark.parametrize("model", zoo.suite_models())
def test_export_round_trips_and_runs_identically_in_tflm(model, model_path):
    original = model_path(model).read_bytes()
    graph = tflite_import.from_bytes(original)
    written = tflite_export.to_bytes(graph)
    again = tflite_import.from_bytes(written)
    assert [op.kind for op in again.ops] == [op.kind for op in graph.ops]
    assert [op.options for op in again.ops] == [op.options for op in graph.ops]
    for name, t in graph.tensors.items():
        u = again.tensors[name]
        assert (u.shape, u.dtype) == (t.shape, t.dtype)
        if t.is_constant:
            np.testing.assert_array_equal(u.data, t.data)
        if t.quantization is not None:
            np.testing.assert_array_equal(u.quantization.scale, t.quantization.scale)
            np.testing.assert_array_equal(u.quantization.zero_point, t.quantization.zero_point)
    inputs = tflm.random_inputs(graph, 2, seed=3)
    for a, b in zip(tflm.run(original, *inputs), tflm.run(written, *inputs)):
        np.testing.assert_array_equal(a, b)
