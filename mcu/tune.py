"""The MCU schedule as an autotuner search space: knobs of ``mcu.codegen.Config``, measured by
building for the board and counting executed instructions under QEMU, plus the planned peak
SRAM; configurations that overflow the board are rejected before anything is built.

Problem: ``{"model": PATH.tflite, "target": BOARD}`` (or a reference model's name, found through
``models.zoo``: ``$TINYPALLAS_MODELS``, then ``../shared/tflite`` beside the repository). It is keyed in the autotuner's studies and
cache by the model's content (file name and SHA-256), not its path, so a schedule tuned here is
found again from any working directory or machine; the cache entry (kernel name ``"mcu"``) is the
schedule ``python -m mcu export`` uses by default.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import tempfile

import mcu
from kernels.space import Knob, Objective, SearchSpace
from mcu import boards, build, cmsis_nn, codegen, patch
from models import quantization, tflite_import, zoo

KERNEL = "mcu"
DEFAULT_PROBLEMS = [{"model": "mlperf_tiny_kws01_dscnn_int8", "target": "stm32f746"}]
OBJECTIVES = (Objective("instructions"), Objective("peak_sram_bytes"))


def parse_shape(text: str) -> dict:
    """``--shape PATH.tflite[@BOARD]``."""
    path, _, target = text.partition("@")
    return {"model": path, "target": target or "stm32f746"}


def problem_key(path: str, target: str) -> dict:
    """The cache/study key of a model on a board: its file name and content hash."""
    digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]
    return {"model": pathlib.Path(path).name, "sha256": digest, "target": target}


@functools.lru_cache(maxsize=8)
def _graph(path: str):
    return tflite_import.load(path)


def pointwise_layers(graph) -> list[int]:
    return [i for i, op in enumerate(graph.ops) if codegen.is_pointwise(graph, op, quantization.op_params(graph, op))]


def to_config(params: dict) -> codegen.Config:
    layers = tuple(
        (int(k[len("layer"):]), v) for k, v in sorted(params.items()) if k.startswith("layer") and v != "default"
    )
    return codegen.Config(
        backend=params.get("backend", "portable"),
        in_place=bool(params.get("in_place", True)),
        conv1x1=params.get("conv1x1", "1x1_unroll4"),
        layer_variants=layers,
        depthwise=params.get("depthwise", "overlap"),
        patch_split=int(params.get("patch_split", -1)),
        patch_grid=int(params.get("patch_grid", 2)),
    )


def measure_config(path: str, board: boards.Board, config: codegen.Config, samples: int = 1) -> dict:
    """Build ``path`` with ``config`` for ``board``, run under QEMU; mean instructions and peak SRAM."""
    graph = _graph(path)
    with tempfile.TemporaryDirectory(prefix="tinypallas-mcu-") as tmp:
        lowered = codegen.export(graph, tmp, config)
        elf = build.build_target(tmp, board)
        run = build.run_qemu(elf, board, mcu.pack_inputs(graph, mcu.random_inputs(graph, samples)))
    return {"instructions": float(sum(run.instructions) / len(run.instructions)),
            "peak_sram_bytes": float(lowered.peak_sram_bytes)}


def search_space(problem: dict) -> SearchSpace:
    board = boards.board(problem.get("target", "stm32f746"))
    path = str(zoo.resolve(problem["model"]))  # a ValueError that says how to get a missing model
    graph = _graph(path)
    knobs = [
        Knob("in_place", (True, False)),
        Knob("conv1x1", codegen.CONV_VARIANTS),
        Knob("depthwise", codegen.DEPTHWISE_VARIANTS),
        Knob("patch_split", (-1, *patch.candidate_splits(graph))),
        Knob("patch_grid", (2, 3, 4, 6, 8), when={"patch_split": tuple(patch.candidate_splits(graph))}),
    ]
    if os.environ.get(cmsis_nn.ENV):
        knobs.append(Knob("backend", codegen.BACKENDS))
    knobs += [Knob(f"layer{i}", ("default", *codegen.CONV_VARIANTS)) for i in pointwise_layers(graph)]
    flash = sum(t.nbytes for t in graph.tensors.values() if t.is_constant)

    def violations(params: dict) -> list[str]:
        config = to_config(params)
        if config.backend != "portable" and config.patch_split >= 0:
            return ["patch-based inference runs on the portable backend only"]
        try:
            _, plan, _ = codegen.plan_schedule(graph, config)
        except ValueError as e:  # a split that cannot be patched
            return [str(e)]
        return board.check_fit(plan.peak_bytes, flash)

    return SearchSpace(
        kernel=KERNEL,
        problem=problem_key(path, board.name),
        knobs=tuple(knobs),
        violations=violations,
        to_config=to_config,
        measure=lambda config: measure_config(path, board, config),
        objectives=OBJECTIVES,
        default={"in_place": True, "conv1x1": "1x1_unroll4", "depthwise": "overlap", "patch_split": -1, "patch_grid": 2,
                 **({"backend": "portable"} if os.environ.get(cmsis_nn.ENV) else {}),
                 **{k.name: "default" for k in knobs if k.name.startswith("layer")}},
    )


def tuned_config(path: str, target: str) -> codegen.Config | None:
    """The schedule the autotuner stored for this model and board, if any."""
    from kernels import tuned

    params = tuned.lookup(KERNEL, problem_key(path, target))
    return None if params is None else to_config(params)
