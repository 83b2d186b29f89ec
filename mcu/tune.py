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

import dataclasses
import functools
import hashlib
import os
import pathlib
import tempfile

import mcu
from mcu import boards, build, cmsis_nn, codegen, patch, specialized
from models import quantization, tflite_import, zoo
from tuning import tuned
from tuning.space import Knob, Objective, SearchSpace

KERNEL = "mcu"
DEFAULT_PROBLEMS = [{"model": "mlperf_tiny_kws01_dscnn_int8", "target": "stm32f746"}]
OBJECTIVES = (Objective("instructions"), Objective("peak_sram_bytes"))


def parse_model(model: str, target: str | None = None) -> dict:
    """``PATH.tflite`` or a reference model's name, on ``--target BOARD`` (default stm32f746)."""
    return {"model": model, "target": boards.board(target or "stm32f746").name}  # a ValueError names the boards


def targets() -> list[dict]:
    """The boards ``--target`` names (``python -m autotune list boards``)."""
    return [{"board": b.name, "cpu": b.cpu, "sram_kib": b.sram_bytes // 1024, "flash_kib": b.flash_bytes // 1024,
             "mhz": b.clock_hz // 1_000_000} for b in boards.BOARDS.values()]


def problem_key(path: str, target: str) -> dict:
    """The cache/study key of a model on a board: its file name and content hash."""
    digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]
    return {"model": pathlib.Path(path).name, "sha256": digest, "target": target}


@functools.lru_cache(maxsize=8)
def _graph(path: str):
    return tflite_import.load(path)


def pointwise_layers(graph) -> list[int]:
    return [i for i, op in enumerate(graph.ops) if codegen.is_pointwise(graph, op, quantization.op_params(graph, op))]


SPECIALIZED_KNOBS = ("kernel", "unroll", "rows", "strip", "fuse", "planes")  # per-layer knob names: kernel12, ...


def specialized_layers(graph) -> dict[int, dict[str, tuple[str, ...]]]:
    """The specialized backend's per-layer knobs: conv kernel (col2 / direct) and, for col2, the
    unroll; depthwise kernel (planar / portable), a planar one's strip and, where a 1x1 conv
    produces its input, whether it computes that input itself (fuse) and in how many planes;
    fully connected rows per pass."""
    out: dict[int, dict[str, tuple[str, ...]]] = {}
    params = [quantization.op_params(graph, op) for op in graph.ops]
    planar = codegen.specialized_depthwise(graph, params, codegen.Config(backend="specialized"))
    folded_graph, folded_params, _ = codegen.fold_pads(graph, params)
    for i, op in enumerate(graph.ops):
        if op.kind == "CONV_2D":
            out[i] = {"kernel": ("col2", "direct"), "unroll": ("2", "1")}
        elif i in planar:
            out[i] = {"kernel": ("planar", "portable"), "strip": codegen.LAYER_KNOBS["strip"]}
            if codegen.fusable_pointwise(folded_graph, folded_params, i) is not None:
                out[i].update(fuse=("none", "pointwise"), planes=("4", "2", "1"))
        elif op.kind == "FULLY_CONNECTED":
            out[i] = {"rows": ("4", "2", "1")}
    return out


def _condition(i: int, knob: str) -> dict:
    """When a specialized per-layer knob applies (besides the specialized backend)."""
    return {"unroll": {f"kernel{i}": ("col2",)}, "strip": {f"kernel{i}": ("planar",)},
            "fuse": {f"kernel{i}": ("planar",)}, "planes": {f"fuse{i}": ("pointwise",)}}.get(knob, {})


def to_config(params: dict) -> codegen.Config:
    layers = tuple(
        (int(k[len("layer"):]), v) for k, v in sorted(params.items()) if k.startswith("layer") and v != "default"
    )
    options = tuple(
        (int(k[len(knob):]), knob, str(v)) for k, v in sorted(params.items()) for knob in SPECIALIZED_KNOBS
        if k.startswith(knob) and k[len(knob):].isdigit()
    )
    return codegen.Config(
        backend=params.get("backend", "portable"),
        in_place=bool(params.get("in_place", True)),
        conv1x1=params.get("conv1x1", "1x1_unroll4"),
        layer_variants=layers,
        depthwise=params.get("depthwise", "overlap"),
        patch_split=int(params.get("patch_split", -1)),
        patch_grid=int(params.get("patch_grid", 2)),
        layer_options=options if params.get("backend") == "specialized" else (),
    )


def for_board(config: codegen.Config, board: boards.Board) -> codegen.Config:
    """A specialized schedule keeps int16 weights only within the board's flash."""
    if config.backend == "specialized" and not config.flash_budget:
        return dataclasses.replace(config, flash_budget=board.flash_bytes - codegen.SPECIALIZED_CODE_BYTES)
    return config


def measure_config(path: str, board: boards.Board, config: codegen.Config, samples: int = 1) -> dict:
    """Build ``path`` with ``config`` for ``board``, run under QEMU; mean instructions, MACs per
    instruction and peak SRAM."""
    graph = _graph(path)
    config = for_board(config, board)
    with tempfile.TemporaryDirectory(prefix="tinypallas-mcu-") as tmp:
        lowered = codegen.export(graph, tmp, config)
        elf = build.build_target(tmp, board)
        run = build.run_qemu(elf, board, mcu.pack_inputs(graph, mcu.random_inputs(graph, samples)))
    instructions = float(sum(run.instructions) / len(run.instructions))
    return {"instructions": instructions, "peak_sram_bytes": float(lowered.peak_sram_bytes),
            "macs_per_instruction": specialized.macs(graph) / instructions}


def search_space(problem: dict) -> SearchSpace:
    board = boards.board(problem.get("target", "stm32f746"))
    path = str(zoo.resolve(problem["model"]))  # a ValueError that says how to get a missing model
    graph = _graph(path)
    backends = tuple(b for b in codegen.BACKENDS if b != "cmsis-nn" or os.environ.get(cmsis_nn.ENV))
    portable = {"backend": ("portable",)}
    knobs = [
        Knob("backend", backends),  # first: the per-backend knobs below depend on it
        Knob("in_place", (True, False)),
        Knob("conv1x1", codegen.CONV_VARIANTS, when=portable),
        Knob("depthwise", codegen.DEPTHWISE_VARIANTS, when=portable),
        Knob("patch_split", (-1, *patch.candidate_splits(graph))),
        Knob("patch_grid", (2, 3, 4, 6, 8), when={"patch_split": tuple(patch.candidate_splits(graph))}),
    ]
    knobs += [Knob(f"layer{i}", ("default", *codegen.CONV_VARIANTS), when=portable) for i in pointwise_layers(graph)]
    for i, layer in specialized_layers(graph).items():
        for knob, choices in layer.items():
            knobs.append(Knob(f"{knob}{i}", choices, when={"backend": ("specialized",), **_condition(i, knob)}))
    flash = sum(t.nbytes for t in graph.tensors.values() if t.is_constant)
    # the default trial: the specialized backend's default schedule for this board
    start = codegen.specialized_config(graph, flash_bytes=board.flash_bytes)
    chosen = {(i, knob): value for i, knob, value in start.layer_options}
    default = {"backend": "specialized", "in_place": True, "patch_split": -1, "patch_grid": 2}
    for i, layer in specialized_layers(graph).items():
        for knob, choices in layer.items():
            default[f"{knob}{i}"] = chosen.get((i, knob), choices[0])

    def violations(params: dict) -> list[str]:
        config = to_config(params)
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
        default=default,
    )


def tuned_config(path: str, target: str) -> codegen.Config | None:
    """The schedule the autotuner stored for this model and board, if any (resolved as every
    kernel's config is, with no heuristic: the caller picks the default backend)."""
    board = boards.board(target)
    return tuned.resolve(KERNEL, problem_key(path, target), None, config_type=lambda **params: for_board(
        to_config(params), board), heuristic=lambda: None)
