"""Importing the nine reference .tflite files, and clear errors for corrupted or unsupported ones."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import tflite_import, zoo

KWS = "mlperf_tiny_kws01_dscnn_int8"  # where absent, its stand-in: the same ops and layer shapes

# Op counts from the reference models' README (../shared/tflite/README.md).
EXPECTED_OPS = {
    "mlperf_tiny_vww01_mobilenetv1_0.25_96_int8": {"CONV_2D": 14, "DEPTHWISE_CONV_2D": 13, "AVERAGE_POOL_2D": 1,
                                                    "RESHAPE": 1, "FULLY_CONNECTED": 1, "SOFTMAX": 1},
    "mlperf_tiny_ic01_resnet8_cifar10_int8": {"CONV_2D": 9, "ADD": 3, "AVERAGE_POOL_2D": 1, "RESHAPE": 1,
                                              "FULLY_CONNECTED": 1, "SOFTMAX": 1},
    "mlperf_tiny_kws01_dscnn_int8": {"CONV_2D": 5, "DEPTHWISE_CONV_2D": 4, "AVERAGE_POOL_2D": 1, "RESHAPE": 1,
                                     "FULLY_CONNECTED": 1, "SOFTMAX": 1},
    "mlperf_tiny_ad01_fc_autoencoder_int8": {"FULLY_CONNECTED": 10},
    "mlperf_tiny_ad01_fc_autoencoder_int8_floatio": {"FULLY_CONNECTED": 10, "QUANTIZE": 1, "DEQUANTIZE": 1},
    "mlperf_tiny_ic_resnet_large_cifar10_int8": {"CONV_2D": 9, "ADD": 3, "AVERAGE_POOL_2D": 1, "RESHAPE": 1,
                                                 "FULLY_CONNECTED": 1, "SOFTMAX": 1},
    "mlperf_tiny_sww01_streaming_wakeword_int8": {"DEPTHWISE_CONV_2D": 4, "CONV_2D": 4, "RESHAPE": 1,
                                                  "FULLY_CONNECTED": 1, "SOFTMAX": 1},
    "tinyengine_mcunet_vww_80_int8_floatio": {"QUANTIZE": 1, "PAD": 4, "CONV_2D": 30, "DEPTHWISE_CONV_2D": 15,
                                              "ADD": 8, "TRANSPOSE": 1, "MEAN": 2, "FULLY_CONNECTED": 1,
                                              "DEQUANTIZE": 1},
    "tinyengine_mcunet_detection_fpn_128x160_int8_floatio": {"QUANTIZE": 1, "PAD": 5, "CONV_2D": 39,
                                                             "DEPTHWISE_CONV_2D": 16, "ADD": 11,
                                                             "RESIZE_NEAREST_NEIGHBOR": 2, "MAX_POOL_2D": 2,
                                                             "DEQUANTIZE": 3},
}


def test_all_nine_reference_models_are_present():
    if not zoo.references():
        pytest.skip(f"no reference models in {', '.join(map(str, zoo.search_path()))}; {zoo.HOW_TO_GET}")
    assert set(EXPECTED_OPS) == set(zoo.REFERENCES)
    missing = sorted(set(EXPECTED_OPS) - set(zoo.references()))
    assert not missing, f"reference models missing: {missing}; {zoo.HOW_TO_GET}"


@pytest.mark.parametrize("name", EXPECTED_OPS)
def test_reference_model_imports_with_expected_ops(name, reference_model):
    g = tflite_import.load(reference_model(name))
    assert g.op_kinds() == EXPECTED_OPS[name]
    for op in g.ops:
        if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            w = g.tensors[op.inputs[1]]
            assert w.dtype == "int8" and w.quantization.per_channel  # README: per-channel conv weights
            axis = 0 if op.kind == "CONV_2D" else 3
            assert w.quantization.quantized_dimension == axis
            assert g.tensors[op.inputs[2]].dtype == "int32"


def test_kws_input_quantization_matches_readme(reference_model):
    g = tflite_import.load(reference_model(KWS))
    x = g.tensors[g.inputs[0]]
    assert x.shape == (1, 49, 10, 1) and x.dtype == "int8"
    assert np.isclose(x.quantization.scalar_scale, 0.584702909) and x.quantization.scalar_zero_point == 83
    first = g.ops[0]
    assert first.kind == "CONV_2D" and first.options["stride_h"] == 2 and first.options["padding"] == "SAME"
    assert g.tensors[first.inputs[1]].shape == (64, 10, 4, 1)


def test_not_a_tflite_file_is_rejected():
    with pytest.raises(ValueError, match="too short"):
        tflite_import.from_bytes(b"TFL")
    with pytest.raises(ValueError, match="not the TFLite file identifier"):
        tflite_import.from_bytes(b"\x10\x00\x00\x00GGUF" + bytes(64))


@pytest.mark.parametrize("keep", [0.02, 0.25, 0.5, 0.9, 0.999])
def test_truncated_file_names_the_offset(keep, model_path):
    data = model_path(KWS).read_bytes()
    with pytest.raises(ValueError, match=r"offset|truncated|corrupted|outside|past the end"):
        tflite_import.from_bytes(data[: int(len(data) * keep)])


def _patch_opcode(data: bytes, old: int, new: int) -> bytes:
    import tflite

    buf = bytearray(data)
    model = tflite.Model.GetRootAsModel(buf, 0)
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == old:
            tab = code._tab
            deprecated = tab.Offset(4)
            if deprecated:
                buf[tab.Pos + deprecated] = new
            builtin = tab.Offset(10)
            if builtin:
                buf[tab.Pos + builtin: tab.Pos + builtin + 4] = new.to_bytes(4, "little")
    return bytes(buf)


def test_unsupported_operator_is_named(model_path):
    data = _patch_opcode(model_path(KWS).read_bytes(), old=25, new=11)  # SOFTMAX -> L2_NORMALIZATION
    with pytest.raises(ValueError, match=r"operator 12 \(L2_NORMALIZATION\): unsupported operator L2_NORMALIZATION"):
        tflite_import.from_bytes(data, name="kws.tflite")


def _table_bytes(data: bytes) -> np.ndarray:
    """Offsets of the bytes outside the weight buffers: the flatbuffer tables and vectors."""
    import tflite

    model = tflite.Model.GetRootAsModel(data, 0)
    covered = np.zeros(len(data), bool)
    for i in range(model.BuffersLength()):
        b = model.Buffers(i)
        if b.DataLength():
            start = b._tab.Vector(b._tab.Offset(4))
            covered[start:start + b.DataLength()] = True
    return np.flatnonzero(~covered)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_tables_give_value_error_or_valid_graph(model_path, data):
    raw = bytearray(model_path(KWS).read_bytes())
    tables = _table_bytes(bytes(raw))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = int(tables[data.draw(st.integers(0, len(tables) - 1))])
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        g = tflite_import.from_bytes(bytes(raw))
    except ValueError as e:
        assert str(e)
    else:
        g.validate()


def test_16x8_file_is_refused_at_import_naming_op_and_dtype():
    """int16 activations with int8 weights (16x8): refused in one line naming the op and dtype."""
    import tflite

    from models import tflite_export
    from tests import op_cases

    buf = bytearray(tflite_export.to_bytes(op_cases.cases()["conv"]))
    subgraph = tflite.Model.GetRootAsModel(buf, 0).Subgraphs(0)
    for i in range(subgraph.TensorsLength()):
        t = subgraph.Tensors(i)
        if t.Type() == tflite.TensorType.INT8 and t.Buffer() == 0:  # activations: no data to resize
            buf[t._tab.Pos + t._tab.Offset(6)] = tflite.TensorType.INT16
    with pytest.raises(ValueError, match=r"op 0 \(CONV_2D .*\): \w+: tensor '\w+' is int16: 16x8 quantization"):
        tflite_import.from_bytes(bytes(buf))
