"""Every op kind of the schema through the C backends, against TFLite Micro: the shared cases of
tests/op_cases.py in one graph per build (portable under ASan/UBSan, CMSIS-NN, Cortex-M7 under
QEMU), and the float edges (QUANTIZE, DEQUANTIZE) on their own."""
import os
import shutil

import numpy as np
import pytest

import mcu
from mcu import build, codegen, emit
from models import schema, tflite_export, tflite_import, tflm
from tests import op_cases

needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                               reason=f"needs the Cortex-M toolchain and QEMU ({build.APT_HINT})")
needs_cmsis = pytest.mark.skipif(not os.environ.get("CMSIS_NN_ROOT"),
                                 reason="set CMSIS_NN_ROOT to a CMSIS-NN checkout to test the cmsis-nn backend")


@pytest.fixture(scope="module")
def all_ops():
    data = tflite_export.to_bytes(op_cases.union(op_cases.int8_io(op_cases.cases())))
    graph = tflite_import.from_bytes(data)
    inputs = tflm.random_inputs(graph, 3, seed=4)
    return graph, inputs, tflm.run(data, *inputs)


def _check(graph, raw, want):
    got = mcu.unpack_outputs(graph, raw)
    for name, g, w in zip(graph.outputs, got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w, err_msg=f"case {name.split('/')[0]} differs from TFLite Micro")


def test_every_op_kind_has_a_c_emitter_and_cmsis_forms_match_the_schema():
    assert set(emit.EMITTERS) == set(schema.SCHEMA)
    for kind, spec in schema.SCHEMA.items():
        has_cmsis = emit.form(kind, "cmsis-nn") is not None
        assert has_cmsis == ("cmsis-nn" in spec.runtimes), kind


def test_portable_sanitized_matches_tflm(all_ops, tmp_path):
    graph, inputs, want = all_ops
    mcu.export(graph, tmp_path)
    run = build.run_host(build.build_host(tmp_path, sanitize=True), mcu.pack_inputs(graph, inputs))
    _check(graph, run.outputs, want)


@needs_cmsis
def test_cmsis_nn_matches_tflm(all_ops, tmp_path):
    graph, inputs, want = all_ops
    lowered = mcu.export(graph, tmp_path, codegen.Config(backend="cmsis-nn"))
    kernels = {layer["kernel"] for layer in lowered.layers}
    assert {"arm_fully_connected_per_channel_s8", "arm_elementwise_mul_s8", "tp_mul_s8"} <= kernels
    run = build.run_host(build.build_host(tmp_path), mcu.pack_inputs(graph, inputs))
    _check(graph, run.outputs, want)


@needs_arm
def test_cortex_m7_matches_tflm(all_ops, tmp_path):
    graph, inputs, want = all_ops
    mcu.export(graph, tmp_path)
    board = mcu.board("stm32h743")
    run = build.run_qemu(build.build_target(tmp_path, board), board, mcu.pack_inputs(graph, inputs))
    _check(graph, run.outputs, want)


@pytest.mark.parametrize("case", ["quantize_float", "dequantize"])
def test_float_edges_match_tflm(case, tmp_path):
    data = tflite_export.to_bytes(op_cases.cases()[case])
    graph = tflite_import.from_bytes(data)
    inputs = tflm.random_inputs(graph, 3, seed=5)
    mcu.export(graph, tmp_path)
    run = build.run_host(build.build_host(tmp_path), mcu.pack_inputs(graph, inputs))
    _check(graph, run.outputs, tflm.run(data, *inputs))
