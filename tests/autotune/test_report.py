"""Tables from committed results (`report`), re-measuring a committed bundle (`replay`), the
environment record, and the benchmarks' CPU modes."""
import csv
import json
import os
import subprocess
import sys

import pytest

from autotune import cli, report, results
from tests.conftest import REPO

DATA = REPO / "tests" / "data"
BUNDLE = DATA / "bundle_matmul_cpu"
BENCHMARK = DATA / "benchmark_matmul_cpu.json"


def test_trials_csv_carries_the_problem_fields_as_columns():
    with open(BUNDLE / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"m", "n", "k", "dtype", "kernel"} <= set(rows[0])
    assert {(r["m"], r["n"], r["k"]) for r in rows} == {("32", "48", "40"), ("64", "32", "48")}
    timed = [r for r in rows if r["state"] == "COMPLETE" and r["samples_seconds"]]
    assert timed and all(len(json.loads(r["samples_seconds"])) == int(r["repeats"]) for r in timed)


def test_trials_csv_keeps_a_problem_field_named_like_a_trial_field(tmp_path):
    trials = json.loads((BUNDLE / "trials.json").read_text())[:2]
    for t in trials:
        t["problem"] = {**t["problem"], "state": "streaming", "layers": [1, 2]}
    results.write_trials_csv(tmp_path / "trials.csv", trials)
    with open(tmp_path / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["problem_state"] for r in rows] == ["streaming"] * 2 and rows[0]["layers"] == "[1, 2]"
    assert [r["state"] for r in rows] == [t["state"] for t in trials] and rows[0]["m"] == str(trials[0]["problem"]["m"])


@pytest.mark.parametrize("fmt", report.FORMATS)
def test_report_renders_the_committed_bundle_and_benchmark(fmt, capsys):
    assert cli.main(["report", str(BUNDLE), str(BENCHMARK), "--format", fmt]) == 0
    out = capsys.readouterr().out
    best = json.loads((BUNDLE / "best_configs.json").read_text())
    doc = json.loads(BENCHMARK.read_text())
    for entry in best:  # every problem, with its best median as the table prints it
        assert report.us(entry["timing"]["median_seconds"]) in out
    for row in doc["rows"]:
        for ratio in row["comparison"]["ratios"].values():
            assert f"{ratio['ratio']:.2f}x" in out and ratio["verdict"] in out
    if fmt == "latex":
        assert out.count(r"\begin{tabular}") == 2
    elif fmt == "csv":
        tables = [t for t in out.split("\n\n") if t.strip()]
        assert len(tables) == 2 and all(len(next(csv.reader(t.splitlines()[-1:]))) > 3 for t in tables)
    else:
        assert "| problem |" in out and "interleaved rounds" in out


def test_report_reads_earlier_protocol_files_without_verdicts():
    text = report.report([REPO / "benchmarks" / "results" / "matmul_h100_bf16.json"])
    assert "earlier host-timed protocol" in text and "recorded at commit time" in text
    assert "win" not in text and "loss" not in text


def test_report_refuses_what_it_cannot_read(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[1, 2]")
    assert cli.main(["report", str(tmp_path / "x.json")]) == 2
    assert cli.main(["report", str(tmp_path / "missing.json")]) == 2
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "not a sweep bundle" in err and "no such file" in err


def test_replay_re_measures_the_committed_bundle(capsys):
    assert cli.main(["replay", str(BUNDLE), "--repeats", "10"]) == 0
    out = capsys.readouterr().out
    assert "replay of bundle_matmul_cpu" in out
    rows = [line for line in out.splitlines() if line.startswith("| matmul")]
    assert len(rows) == 2
    for line in rows:
        old, new, ratio, verdict = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert "[" in old and "[" in new and ratio.endswith("x")
        assert verdict in ("consistent", "faster here", "slower here")
    assert cli.main(["replay", str(BUNDLE), "--repeats", "3"]) == 2


def test_environment_records_code_software_hardware_and_warm_starts():
    env = results.environment(seed=7, warm_start_sources={"study-a": [{"problem": {"m": 1}, "params": {}}]})
    for key in ("git_commit", "git_dirty", "package_version", "jax", "jaxlib", "optuna", "xla_flags", "cpu_model",
                "device_kind", "last_level_cache_bytes", "argv", "timing_protocol"):
        assert key in env, key
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)
    assert env["seed"] == 7 and env["warm_start_sources"]["study-a"][0]["problem"] == {"m": 1}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["matmul", "conv", "int8"])
def test_benchmark_quick_mode_writes_a_report_ready_json(script, tmp_path):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--quick", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "TINYPALLAS_CACHE": str(tmp_path / "cache.json")})
    if script == "int8" and proc.returncode == 2 and "no .tflite models" in proc.stderr:
        pytest.skip("no reference .tflite models here: set $TINYPALLAS_MODELS")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == report.SCHEMA and doc["env"]["git_commit"] is not None
    compared = [r for r in doc["rows"] if "comparison" in r]
    assert compared and all(r["comparison"]["rounds"] >= 10 for r in compared)
    for r in compared:
        for t in r["comparison"]["timings"].values():
            assert len(t["samples_seconds"]) == r["comparison"]["rounds"]
    assert report.report([out])


@pytest.mark.slow
def test_gpu_check_dry_run_starts_every_stage(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], check=False,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OUT_DIR": str(tmp_path), "PYTHON": sys.executable,
                               "TINYPALLAS_CACHE": str(tmp_path / "cache.json")})
    summary = json.loads(next(tmp_path.glob("gpu_check_*_dry.json")).read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["gpu_tests", "matmul", "conv", "int8"], proc.stdout[-2000:]
    assert "test_device_time_of_a_1024_cubed_bf16_matmul" in stages["gpu_tests"]["output_tail"]
    for name in ("gpu_tests", "matmul", "conv"):
        assert stages[name]["exit"] == 0, stages[name]["output_tail"]
    if stages["int8"]["exit"] != 0:  # only for want of the reference models
        assert "no .tflite models" in stages["int8"]["output_tail"]
    for name in ("matmul", "conv"):
        assert report.report([next(tmp_path.glob(f"{name}_*_dry.json"))])
    assert summary["env"]["git_commit"] and proc.returncode == (0 if stages["int8"]["exit"] == 0 else 2)
