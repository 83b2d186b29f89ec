"""Firmware-grade export: model_invoke returns a status (CMSIS-NN's checked), --prefix namespaces
every global symbol so two models link into one host binary and one Cortex-M image, and the
CMSIS-NN library cache follows the checkout's content."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mcu
from mcu import build, cmsis_nn, codegen
from models import builders, ptq, tflite_export, tflite_import, tflm

REPO = pathlib.Path(__file__).resolve().parents[2]


def _ptq(graph, seed=0):
    rng = np.random.default_rng(seed)
    shape = graph.tensors[graph.inputs[0]].shape[1:]
    data = tflite_export.to_bytes(ptq.quantize(graph, [rng.normal(size=(16,) + shape).astype(np.float32)]))
    return tflite_import.from_bytes(data), data


def _two_models(tmp_path, backends):
    """Two models exported with prefixes a and b, and a folder whose model_invoke runs both (inputs
    and outputs back to back), built by the standard harness: nothing may collide at link time."""
    models = [_ptq(builders.ds_cnn(input_shape=(25, 10, 1), filters=8)), _ptq(builders.resnet8(resolution=16, width=8))]
    for (graph, _), name, backend in zip(models, "ab", backends, strict=True):
        mcu.export(graph, tmp_path / name, codegen.Config(backend=backend), prefix=name)
    a, b = (m[0] for m in models)
    sizes = [(sum(g.tensors[n].nbytes for n in g.inputs), sum(g.tensors[n].nbytes for n in g.outputs)) for g in (a, b)]
    both = tmp_path / "both"
    both.mkdir()
    (both / "model.h").write_text(f"""#include <stdint.h>
#define MODEL_INPUT_BYTES {sizes[0][0] + sizes[1][0]}
#define MODEL_OUTPUT_BYTES {sizes[0][1] + sizes[1][1]}
typedef float model_input_t;
typedef float model_output_t;
int32_t model_invoke(const model_input_t *input, model_output_t *output);
""")
    (both / "model.c").write_text(f"""#include "model.h"
#include "../a/model.h"
#include "../b/model.h"
int32_t model_invoke(const model_input_t *input, model_output_t *output) {{
  const int32_t s = a_model_invoke(input, output);
  return s ? s : b_model_invoke(input + {sizes[0][0] // 4}, output + {sizes[0][1] // 4});
}}
""")
    (both / "build.json").write_text(json.dumps({"sources": ["model.c", "../a/model.c", "../a/tp_kernels.c",
                                                             "../b/model.c", "../b/tp_kernels.c"],
                                                 "libraries": ["cmsis-nn"] if "cmsis-nn" in backends else []}))
    return models, both


def _run_two(models, both, runner):
    (a, a_model), (b, b_model) = models
    xa, xb = mcu.random_inputs(a, 2, seed=3), mcu.random_inputs(b, 2, seed=4)
    raw = runner(np.concatenate([mcu.pack_inputs(a, xa), mcu.pack_inputs(b, xb)], axis=1))
    cut = sum(a.tensors[n].nbytes for n in a.outputs)
    for graph, model, xs, part in ((a, a_model, xa, raw[:, :cut]), (b, b_model, xb, raw[:, cut:])):
        for got, want in zip(mcu.unpack_outputs(graph, np.ascontiguousarray(part)), tflm.run(model, *xs), strict=True):
            np.testing.assert_array_equal(got, want)


def test_two_prefixed_models_link_into_one_host_binary(tmp_path):
    models, both = _two_models(tmp_path, ["specialized", "portable"])
    assert "a_tp_conv_s8" in (tmp_path / "a" / "tp_names.h").read_text()
    _run_two(models, both, lambda x: build.run_host(build.build_host(both), x).outputs)


@pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                    reason=f"needs the Cortex-M toolchain and QEMU ({build.APT_HINT})")
def test_two_prefixed_models_link_into_one_cortex_m_image(tmp_path):
    backends = ["specialized", "cmsis-nn" if os.environ.get(cmsis_nn.ENV) else "portable"]
    models, both = _two_models(tmp_path, backends)
    board = mcu.board("stm32f746")
    elf = build.build_target(both, board)
    _run_two(models, both, lambda x: build.run_qemu(elf, board, x).outputs)


@pytest.mark.skipif(not os.environ.get(cmsis_nn.ENV), reason="needs CMSIS_NN_ROOT (a CMSIS-NN checkout)")
def test_cmsis_nn_status_reaches_the_caller(tmp_path):
    graph, _ = _ptq(builders.resnet8(resolution=16, width=8))
    lowered = mcu.export(graph, tmp_path, codegen.Config(backend="cmsis-nn"))
    conv = next(i for i, layer in enumerate(lowered.layers) if layer["kernel"] == "arm_convolve_wrapper_s8"
                and graph.tensors[graph.ops[i].inputs[1]].shape[1] == 3)
    text = (tmp_path / "model.c").read_text()
    assert f"TP_CHECK({conv}, arm_convolve_wrapper_s8(" in text
    # a scratch buffer of NULL: arm_convolve_s8 answers ARM_CMSIS_NN_ARG_ERROR
    line = next(x for x in text.splitlines() if f"TP_CHECK({conv}, " in x)
    start = line.index("cmsis_nn_context ctx = {") + len("cmsis_nn_context ctx = {")
    broken = line[:start] + "0, 0" + line[line.index("};", start):]
    (tmp_path / "model.c").write_text(text.replace(line, broken))
    exe = build.build_host(tmp_path)
    proc = subprocess.run([str(exe), "/dev/null", str(tmp_path / "o.bin")], capture_output=True, text=True, check=False)
    x = mcu.pack_inputs(graph, mcu.random_inputs(graph, 1))
    with pytest.raises(RuntimeError, match=f"failed in op {conv}"):
        build.run_host(exe, x)
    assert proc.returncode == 0  # no input, no inference


def test_cmsis_nn_library_cache_follows_the_checkout_content(tmp_path, monkeypatch):
    root = tmp_path / "cmsis"
    (root / "Include").mkdir(parents=True)
    (root / "Source" / "X").mkdir(parents=True)
    (root / "Include" / "arm_nnfunctions.h").write_text("/* v1 */\n")
    (root / "Source" / "X" / "k.c").write_text("int k(void) { return 1; }\n")
    monkeypatch.setenv(cmsis_nn.ENV, str(root))
    before = cmsis_nn.content_key(cmsis_nn.root())
    (root / "Source" / "X" / "k.c").write_text("int k(void) { return 2; }\n")
    assert cmsis_nn.content_key(cmsis_nn.root()) != before
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)
    assert cmsis_nn.content_key(copy) == cmsis_nn.content_key(root)


def test_cli_prefix_must_be_a_c_identifier(tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(_ptq(builders.ds_cnn(input_shape=(25, 10, 1), filters=8))[1])
    proc = subprocess.run([sys.executable, "-m", "mcu", "export", str(model), "--prefix", "9lives", "-o", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 2 and "not a C identifier" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mcu", "export", str(model), "--prefix", "kws", "-o", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "int32_t kws_model_invoke(" in (tmp_path / "o" / "model.h").read_text()


@pytest.mark.parametrize("backend", ["portable", "specialized"])
def test_model_reads_its_input_in_place_and_never_writes_it(backend, tmp_path):
    """Zero-copy input: the float input is QUANTIZEd straight from the caller's buffer, which is
    not in the arena; a caller whose input lies in read-only memory (a const array: .rodata) gets
    TFLite Micro's outputs, so nothing is written there."""
    float_graph = builders.resnet8(resolution=16, width=8)
    rng = np.random.default_rng(0)
    q = ptq.quantize(float_graph, [rng.normal(size=(16, 16, 16, 3)).astype(np.float32)], float_io=True)
    model = tflite_export.to_bytes(q)
    graph = tflite_import.from_bytes(model)
    lowered = mcu.export(graph, tmp_path, codegen.Config(backend=backend), prefix="cam")
    x = graph.inputs[0]
    assert lowered.plan.is_external(x) and lowered.plan.tensor_buffer[x] not in lowered.plan.buffers
    assert "((int8_t *)input + 0)" in lowered.model_c and "tp_copy((const int8_t *)input" not in lowered.model_c
    assert "unchanged until cam_model_invoke returns" in lowered.model_h
    inputs = mcu.random_inputs(graph, 1, seed=9)
    values = ", ".join(f"{v!r}f" for v in inputs[0].reshape(-1).astype(np.float32).tolist())
    (tmp_path / "main.c").write_text(f"""#include <stdio.h>
#include "model.h"
static const float input[{inputs[0].size}] = {{{values}}};
static float output[CAM_MODEL_OUTPUT_BYTES / sizeof(float)];
int main(void) {{
  const int32_t status = cam_model_invoke(input, output);
  fwrite(output, 1, sizeof output, stdout);
  return (int)status;
}}
""")
    exe = tmp_path / "main"
    subprocess.run(["gcc", "-std=c99", "-O1", f"-I{tmp_path}", str(tmp_path / "model.c"), str(tmp_path / "tp_kernels.c"),
                    str(tmp_path / "main.c"), "-o", str(exe), "-lm"], check=True, capture_output=True)
    proc = subprocess.run([str(exe)], capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = mcu.unpack_outputs(graph, np.frombuffer(proc.stdout, np.uint8).reshape(1, -1))
    for a, b in zip(got, tflm.run(model, *inputs), strict=True):
        np.testing.assert_array_equal(a, b)
