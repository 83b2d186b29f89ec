"""Post-training quantization: float JAX models -> int8 IR that TFLite Micro runs bit-exactly,
and the digits example's int8 accuracy stays close to float."""
import jax.numpy as jnp
import numpy as np
import pytest

from models import builders, digits, execute, ptq, tflite_export, tflite_import, tflm


def quantize_and_compare_with_tflm(graph, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = graph.tensors[graph.inputs[0]].shape[1:]
    q = ptq.quantize(graph, [rng.normal(size=(32,) + shape).astype(np.float32)])
    data = tflite_export.to_bytes(q)
    xs = [rng.normal(size=(batch,) + shape).astype(np.float32)]
    want = tflm.run(data, *xs)
    got = execute.compile_graph(tflite_import.from_bytes(data))(*(jnp.asarray(x) for x in xs))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)
    return q


def test_ptq_scheme_per_channel_weights_asymmetric_activations_int32_bias():
    q = quantize_and_compare_with_tflm(builders.digits_cnn())
    kinds = [op.kind for op in q.ops]
    assert kinds[0] == "QUANTIZE" and kinds[-1] == "DEQUANTIZE"
    for op in q.ops:
        if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            w, b = q.tensors[op.inputs[1]], q.tensors[op.inputs[2]]
            assert w.dtype == "int8" and w.quantization.per_channel and not w.quantization.zero_point.any()
            assert np.abs(w.data).max() <= 127
            assert w.quantization.quantized_dimension == (3 if op.kind == "DEPTHWISE_CONV_2D" else 0)
            x_scale = q.tensors[op.inputs[0]].quantization.scale[0]
            assert b.dtype == "int32"
            np.testing.assert_allclose(b.quantization.scale, x_scale * w.quantization.scale, rtol=1e-6)
    softmax = next(op for op in q.ops if op.kind == "SOFTMAX")
    sq = q.tensors[softmax.outputs[0]].quantization
    assert sq.scalar_scale == 1 / 256 and sq.scalar_zero_point == -128


@pytest.mark.parametrize("build", [lambda: builders.ds_cnn(filters=16), lambda: builders.resnet8(width=8)],
                         ids=["ds_cnn", "resnet8"])
def test_quantized_builder_matches_tflm(build):
    quantize_and_compare_with_tflm(build())


@pytest.mark.slow
@pytest.mark.parametrize("build", [lambda: builders.mobilenet_v2(0.35, 32, 10), lambda: builders.mcunet(resolution=48),
                                   lambda: builders.mobilenet_v3_small(0.35, 32, 10)],
                         ids=["mobilenet_v2", "mcunet", "mobilenet_v3_small"])
def test_quantized_mobile_builder_matches_tflm(build, tmp_path):
    import mcu
    from mcu import build as mcu_build

    q = quantize_and_compare_with_tflm(build())
    data = tflite_export.to_bytes(q)
    graph = tflite_import.from_bytes(data)
    inputs = tflm.random_inputs(graph, 2, seed=1)
    mcu.export(graph, tmp_path)
    run = mcu_build.run_host(mcu_build.build_host(tmp_path), mcu.pack_inputs(graph, inputs))
    for ours, theirs in zip(mcu.unpack_outputs(graph, run.outputs), tflm.run(data, *inputs), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_mobilenet_v3_block_with_squeeze_excite_matches_tflm():
    """One MobileNetV3 bottleneck (hard-swish, squeeze-and-excite with a hard sigmoid of
    constant +3 and x1/6), quantized: HARD_SWISH, MEAN, broadcast ADD/MUL against TFLite Micro."""
    gb = builders.GraphBuilder("mbv3_block", (8, 8, 8))
    x = builders._mbv3_block(gb, gb.input, 5, 24, 8, True, "HS", 1)
    q = quantize_and_compare_with_tflm(gb.build(x))
    assert {"HARD_SWISH", "MEAN", "ADD", "MUL"} <= set(q.op_kinds())
    hard_sigmoid_add = next(op for op in q.ops if op.kind == "ADD" and q.tensors[op.inputs[1]].is_constant)
    assert hard_sigmoid_add.options["activation"] == "RELU6"


def test_builders_shapes():
    g = builders.mobilenet_v2(0.5, 96, num_classes=7)
    assert g.tensors[g.inputs[0]].shape == (1, 96, 96, 3)
    assert g.tensors[g.outputs[0]].shape == (1, 7)
    assert g.op_kinds()["ADD"] == 10  # MobileNetV2 has 10 residual connections
    assert builders.resnet8().op_kinds() == {"CONV_2D": 9, "ADD": 3, "AVERAGE_POOL_2D": 1, "RESHAPE": 1,
                                             "FULLY_CONNECTED": 1, "SOFTMAX": 1}  # as MLPerf Tiny IC
    assert builders.ds_cnn().op_kinds() == {"CONV_2D": 5, "DEPTHWISE_CONV_2D": 4, "AVERAGE_POOL_2D": 1, "RESHAPE": 1,
                                            "FULLY_CONNECTED": 1, "SOFTMAX": 1}  # as MLPerf Tiny KWS
    kernels = {g_.tensors[op.inputs[1]].shape[1] for g_ in [builders.mcunet()] for op in g_.ops
               if op.kind == "DEPTHWISE_CONV_2D"}
    assert kernels == {3, 5, 7}
    v3 = builders.mobilenet_v3_small()
    assert v3.tensors[v3.outputs[0]].shape == (1, 1000)
    # Table 2 of Howard et al.: 11 bottlenecks, 9 with squeeze-and-excite (plus the head's hard-swishes)
    assert v3.op_kinds()["DEPTHWISE_CONV_2D"] == 11 and v3.op_kinds()["MEAN"] == 10


def test_digits_int8_accuracy_close_to_float():
    r = digits.run()
    assert r.float_accuracy > 0.93
    assert abs(r.float_accuracy - r.int8_accuracy) <= 0.02
    assert r.agreement >= 0.97


def test_unsupported_op_in_ptq_is_named():
    gb = builders.GraphBuilder("concat", (4, 4, 2))
    x = gb.conv(gb.input, 3, 1)
    y = gb._op("CONCATENATION", [x, x], (1, 4, 4, 6), {"axis": 3, "activation": "NONE"})
    with pytest.raises(ValueError, match="CONCATENATION .* not supported"):
        ptq.quantize(gb.build(y), [np.zeros((2, 4, 4, 2), np.float32)])
