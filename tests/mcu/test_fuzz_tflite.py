"""Mutation fuzzing of .tflite files through import -> JAX execution -> C export -> host C build
under ASan/UBSan.

Mutants come from models the project builds (its builders, PTQ and .tflite exporter) and, when
present, reference models (``models.zoo``: $TINYPALLAS_MODELS, then ../shared/tflite): bit flips, byte changes, truncation, and field
mutations at the positions of typed fields found through the flatbuffer schema (tensor shapes,
types, buffers and quantization; operator opcodes, inputs, outputs and options; subgraph inputs
and outputs; operator codes). Every mutant either is refused with a ValueError or runs; JAX and
the C export accept exactly the same graphs, give the same bytes, and the C build runs clean
under the sanitizers. Seeds are fixed: a failure names the seed model, the mutant's index and
its mutations, and ``mutant(name, index)`` rebuilds it.
"""
from __future__ import annotations

import functools
import pathlib
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import tflite

import mcu
from mcu import build
from models import builders, execute, ptq, tflite_export, tflite_import, tflm, zoo
from tests import op_cases

SHARED_SEEDS = ["mlperf_tiny_kws01_dscnn_int8", "mlperf_tiny_ad01_fc_autoencoder_int8_floatio"]


def _ptq(graph, float_io: bool = True) -> bytes:
    rng = np.random.default_rng(0)
    shape = graph.tensors[graph.inputs[0]].shape[1:]
    return tflite_export.to_bytes(ptq.quantize(graph, [rng.normal(size=(16,) + shape).astype(np.float32)],
                                               float_io=float_io))


@functools.cache
def seeds() -> dict[str, bytes]:
    """Small models the project builds, plus the reference models that are present."""
    gb = builders.GraphBuilder("mbv3_block", (6, 6, 8))
    block = builders._mbv3_block(gb, gb.input, 3, 16, 8, True, "HS", 1)
    ops = op_cases.cases()
    models = {
        "ds_cnn": _ptq(builders.ds_cnn((10, 4, 1), num_classes=4, filters=8)),
        "mbv3_block": _ptq(gb.build(gb.flatten(gb.average_pool(block))), float_io=False),
        "op_mix": tflite_export.to_bytes(op_cases.union({k: ops[k] for k in (
            "add_per_channel_constant", "prelu", "logistic", "mean", "pad", "concatenation", "transpose",
            "fully_connected_per_channel_batch2", "sub_broadcast", "depthwise_multiplier2")})),
    }
    for name in SHARED_SEEDS:
        path = zoo.find(name)
        if path is not None:
            models[name] = path.read_bytes()
    return models


def field_sites(buf: bytes) -> list[tuple[int, str]]:
    """(byte offset, kind) of the typed scalar fields of the model, located through the schema."""
    model = tflite.Model.GetRootAsModel(buf, 0)
    sites: list[tuple[int, str]] = []

    def scalar(tab, field: int, kind: str):
        o = tab.Offset(field)
        if o:
            sites.append((tab.Pos + o, kind))

    def vector(tab, field: int, width: int, kind: str):
        o = tab.Offset(field)
        if o:
            start = tab.Vector(o)
            sites.extend((start + width * i, kind) for i in range(tab.VectorLen(o)))

    def table_fields(tab):  # every field present in a table's vtable (width unknown: its low byte)
        vtable = tab.Pos - struct.unpack_from("<i", buf, tab.Pos)[0]
        size = struct.unpack_from("<H", buf, vtable)[0]
        for k in range(4, size, 2):
            off = struct.unpack_from("<H", buf, vtable + k)[0]
            if off:
                sites.append((tab.Pos + off, "u8"))

    sg = model.Subgraphs(0)
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        vector(t._tab, 4, 4, "i32")  # shape
        scalar(t._tab, 6, "u8")  # type
        scalar(t._tab, 8, "i32")  # buffer
        q = t.Quantization()
        if q is not None:
            vector(q._tab, 8, 4, "f32")  # scale
            vector(q._tab, 10, 8, "i64")  # zero_point
            scalar(q._tab, 16, "i32")  # quantized_dimension
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        scalar(op._tab, 4, "i32")  # opcode_index
        vector(op._tab, 6, 4, "i32")  # inputs
        vector(op._tab, 8, 4, "i32")  # outputs
        scalar(op._tab, 10, "u8")  # builtin_options_type
        options = op.BuiltinOptions()
        if options is not None:
            table_fields(options)
    vector(sg._tab, 6, 4, "i32")  # subgraph inputs
    vector(sg._tab, 8, 4, "i32")  # subgraph outputs
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        scalar(code._tab, 4, "u8")  # deprecated_builtin_code
        scalar(code._tab, 10, "i32")  # builtin_code
    return sites


INTERESTING = {
    "i32": [-1, 0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 65535, 2**31 - 1, -(2**31)],
    "i64": [-1, 0, 1, 127, 128, -128, -129, 2**31, -(2**63)],
    "u8": [0, 1, 2, 3, 4, 5, 7, 9, 16, 127, 128, 254, 255],
    "f32": [0.0, -1.0, 1.0, float("nan"), float("inf"), 1e-30, 1e30, 1 / 256, 2.0],
}
FORMATS = {"i32": "<i", "i64": "<q", "u8": "<B", "f32": "<f"}


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    """One to three mutations; returns the mutant and a description of each."""
    buf = bytearray(data)
    sites = field_sites(data)
    done = []
    for _ in range(int(rng.integers(1, 4))):
        choice = rng.choice(["field", "field", "field", "flip", "byte", "truncate"])
        if choice == "field" and sites:
            pos, kind = sites[int(rng.integers(len(sites)))]
            old = struct.unpack_from(FORMATS[kind], buf, pos)[0]
            pool = INTERESTING[kind] + ([old + 1, old - 1, old * 2] if kind in ("i32", "i64") else [])
            value = pool[int(rng.integers(len(pool)))]
            if kind == "u8":
                value %= 256
            elif kind == "i32":
                value = (value + 2**31) % 2**32 - 2**31
            elif kind == "i64":
                value = (value + 2**63) % 2**64 - 2**63
            struct.pack_into(FORMATS[kind], buf, pos, value)
            done.append(f"{kind} field at {pos}: {old} -> {value}")
        elif choice == "flip":
            pos, bit = int(rng.integers(len(buf))), int(rng.integers(8))
            buf[pos] ^= 1 << bit
            done.append(f"flip bit {bit} of byte {pos}")
        elif choice == "byte":
            pos, value = int(rng.integers(len(buf))), int(rng.integers(256))
            buf[pos] = value
            done.append(f"byte {pos} -> {value}")
        else:
            cut = int(rng.integers(len(buf)))
            del buf[cut:]
            done.append(f"truncate to {cut} bytes")
            break
    return bytes(buf), done


def mutant(name: str, index: int, seed: int = 0) -> tuple[bytes, list[str]]:
    """Mutant ``index`` of seed model ``name``: reproducible from these three values."""
    return mutate(seeds()[name], np.random.default_rng([seed, index, sum(name.encode())]))


def structure(graph) -> str:
    """The graph without its constants' values: mutants that share it run the same C code."""
    ops = [(op.kind, op.inputs, op.outputs, sorted(op.options.items())) for op in graph.ops]
    tensors = [(n, t.shape, t.dtype, t.is_constant, None if t.quantization is None else
                (t.quantization.scale.tobytes(), t.quantization.zero_point.tobytes())) for n, t in graph.tensors.items()]
    return repr((ops, tensors, graph.inputs, graph.outputs))


def run_mutant(data: bytes, work: pathlib.Path, pallas: bool, built: set[str] | None = None) -> str:
    """Import, execute, export, build and run one mutant; returns what happened. Raises on any
    exception other than ValueError, on JAX and C disagreeing about the graph, and on any
    sanitizer finding (a failed host run). With ``built``, a mutant whose structure was already
    built and run (only constant values differ) is not built again."""
    try:
        graph = tflite_import.from_bytes(data)
    except ValueError as e:
        assert str(e) and "\n" not in str(e), "a refusal is one line"
        return "refused at import"
    verdicts = {}
    outputs = {}
    try:
        inputs = tflm.random_inputs(graph, 2, seed=1)
        outputs["jax"] = [np.asarray(o) for o in execute.compile_graph(graph, pallas=pallas)(
            *(jnp.asarray(x) for x in inputs))]
        verdicts["jax"] = "ran"
    except ValueError as e:
        verdicts["jax"] = f"refused: {e}"
    try:
        mcu.export(graph, work)
        verdicts["c"] = "exported"
    except ValueError as e:
        verdicts["c"] = f"refused: {e}"
    jax_ok, c_ok = verdicts["jax"] == "ran", verdicts["c"] == "exported"
    assert jax_ok == c_ok, f"JAX and the C export disagree: {verdicts}"
    if not jax_ok:
        return "refused by both runtimes"
    if built is not None:
        if structure(graph) in built:
            return "ran in JAX, exported (C built for the same structure)"
        built.add(structure(graph))
    run = build.run_host(build.build_host(work, sanitize=True), mcu.pack_inputs(graph, inputs))
    for ours, theirs in zip(mcu.unpack_outputs(graph, run.outputs), outputs["jax"], strict=True):
        np.testing.assert_array_equal(ours, theirs, err_msg="C and JAX differ on the mutant")
    return "ran in both"


def fuzz(count: int, tmp_path: pathlib.Path, pallas: bool, seed: int = 0, shared: bool = True,
         every_build: bool = True) -> dict[str, int]:
    names = [n for n in seeds() if shared or n not in SHARED_SEEDS]
    built: set[str] | None = None if every_build else set()
    tally: dict[str, int] = {}
    for index in range(count):
        name = names[index % len(names)]
        data, mutations = mutant(name, index, seed)
        work = tmp_path / f"m{index}"
        try:
            result = run_mutant(data, work, pallas, built)
        except Exception as e:
            raise AssertionError(f"mutant {index} of {name} (seed {seed}; {mutations}): {type(e).__name__}: "
                                 f"{str(e)[:2000]}") from e
        tally[result] = tally.get(result, 0) + 1
    return tally


def test_field_sites_cover_every_table_kind():
    sites = field_sites(seeds()["op_mix"])
    kinds = {k for _, k in sites}
    assert kinds == {"i32", "i64", "u8", "f32"} and len(sites) > 200


def test_quick_fuzz(tmp_path):
    """300 mutants of the project-built seeds; C built once per mutant structure."""
    tally = fuzz(300, tmp_path, pallas=False, shared=False, every_build=False)
    assert sum(tally.values()) == 300
    assert tally.get("ran in both", 0) > 0  # some mutants stay valid and run through every stage


@pytest.mark.slow
def test_long_fuzz(tmp_path):
    tally = fuzz(1600, tmp_path, pallas=True, seed=1)
    assert sum(tally.values()) == 1600 and tally.get("ran in both", 0) > 0
