"""MCU export benchmark: per model and schedule, executed Cortex-M7 instructions under QEMU (and
MACs per instruction), the ratio to CMSIS-NN's instructions, peak SRAM and its ratio to TFLite
Micro's arena, and whether the image fits the board (SRAM with the stack, flash with the code).
Models: the reference models found through ``models.zoo`` ($TINYPALLAS_MODELS, then ../shared/tflite
beside the repository; README.md, "Reference models"), or, where there are none, the stand-ins it
builds (named ``standin_...``: their figures are not the reference models').

Schedules: ``portable`` (whole tensors, in-place overlap), ``portable min-SRAM`` (the patch
schedule with the smallest peak), ``cmsis-nn`` and ``cmsis-nn min-SRAM`` (when $CMSIS_NN_ROOT
is set; min-SRAM runs 1x1 convs through arm_convolve_s8 where that lets them run in place), and
``specialized`` (the autotuner's schedule for the model and board when one is stored, else the
default: int16 weights within the board's flash, peak SRAM at most the portable default's).
Every run is checked bit-exact against TFLite Micro on the same input. Peak SRAM is the
arena: the generated model reads its input where the caller holds it (zero-copy; the harness
keeps it outside the board's SRAM, as a sensor buffer would be), so the input's bytes
(``caller_input_bytes``) are not in it, while TFLite Micro's arena holds its input tensor.

    python benchmarks/mcu.py [--board stm32f746] [--models GLOB] [--out benchmarks/results/mcu.json] [--no-qemu] [--layers]
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mcu
from autotune import results
from mcu import build, codegen, specialized, tune
from models import tflite_import, tflm, zoo


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "missing"


def schedules(path: pathlib.Path, graph, board: mcu.Board) -> dict[str, tuple[codegen.Config, str]]:
    """name -> (config, where it came from)."""
    out = {"portable": (codegen.Config(), "default"), "portable min-SRAM": (codegen.min_sram_config(graph), "min_sram_config")}
    if os.environ.get("CMSIS_NN_ROOT"):
        cmsis = codegen.Config(backend="cmsis-nn")
        out["cmsis-nn"] = (cmsis, "default")
        out["cmsis-nn min-SRAM"] = (codegen.min_sram_config(graph, cmsis), "min_sram_config")
    tuned = tune.tuned_config(str(path), board.name)
    if tuned is not None and tuned.backend == "specialized":
        out["specialized"] = (tuned, "tuned (python -m autotune sweep)")
    else:
        out["specialized"] = (codegen.specialized_config(graph, flash_bytes=board.flash_bytes),
                              "default (specialized_config)")
    return out


def describe(config: codegen.Config) -> str:
    """A short label of a schedule for the table (the JSON holds the whole config)."""
    parts = [config.backend]
    if config.patch_split >= 0:
        parts.append(f"patches 0..{config.patch_split} {config.patch_grid}x{config.patch_grid}")
    knobs: dict[str, int] = {}
    for _, knob, value in config.layer_options:
        knobs[f"{knob}={value}"] = knobs.get(f"{knob}={value}", 0) + 1
    parts += [f"{n}x {k}" for k, n in sorted(knobs.items())]
    if config.flash_budget:
        parts.append(f"flash {config.flash_budget // 1024} KB")
    return ", ".join(parts)


def marker_macs(graph, markers: list[str]) -> list[int]:
    """MACs of what each per-layer marker measures: ``op I ...`` one op, ``ops 0..I ...`` a patched segment."""
    out = []
    for m in markers:
        first, _, last = m.split()[1].partition("..")
        ops = range(int(first), int(last or first) + 1)
        out.append(sum(specialized.op_macs(graph, graph.ops[i]) for i in ops))
    return out


def bench(path: pathlib.Path, board: mcu.Board, qemu: bool, layers: bool = False) -> dict:
    graph = tflite_import.load(str(path))
    arena = tflm.arena_bytes(str(path))
    macs = specialized.macs(graph)
    row = {"model": path.name, "tflite_bytes": path.stat().st_size, "tflm_arena_total": arena["total"],
           "tflm_arena_head": arena["head"], "macs": macs,
           "caller_input_bytes": sum(graph.tensors[n].nbytes for n in graph.inputs), "schedules": {}}
    inputs = mcu.random_inputs(graph, 1, seed=0)
    x = mcu.pack_inputs(graph, inputs)
    want = tflm.run(str(path), *inputs)
    with tempfile.TemporaryDirectory() as tmp:
        chosen = schedules(path, graph, board)
        lowered = {name: codegen.export(graph, pathlib.Path(tmp) / name, config) for name, (config, _) in chosen.items()}
        # instruction counts do not depend on the memory size: what does not fit the chosen
        # board runs on the largest profile with the same core
        run_board = max((b for b in mcu.BOARDS.values() if b.cpu == board.cpu), key=lambda b: b.sram_bytes)
        row["qemu_board"] = run_board.name if qemu else None
        for name, low in lowered.items():
            config, origin = chosen[name]
            entry = {"config": repr(config), "schedule": describe(config), "origin": origin,
                     "peak_sram": low.peak_sram_bytes, "sram_ratio_vs_tflm": round(low.peak_sram_bytes / arena["total"], 3),
                     "const_bytes": low.flash_bytes, "kernels": sorted({layer["kernel"].split()[0] for layer in low.layers})}
            problems = board.check_fit(low.peak_sram_bytes, low.flash_bytes)
            if qemu:
                elf = build.build_target(pathlib.Path(tmp) / name, run_board)
                sizes = build.section_sizes(elf)
                entry["flash_bytes"] = sizes["text"] + sizes["data"]
                entry["flash_ratio_vs_tflite"] = round(entry["flash_bytes"] / row["tflite_bytes"], 3)
                problems = board.check_fit(low.peak_sram_bytes, entry["flash_bytes"])
                run = build.run_qemu(elf, run_board, x, timeout=1800)
                got = mcu.unpack_outputs(graph, run.outputs)
                entry["bit_exact_vs_tflm"] = all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
                entry["instructions"] = run.instructions[0]
                entry["macs_per_instruction"] = round(macs / run.instructions[0], 3)
                if layers:
                    elf = build.build_target(pathlib.Path(tmp) / name, run_board, profile_layers=True)
                    counts = build.run_qemu(elf, run_board, x, timeout=1800).layer_instructions
                    entry["layers"] = [{"layer": m, "instructions": n, "macs": k,
                                        "macs_per_instruction": round(k / n, 3) if n else None}
                                       for m, n, k in zip(low.markers, counts, marker_macs(graph, low.markers), strict=True)]
            entry["fits"] = not problems
            entry["does_not_fit"] = problems
            row["schedules"][name] = entry
    reference = row["schedules"].get("cmsis-nn", {}).get("instructions")
    for entry in row["schedules"].values():
        if reference and entry.get("instructions"):
            entry["instructions_ratio_vs_cmsis_nn"] = round(entry["instructions"] / reference, 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--board", default="stm32f746")
    ap.add_argument("--models", default="*", help="glob over model names, e.g. 'mlperf_tiny_*'")
    ap.add_argument("--out", default="results/benchmark_mcu.json")
    ap.add_argument("--no-qemu", action="store_true", help="skip the Cortex-M build and instruction counts")
    ap.add_argument("--layers", action="store_true",
                    help="also record per-layer instruction counts and MACs per instruction in the JSON (a profiled "
                         "build per schedule: each layer in every backend's form, side by side)")
    args = ap.parse_args()
    board = mcu.board(args.board)
    qemu = not args.no_qemu and bool(shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc"))
    if not zoo.references():
        print(f"no reference models in {', '.join(map(str, zoo.search_path()))}: benchmarking the stand-ins "
              f"models.zoo builds instead (to use the reference models: {zoo.HOW_TO_GET})", file=sys.stderr)
    names = [n for n in zoo.suite_models() if fnmatch.fnmatch(n, args.models) or fnmatch.fnmatch(f"{n}.tflite", args.models)]
    if not names:
        print(f"error: no model matches --models {args.models!r}; the models are: {', '.join(zoo.suite_models())}",
              file=sys.stderr)
        sys.exit(2)
    env = {"board": board.name, "qemu_machine": board.qemu_machine, "cmsis_nn_root": os.environ.get("CMSIS_NN_ROOT"),
           "gcc_arm": _version(["arm-none-eabi-gcc", "--version"]), "qemu": _version(["qemu-system-arm", "--version"])}
    if os.environ.get("CMSIS_NN_ROOT"):
        from mcu import cmsis_nn

        env["cmsis_nn_content_sha256"] = cmsis_nn.content_key(cmsis_nn.root())
        env["cmsis_nn_commit"] = _version(["git", "-C", os.environ["CMSIS_NN_ROOT"], "rev-parse", "HEAD"])
    doc = results.benchmark_document("mcu", {"board": board.name, "models": args.models, "qemu": qemu,
                                             "layers": args.layers}, interpreted=False)
    doc["env"].update(env)
    for name in names:
        path = zoo.model(name)
        row = {"section": board.name, "label": path.name, "problem": {"model": path.name, "board": board.name},
               **bench(path, board, qemu, args.layers)}
        results.add_row(doc, args.out, row)
    results.print_tables(doc, args.out)  # the tables of `python -m autotune report OUT`


if __name__ == "__main__":
    main()
