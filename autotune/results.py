"""Results bundles: everything needed to regenerate a paper's table from a sweep.

A bundle is a folder holding ``trials.csv`` and ``trials.json`` (every trial of every study in the
sweep: params, objectives, state, timing spread, errors), ``best_configs.json``, ``env.json``
(versions, device, driver, seed, command line) and PNG plots.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import pathlib
import platform as py_platform
import shutil
import subprocess
import sys

import jax
import numpy as np
import optuna

from kernels import platform


def environment(seed: int | None = None) -> dict:
    """Versions, device and driver: what a reader needs to reproduce a number."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "os": py_platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "optuna": optuna.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device_kind": platform.device_kind(),
        "device_count": jax.device_count(),
        "interpreted": platform.interpret_default(),
        "timing_note": ("CPU: timings are of the Pallas *interpreter*, useful for testing the "
                        "tuner, not as kernel speed") if platform.interpret_default() else "compiled kernels",
        "seed": seed,
        "argv": sys.argv,
    }
    if shutil.which("nvidia-smi"):
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                timeout=5, cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    env["git_commit"] = commit if len(commit) == 40 else None
    return env


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {
            "study": study.study_name,
            "number": t.number,
            "state": t.state.name,
            "values": None if t.values is None else [v if math.isfinite(v) else None for v in t.values],
            "params": t.user_attrs.get("params", t.params),
            "duration_seconds": t.duration.total_seconds() if t.duration else None,
        }
        for key in ("compile_seconds", "median_seconds", "p10_seconds", "p90_seconds", "repeats",
                    "calls_per_sample", "spread", "noisy", "violations", "error", "is_default"):
            if key in t.user_attrs:
                row[key] = t.user_attrs[key]
        rows.append(row)
    return rows


def write_bundle(directory: pathlib.Path, results: list, env: dict) -> pathlib.Path:
    """Write the bundle of a sweep (a list of ``TuneResult``) into ``directory``."""
    from autotune import plots

    directory.mkdir(parents=True, exist_ok=True)
    rows = [row for r in results for row in trial_rows(r.study)]
    (directory / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
    columns = ["study", "number", "state", "values", "params", "duration_seconds", "compile_seconds",
               "median_seconds", "p10_seconds", "p90_seconds", "repeats", "calls_per_sample", "spread", "noisy",
               "violations", "error", "is_default"]
    with open(directory / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    best = [
        {"kernel": r.space.kernel, "problem": r.space.problem, "study": r.study.study_name,
         "params": r.best_params, "values": r.best_values, "default_values": r.default_values}
        for r in results
    ]
    (directory / "best_configs.json").write_text(json.dumps(best, indent=1))
    (directory / "env.json").write_text(json.dumps(env, indent=1))
    for r in results:
        plots.plot_study(r.study, directory)
    return directory
