"""Results bundles and the environment record: everything needed to regenerate a paper's table.

A bundle is a folder holding ``trials.csv`` and ``trials.json`` (every trial of every study in the
sweep: the problem's fields, params, objectives, state, timing samples and intervals, errors),
``best_configs.json`` (each problem's best config with its timing), ``env.json`` (``environment()``)
and PNG plots. ``python -m autotune report`` turns bundles into tables; ``replay`` re-measures them.
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
from typing import TYPE_CHECKING

import jax
import numpy as np

from tuning import platform

if TYPE_CHECKING:  # optuna is needed for sweeps only; benchmarks without one run without it
    import optuna

REPO = pathlib.Path(__file__).resolve().parents[1]


def _version(package: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def _package_version() -> str | None:
    """tinypallas's version: installed metadata, else the pyproject.toml of this checkout."""
    found = _version("tinypallas")
    if found:
        return found
    try:
        import tomllib

        return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return py_platform.processor() or py_platform.machine()


def _cuda_libraries() -> dict:
    """CUDA runtime, cuDNN, cuBLAS, CUPTI versions as jaxlib's CUDA plugin reports them (GPU only)."""
    if platform.backend() != "gpu":
        return {}
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return {}
    if cuda_versions is None:
        return {}
    out = {}
    for name in ("cuda_runtime_get_version", "cuda_runtime_build_version", "cudnn_get_version",
                 "cudnn_build_version", "cublas_get_version", "cupti_get_version", "cufft_get_version",
                 "cusolver_get_version", "cusparse_get_version"):
        fn = getattr(cuda_versions, name, None)
        if fn is None:
            continue
        try:
            out[name.replace("_get_version", "").replace("_version", "")] = fn()
        except Exception as e:  # noqa: BLE001 -- a library the plugin cannot load is recorded, not fatal
            out[name] = f"unreadable: {type(e).__name__}"
    return out


_SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
               "power.limit", "persistence_mode", "compute_mode")


def _nvidia_smi() -> dict | str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"
    first = out.splitlines()[0] if out else ""
    values = [v.strip() for v in first.split(",")]
    return dict(zip(_SMI_FIELDS, values)) if len(values) == len(_SMI_FIELDS) else out


def environment(seed: int | None = None, warm_start_sources: dict | None = None,
                interpreted: bool | None = None) -> dict:
    """One record of what produced a number: code (git commit, dirty flag, package version),
    software (jax, jaxlib, optuna, CUDA, driver, cuDNN/cuBLAS where readable, ``XLA_FLAGS``),
    hardware (CPU model, GPU name, clocks, caches), the seed, the command line and, for sweeps,
    the warm-start sources of every study (``{study: [{"problem": ..., "params": ...}, ...]}``).

    interpreted: whether the timings are of the Pallas interpreter; a sweep passes what its search
        spaces declare, and None means Pallas kernels on this device (``platform.interpret_default()``).
    """
    commit = (_git("rev-parse", "HEAD") or "").strip()
    status = _git("status", "--porcelain", "--untracked-files=no")
    interpreted = platform.interpret_default() if interpreted is None else interpreted
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": commit if len(commit) == 40 else None,
        "git_dirty": None if status is None else bool(status.strip()),
        "package": "tinypallas",
        "package_version": _package_version(),
        "python": sys.version.split()[0],
        "os": py_platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "jax_cuda_plugin": _version("jax-cuda12-plugin") or _version("jax-cuda13-plugin"),
        "optuna": _version("optuna"),
        "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "jax_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("JAX_")},
        "backend": jax.default_backend(),
        "device_kind": platform.device_kind(),
        "device_count": jax.device_count(),
        "gpu": platform.gpu_properties() or None,
        "nvidia_smi": _nvidia_smi(),
        "cuda_libraries": _cuda_libraries() or None,
        "last_level_cache_bytes": platform.last_level_cache_bytes(),
        "interpreted": interpreted,
        "timing_note": ("CPU: timings are of the Pallas *interpreter*, useful for testing the tuner, not as "
                        "kernel speed") if interpreted else "compiled kernels",
        "timing_protocol": ("autotune.measure: compiled once, input sets rotated past the last-level cache, "
                            + ("device-side kernel time from CUPTI with wall time beside it"
                               if platform.backend() == "gpu" else "wall time of the compiled call")),
        "seed": seed,
        "argv": list(sys.argv),
        "warm_start_sources": warm_start_sources,
    }


# Timing fields of a trial (``autotune.measure.Timing.as_dict()``) kept in the bundle's rows.
TIMING_FIELDS = ("compile_seconds", "median_seconds", "ci_low_seconds", "ci_high_seconds", "p10_seconds",
                 "p90_seconds", "wall_median_seconds", "repeats", "calls_per_sample", "spread", "noisy", "timer",
                 "timer_note", "input_sets", "cold_cache", "samples_seconds", "kernels")
ROW_FIELDS = ("study", "kernel", "number", "state", "values", "params", "duration_seconds", *TIMING_FIELDS,
              "violations", "error", "is_default")


def _study_problem(study: optuna.Study) -> tuple[str | None, dict]:
    attrs = study.user_attrs
    try:
        problem = json.loads(attrs.get("problem", "{}"))
    except (TypeError, ValueError):
        problem = {}
    return attrs.get("kernel"), problem if isinstance(problem, dict) else {}


def trial_rows(study: optuna.Study) -> list[dict]:
    """One dict per trial: the study's kernel and problem fields, params, objectives, timing, errors."""
    kernel, problem = _study_problem(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {
            "study": study.study_name,
            "kernel": kernel,
            "problem": problem,
            "number": t.number,
            "state": t.state.name,
            "values": None if t.values is None else [v if math.isfinite(v) else None for v in t.values],
            "params": t.user_attrs.get("params", t.params),
            "duration_seconds": t.duration.total_seconds() if t.duration else None,
        }
        for key in (*TIMING_FIELDS, "violations", "error", "is_default"):
            if key in t.user_attrs:
                row[key] = t.user_attrs[key]
        rows.append(row)
    return rows


def _problem_column(key: str) -> str:
    """A problem field's column: its name, or ``problem_<name>`` where a trial field has that name."""
    return f"problem_{key}" if key in ROW_FIELDS or key == "problem" else key


def write_trials_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """``trials.csv``: the problem's fields as columns (``m``, ``n``, ``k``, ``dtype``, ...), then
    the trial's; lists and dicts as JSON."""
    problem_fields: list[str] = []
    for row in rows:
        for key in row.get("problem") or {}:
            if _problem_column(key) not in problem_fields:
                problem_fields.append(_problem_column(key))
    columns = ["study", "kernel", *problem_fields, *[c for c in ROW_FIELDS if c not in ("study", "kernel")]]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = {**row, **{_problem_column(k): v for k, v in (row.get("problem") or {}).items()}}
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v for k, v in flat.items()})


def _best_timing(result) -> dict | None:
    """The timing (median, interval, samples) of the trial that holds the best params."""
    import optuna

    for t in result.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("params") == result.best_params and "median_seconds" in t.user_attrs \
                and t.values and t.values[0] == (result.best_values or {}).get(result.space.objectives[0].name):
            return {key: t.user_attrs[key] for key in TIMING_FIELDS if key in t.user_attrs}
    return None


def write_bundle(directory: pathlib.Path, results: list, env: dict) -> pathlib.Path:
    """Write the bundle of a sweep (a list of ``TuneResult``) into ``directory``."""
    from autotune import plots

    directory.mkdir(parents=True, exist_ok=True)
    rows = [row for r in results for row in trial_rows(r.study)]
    (directory / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
    write_trials_csv(directory / "trials.csv", rows)
    best = [
        {"kernel": r.space.kernel, "problem": r.space.problem, "study": r.study.study_name,
         "params": r.best_params, "values": r.best_values, "default_values": r.default_values,
         "timing": _best_timing(r), "confirmed": r.confirmation}
        for r in results
    ]
    (directory / "best_configs.json").write_text(json.dumps(best, indent=1))
    (directory / "env.json").write_text(json.dumps(env, indent=1))
    for r in results:
        plots.plot_study(r.study, directory)
    return directory


# ---------------------------------------------------------------------------------------------
# Benchmark JSONs (read back by ``python -m autotune report``)
# ---------------------------------------------------------------------------------------------


def benchmark_document(benchmark: str, settings: dict, *, interpreted: bool | None = None, **extra) -> dict:
    """The JSON a benchmark writes: its name (the key of its reader in ``report.READERS``), the
    environment, its settings, then ``rows``."""
    from autotune import report

    return {"schema": report.SCHEMA, "benchmark": benchmark,
            "env": environment(seed=settings.get("seed"), interpreted=interpreted), "settings": settings, **extra,
            "rows": []}


def comparison_row(section: str, label: str, problem: dict, comparison, contenders: dict, **extra) -> dict:
    """One benchmark row: an interleaved ``measure.Comparison`` (raw samples included) and what each
    contender is (``{"what": "jnp.dot(a, b)", "config": ..., "xla_kernels": ...}``). ``report`` reads
    two optional extras: ``flops`` (per call: a TFLOP/s column) and ``tokens_per_call`` (the table
    in tok/s instead of microseconds)."""
    return {"section": section, "label": label, "problem": problem, "contenders": contenders,
            "comparison": comparison.as_dict(), **extra}


def add_row(doc: dict, path: str | pathlib.Path, row: dict) -> None:
    """Append ``row`` to a benchmark document, rewrite its JSON (a run stopped later keeps every
    finished row) and print one line: the row's ratios and verdicts, or its errors."""
    doc["rows"].append(row)
    save_json(path, doc)
    ratios = {name: f"{r['ratio']:.2f}x {r['verdict']}" for name, r in row.get("comparison", {}).get("ratios", {}).items()}
    print(f"{row['section']} {row['label']}: {ratios or row.get('errors') or 'done'}", flush=True)


def failed_row(section: str, label: str, problem: dict, error: Exception) -> dict:
    """The row of a problem that could not be measured (one failing is reported, not fatal)."""
    return {"section": section, "label": label, "problem": problem, "errors": [f"{type(error).__name__}: {str(error)[:500]}"]}


def print_tables(doc: dict, path: str | pathlib.Path) -> None:
    """The tables of a finished benchmark document, as ``python -m autotune report PATH`` prints them."""
    from autotune import report

    print(report.render(report.tables_of(doc, pathlib.Path(path).name)))
    print(f"wrote {path}")


def save_json(path: str | pathlib.Path, doc: dict) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path
