"""Tables from committed results (`report`), re-measuring a committed bundle (`replay`), the
environment record, and the benchmarks' CPU modes."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from autotune import cli, measure, report, results
from tests.conftest import REPO

DATA = REPO / "tests" / "data"
BUNDLE = DATA / "bundle_matmul_cpu"
BENCHMARK = DATA / "benchmark_matmul_cpu.json"
COMMITTED = REPO / "benchmarks" / "results"


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
    (tmp_path / "other.json").write_text(json.dumps({"schema": report.SCHEMA, "benchmark": "fft", "rows": []}))
    mcu = json.loads((COMMITTED / "mcu.json").read_text())
    del mcu["rows"][0]["schedules"]
    (tmp_path / "damaged.json").write_text(json.dumps(mcu))
    cases = {
        "x.json": "not a sweep bundle", "missing.json": "no such file", "": "not a sweep bundle",
        "other.json": "benchmark 'fft' has no table reader", "damaged.json": "damaged mcu results",
    }
    for name, message in cases.items():
        assert cli.main(["report", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (name, err)
    committed = str(COMMITTED / "mcu.json")
    for argv, message in [(["--table", "mcu:nope"], "matches none of these tables: mcu:summary, mcu:schedules"),
                          (["--columns", "1,99"], "'99' is not a column of mcu:summary"),
                          (["--columns", ""], "'' is not a column")]:
        assert cli.main(["report", committed, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)


def test_report_selects_tables_and_columns(capsys):
    committed = str(COMMITTED / "mcu.json")
    assert cli.main(["report", committed, "--table", "mcu:summary", "--columns", "model,TFLM arena,2",
                     "--format", "csv"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "model,TFLM arena,specialized instr. / CMSIS-NN"
    doc = json.loads((COMMITTED / "mcu.json").read_text())
    assert len(lines) == 1 + len(doc["rows"])
    first = doc["rows"][0]
    assert lines[1] == (f"{report.model_label(first['model'])},\"{first['tflm_arena_total']:,}\","
                        f"{first['schedules']['specialized']['instructions_ratio_vs_cmsis_nn']:.3f}")


def test_report_reads_the_committed_mcu_results():
    """Every figure of the MCU tables comes from the benchmark/2 document benchmarks/mcu.py writes."""
    doc = json.loads((COMMITTED / "mcu.json").read_text())
    assert doc["schema"] == report.SCHEMA and doc["benchmark"] == "mcu"
    summary, schedules = report.load(COMMITTED / "mcu.json")
    assert (summary.name, schedules.name) == ("mcu:summary", "mcu:schedules")
    assert len(summary.rows) == len(doc["rows"]) == 9
    assert len(schedules.rows) == sum(len(r["schedules"]) for r in doc["rows"])
    runs = [e["bit_exact_vs_tflm"] for r in doc["rows"] for e in r["schedules"].values()]
    assert f"bit-exact with TFLite Micro in {sum(runs)} of {len(runs)} runs" in summary.notes
    for row, cells in zip(doc["rows"], summary.rows, strict=True):
        s = row["schedules"]
        assert cells[1] == f"{s['specialized']['instructions_ratio_vs_cmsis_nn']:.3f}"
        assert cells[2] == f"{s['specialized']['peak_sram']:,} ({s['portable']['peak_sram']:,})"
        assert cells[3].startswith(f"{s['cmsis-nn']['sram_ratio_vs_tflm']:.3f}, "
                                   f"{s['cmsis-nn min-SRAM']['sram_ratio_vs_tflm']:.3f} (")
        like_for_like = (s["cmsis-nn min-SRAM"]["peak_sram"] + row["caller_input_bytes"]) / row["tflm_arena_total"]
        assert cells[4] == f"{like_for_like:.3f}" and cells[5] == f"{row['tflm_arena_total']:,}"


# The first llama_cpu.json (commit d5466e5, since re-measured as a benchmark/2 document), as it was.
EARLIER_LLAMA_CPU = {
    "env": {"date_utc": "2026-11-25T23:38:02+00:00", "jax": "0.10.2", "device_kind": "cpu", "interpreted": True,
            "git_commit": "d5466e52ca3e25beabdb3d567fcfdb7f1b9364e6"},
    "kind": "cpu", "model": "SmolLM2-135M-Instruct Q4_1 (bundled)", "context": 19, "tokens": 64, "rounds": 3,
    "xla_tok_s_rounds": [8.240618285081707, 10.06618722412, 11.136880873173599],
    "llama_cpp_tok_s_rounds": [114.80570458347451, 140.52844381903358, 134.8015008510975],
    "llama_cpp_version": "0.3.36", "xla_tok_s": 11.136880873173599, "llama_cpp_tok_s": 140.52844381903358,
    "xla_over_llama_cpp": 0.07925001210086116, "tiny_pallas_interpret_tok_s": 2009.8805740240107,
}


def test_report_reads_the_earlier_llama_files_without_verdicts(tmp_path):
    earlier_cpu = results.save_json(tmp_path / "llama_cpu.json", EARLIER_LLAMA_CPU)
    text = report.report([COMMITTED / "llama_h100.json", earlier_cpu])
    assert "before the current LLaMA kernels" in text and "earlier protocol" in text
    assert "win" not in text and "loss" not in text and "parity" not in text
    gpu = json.loads((COMMITTED / "llama_h100.json").read_text())
    for row in gpu["results"]:
        assert f"| {row['format']} |" in text and f"{row['pallas_over_xla']:.2f}x" in text


def _synthetic_timing(median: float, rounds: int, rng: np.random.Generator) -> measure.Timing:
    samples = tuple(float(x) for x in median * (1 + 0.02 * rng.standard_normal(rounds)))
    return measure.Timing(compile_seconds=0.0, samples_seconds=samples, wall_samples_seconds=samples,
                          calls_per_sample=1)


def synthetic_llama_document() -> dict:
    """A benchmark/2 llama document as benchmarks/llama.py writes it, with synthetic timings (for
    testing tables, not speeds): decode and prefill, ours against llama.cpp."""
    rng = np.random.default_rng(0)
    doc = results.benchmark_document("llama", {"threads": [2], "tokens": 16})
    rounds = measure.MIN_ROUNDS
    for phase, tokens, seconds in (("decode", 1, {"llama.cpp": 8e-3, "cpu": 6e-3, "cpu-q8": 8.1e-3}),
                                   ("prefill", 256, {"llama.cpp": 0.2, "cpu": 0.5, "cpu-q8": 0.45})):
        comparison = measure.Comparison({name: _synthetic_timing(s, rounds, rng) for name, s in seconds.items()},
                                        baseline="llama.cpp", rounds=rounds)
        contenders = {name: {"what": name} for name in seconds}
        doc["rows"].append(results.comparison_row(phase, "threads=2", {"threads": 2, "phase": phase}, comparison,
                                                  contenders, tokens_per_call=tokens))
    return doc


def test_every_committed_result_has_a_reader():
    for path in sorted(COMMITTED.glob("*.json")):
        tables = report.load(path)
        assert tables and all(t.name and t.rows for t in tables), path


def test_report_shows_llama_rows_in_tokens_per_second(tmp_path, capsys):
    """tok/s is tokens per call over the median, its interval from the time's; ratios and verdicts
    as the comparison measured them."""
    doc = synthetic_llama_document()
    path = tmp_path / "llama_cpu.json"
    results.save_json(path, doc)
    assert cli.main(["report", str(path), "--table", "llama:*", "--columns", "contender,4,5,verdict"]) == 0
    out = capsys.readouterr().out
    assert out.count("| contender | contender (tok/s) [95% CI] | speed-up [95% CI] | verdict |") == 2
    for row in doc["rows"]:
        c, tokens = row["comparison"], row["tokens_per_call"]
        for name, ratio in c["ratios"].items():
            t = c["timings"][name]
            rate = report.with_interval(report.sig3(tokens / t["median_seconds"]),
                                        report.sig3(tokens / t["ci_high_seconds"]),
                                        report.sig3(tokens / t["ci_low_seconds"]))
            assert f"| {name} | {rate} | {report.ratio_cell(ratio)} | {ratio['verdict']} |" in out
    verdicts = {row["section"]: {n: r["verdict"] for n, r in row["comparison"]["ratios"].items()} for row in doc["rows"]}
    assert verdicts["decode"]["cpu"] == "win" and verdicts["prefill"]["cpu"] == "loss"
    assert "tok/s = tokens per timed call / median time" in out


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


def test_mcu_benchmark_writes_the_document_report_reads(tmp_path):
    out = tmp_path / "mcu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mcu.py"), "--models", "*autoencoder*_int8",
                           "--no-qemu", "--out", str(out)], check=False, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == report.SCHEMA and doc["benchmark"] == "mcu" and doc["env"]["git_commit"]
    assert doc["env"]["interpreted"] is False and doc["settings"]["board"] == "stm32f746"
    assert [r["label"] for r in doc["rows"]] == [r["model"] for r in doc["rows"]] and len(doc["rows"]) == 1
    summary, schedules = report.load(out)
    assert report.render([summary, schedules]) in proc.stdout  # the script prints what `report` prints
    assert len(schedules.rows) == len(doc["rows"][0]["schedules"]) and "not run" in summary.notes[1]


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
