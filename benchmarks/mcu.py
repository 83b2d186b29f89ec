"""MCU export benchmark: per model, peak SRAM against TFLite Micro's arena, flash against the
.tflite size, executed Cortex-M7 instructions under QEMU (portable kernels; CMSIS-NN when
$CMSIS_NN_ROOT is set), and whether it fits the board. Schedules: ``default`` (whole tensors,
in-place overlap), ``min_sram`` (the patch-based schedule with the smallest peak SRAM) and
``cmsis-nn``. Models: the reference models found through ``models.zoo`` ($TINYPALLAS_MODELS, then
../shared/tflite beside the repository; README.md, "Reference models"), or, where there are none,
the stand-ins it builds (named ``standin_...``: their figures are not the reference models').

    python benchmarks/mcu.py [--board stm32f746] [--models GLOB] [--out results/mcu.json] [--no-qemu] [--layers]
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mcu
from autotune import results
from mcu import build, codegen, tflm
from models import tflite_import, zoo


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "missing"


def bench(path: pathlib.Path, board: mcu.Board, qemu: bool, layers: bool = False) -> dict:
    graph = tflite_import.load(str(path))
    arena = tflm.arena_bytes(str(path))
    row = {"model": path.name, "tflite_bytes": path.stat().st_size, "tflm_arena_total": arena["total"],
           "tflm_arena_head": arena["head"], "schedules": {}}
    schedules = {"default": codegen.Config(), "min_sram": codegen.min_sram_config(graph)}
    if os.environ.get("CMSIS_NN_ROOT"):
        schedules["cmsis-nn"] = codegen.Config(backend="cmsis-nn")
    x = mcu.pack_inputs(graph, mcu.random_inputs(graph, 1))
    with tempfile.TemporaryDirectory() as tmp:
        lowered = {name: codegen.export(graph, pathlib.Path(tmp) / name, c) for name, c in schedules.items()}
        fits = {name: not board.check_fit(low.peak_sram_bytes, low.flash_bytes) for name, low in lowered.items()}
        # instruction counts do not depend on the memory size: what does not fit the chosen
        # board runs on the largest profile with the same core
        run_board = board if all(fits.values()) else max(
            (b for b in mcu.BOARDS.values() if b.cpu == board.cpu), key=lambda b: b.sram_bytes)
        row["qemu_board"] = run_board.name if qemu else None
        for name, low in lowered.items():
            entry = {"config": repr(schedules[name]), "peak_sram": low.peak_sram_bytes, "fits": fits[name],
                     "sram_ratio_vs_tflm": round(low.peak_sram_bytes / arena["total"], 3), "const_bytes": low.flash_bytes}
            if qemu:
                elf = build.build_target(pathlib.Path(tmp) / name, run_board)
                sizes = build.section_sizes(elf)
                entry["flash_bytes"] = sizes["text"] + sizes["data"]
                entry["flash_ratio_vs_tflite"] = round(entry["flash_bytes"] / row["tflite_bytes"], 3)
                entry["instructions"] = build.run_qemu(elf, run_board, x, timeout=900).instructions[0]
                if layers:
                    elf = build.build_target(pathlib.Path(tmp) / name, run_board, profile_layers=True)
                    counts = build.run_qemu(elf, run_board, x, timeout=900).layer_instructions
                    entry["layers"] = [{"layer": m, "instructions": n} for m, n in zip(low.markers, counts)]
            row["schedules"][name] = entry
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--board", default="stm32f746")
    ap.add_argument("--models", default="*", help="glob over model names, e.g. 'mlperf_tiny_*'")
    ap.add_argument("--out", default="results/benchmark_mcu.json")
    ap.add_argument("--no-qemu", action="store_true", help="skip the Cortex-M build and instruction counts")
    ap.add_argument("--layers", action="store_true", help="also record per-layer instruction counts in the JSON")
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
    rows = [bench(zoo.model(n), board, qemu, args.layers) for n in names]

    def cell(r, sched, key, fmt="{:d}"):
        v = r["schedules"].get(sched, {}).get(key)
        return "-" if v is None else fmt.format(v)

    print(f"board {board.name}; instructions on {rows[0]['qemu_board'] if rows else '-'} (QEMU {board.qemu_machine})")
    print(f"{'model':52s} {'TFLM B':>7s} {'default':>8s} {'min-SRAM':>8s} {'ratio':>5s} {'flash/tfl':>9s} "
          f"{'instr default':>13s} {'instr min-SRAM':>14s} {'instr CMSIS-NN':>14s} {'CMSIS B':>8s} fits")
    for r in rows:
        print(f"{r['model'][:52]:52s} {r['tflm_arena_total']:7d} {cell(r, 'default', 'peak_sram'):>8s} "
              f"{cell(r, 'min_sram', 'peak_sram'):>8s} {cell(r, 'min_sram', 'sram_ratio_vs_tflm', '{:.3f}'):>5s} "
              f"{cell(r, 'default', 'flash_ratio_vs_tflite', '{:.3f}'):>9s} {cell(r, 'default', 'instructions'):>13s} "
              f"{cell(r, 'min_sram', 'instructions'):>14s} {cell(r, 'cmsis-nn', 'instructions'):>14s} "
              f"{cell(r, 'cmsis-nn', 'peak_sram'):>8s} {'yes' if r['schedules']['min_sram']['fits'] else 'NO'}")
    env = {**results.environment(), "board": board.name, "qemu_machine": board.qemu_machine, "cmsis_nn_root": os.environ.get("CMSIS_NN_ROOT"),
           "python": platform.python_version(), "gcc_arm": _version(["arm-none-eabi-gcc", "--version"]),
           "qemu": _version(["qemu-system-arm", "--version"]), "host": platform.platform()}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
