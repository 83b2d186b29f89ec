"""The autotuner: constraints, failures, storage, resume after SIGKILL, cache, warm start, CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import optuna
import pytest

from autotune import cli, tuner
from autotune.measure import time_callable
from kernels import matmul as mm
from tests.conftest import REPO
from tuning import tuned
from tuning.space import Knob, Objective, SearchSpace


def toy_space(problem=None) -> SearchSpace:
    """A space whose configs are jnp sums of different sizes; size 3 is illegal, size 4 'fails to compile'."""

    def fn(size):
        if size == 4:
            raise RuntimeError("Mosaic lowering failed: tile 4 not supported")
        return lambda x: jnp.sum(jnp.tile(x, size))

    return SearchSpace(
        kernel="toy",
        problem=problem or {"n": 1},
        knobs=(Knob("size", (1, 2, 3, 4)),),
        violations=lambda p: ["size=3 breaks the budget"] if p["size"] == 3 else [],
        to_config=lambda p: p["size"],
        fn=fn,
        make_inputs=lambda seed: (jnp.full((64,), float(seed)),),
        default={"size": 2},
    )


def test_constraints_failures_and_best(tmp_path):
    storage = f"sqlite:///{tmp_path}/t.db"
    result = tuner.tune(toy_space(), storage=storage, n_trials=16, seed=1, repeats=2, warmup=0)
    trials = result.study.trials
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 16  # FAILs are not counted
    assert trials[0].params == {"size": 2} and trials[0].user_attrs["is_default"]
    by_size = {}
    for t in trials:
        by_size.setdefault(t.params["size"], []).append(t)
    assert 3 in by_size and 4 in by_size  # TPE explored both bad choices at least once in 16 trials
    for t in by_size[3]:  # constraint: reported without running, never a failure
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.user_attrs["violations"] == ["size=3 breaks the budget"]
        assert t.constraints == {"violations": 1.0} and t.values[0] == float("inf")
    first, *again = by_size[4]  # a config that does not compile: FAIL with the reason, sweep continues
    assert first.state == optuna.trial.TrialState.FAIL and "Mosaic lowering failed" in first.user_attrs["error"]
    for t in again:  # sampled again: not compiled again, PRUNED so that the sampler moves on
        assert t.state == optuna.trial.TrialState.PRUNED
        assert t.user_attrs["error"] == f"same config as failed trial {first.number}"
    for t in by_size.get(1, []) + by_size[2]:
        assert t.user_attrs["median_seconds"] > 0 and "compile_seconds" in t.user_attrs
    assert result.best_params["size"] in (1, 2)
    assert tuned.lookup("toy", {"n": 1}) == result.best_params


def test_confirm_times_tuned_against_default_and_keeps_a_loser_out_of_the_cache(tmp_path):
    import dataclasses

    space = dataclasses.replace(toy_space(), knobs=(Knob("size", (1, 2, 3, 4, 50_000)),))
    result = tuner.tune(space, storage=f"sqlite:///{tmp_path}/t.db", n_trials=1, seed=0, repeats=2, warmup=0)
    assert result.best_params == {"size": 2}  # the default itself: nothing to time
    assert tuner.confirm(result) == {"kept": "default", "same_config": True}
    # a "best" that is 25,000x the work of the default, as a noisy sweep could pick it
    slow = tuner.TuneResult(result.study, space, {"size": 50_000}, {"seconds": 1e-9})
    confirmed = tuner.confirm(slow, rounds=10)
    assert confirmed["baseline"] == "default" and confirmed["rounds"] == 10
    assert len(confirmed["timings"]["tuned"]["samples_seconds"]) == 10
    ratio = confirmed["ratios"]["tuned"]
    assert ratio["verdict"] == "loss" and ratio["ratio_ci_high"] < 1 and confirmed["kept"] == "default"
    assert tuned.lookup("toy", {"n": 1}) == {"size": 2}  # the cache holds the default, not the loser
    assert tuner.confirm(tuner.TuneResult(result.study, dataclasses.replace(space, interpreted=True),
                                          {"size": 1}, {"seconds": 1.0})) is None  # interpreter speed: no verdict


def test_rerun_resumes_the_study(tmp_path):
    storage = f"sqlite:///{tmp_path}/t.db"

    def complete(result):
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in result.study.trials)

    first = tuner.tune(toy_space(), storage=storage, n_trials=4, seed=0, repeats=1, warmup=0)
    before = [(t.number, t.params, t.values) for t in first.study.trials]
    assert complete(first) == 4
    second = tuner.tune(toy_space(), storage=storage, n_trials=7, seed=0, repeats=1, warmup=0)
    after = [(t.number, t.params, t.values) for t in second.study.trials]
    assert complete(second) == 7 and after[:len(before)] == before
    third = tuner.tune(toy_space(), storage=storage, n_trials=7, seed=0, repeats=1, warmup=0)
    assert len(third.study.trials) == len(after)  # nothing left to do


def test_warm_start_enqueues_nearest_tuned_problem(tmp_path):
    storage = f"sqlite:///{tmp_path}/t.db"
    tuned.store("toy", {"n": 100}, {"size": 1}, seconds=1.0)
    tuned.store("toy", {"n": 100000}, {"size": 4}, seconds=1.0)
    result = tuner.tune(toy_space({"n": 120}), storage=storage, n_trials=3, seed=0, repeats=1, warmup=0)
    enqueued = [t.params["size"] for t in result.study.trials[:3]]
    assert enqueued[0] == 2  # the default first
    assert enqueued[1] == 1  # then the nearest tuned problem's best


def test_multi_objective_measure_space(tmp_path):
    space = SearchSpace(
        kernel="toy2", problem={"n": 1}, knobs=(Knob("x", (1, 2, 3, 4)),),
        violations=lambda p: [], to_config=lambda p: p["x"],
        measure=lambda x: {"instructions": 10.0 * x, "peak_sram_bytes": 100.0 / x},
        objectives=(Objective("instructions"), Objective("peak_sram_bytes")), default={"x": 1},
    )
    result = tuner.tune(space, storage=f"sqlite:///{tmp_path}/t.db", n_trials=6, seed=0)
    assert len(result.study.best_trials) >= 2  # a real trade-off: several Pareto points
    assert set(result.best_values) == {"instructions", "peak_sram_bytes"}


def test_space_needs_one_runner():
    with pytest.raises(ValueError, match="either fn= and make_inputs= .timed. or measure="):
        SearchSpace(kernel="x", problem={}, knobs=(), violations=lambda p: [], to_config=lambda p: p)


def test_time_callable_keeps_compile_apart():
    timing = time_callable(lambda: jnp.ones(8) * 2, warmup=1, repeats=5)
    assert timing.repeats == 5 and timing.compile_seconds > 0
    assert timing.p10_seconds <= timing.median_seconds <= timing.p90_seconds


def _finished(storage, study_name):
    study = optuna.load_study(study_name=study_name, storage=tuner.make_storage(storage))
    return study, [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_sigkilled_sweep_loses_no_trial_and_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path}/kill.db"
    env = {**os.environ, "TINYPALLAS_CACHE": str(tmp_path / "cache.json"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "autotune", "sweep", "--shape", "48x40x24", "--trials", "30",
           "--storage", storage, "--study-name", "kill", "--no-progress", "--results", str(tmp_path / "b1")]
    name = "kill-" + tuner.study_name_for(mm.search_space(mm.parse_shape("48x40x24")))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    completed = []
    while time.time() < deadline:
        time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"sweep ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
        try:
            _, completed = _finished(storage, name)
        except KeyError:
            continue
        if len(completed) >= 4:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(completed) >= 4, "the sweep made no progress before the deadline"
    _, survived = _finished(storage, name)
    kept = {(t.number, json.dumps(t.params, sort_keys=True), t.values[0]) for t in survived}
    assert len(survived) >= len(completed)

    cmd[cmd.index("--trials") + 1] = str(len(survived) + 3)
    cmd[-1] = str(tmp_path / "b2")
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=240)
    study, after = _finished(storage, name)
    after_set = {(t.number, json.dumps(t.params, sort_keys=True), t.values[0]) for t in after}
    assert kept <= after_set, "a trial completed before the kill is missing after resuming"
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    assert len(finished) >= len(survived) + 3


def test_cli_sweep_bundle_show_plot_export_import(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bundle = tmp_path / "bundle"
    assert cli.main(["sweep", "--shape", "40x24x72", "--trials", "5", "--no-progress",
                     "--results", str(bundle), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "interpret mode" in out and "results bundle" in out
    assert out.count("] trial ") == 5  # stdout is not a terminal: one line per trial
    assert (tmp_path / "results" / "autotune.sqlite3").exists()
    env = json.loads((bundle / "env.json").read_text())
    assert env["seed"] == 3 and env["jax"] and env["optuna"] and env["interpreted"] is True
    assert list(env["warm_start_sources"].values()) == [[]]  # the cache was empty: nothing but the default enqueued
    rows = json.loads((bundle / "trials.json").read_text())
    assert len(rows) == 5 and (bundle / "trials.csv").read_text().count("\n") == 6
    best = json.loads((bundle / "best_configs.json").read_text())
    assert best[0]["params"]["block_m"] in (16, 32, 64) and best[0]["values"]["seconds"] > 0
    assert list(bundle.glob("*-history.png")) and list(bundle.glob("*-tiles.png"))

    assert cli.main(["show"]) == 0
    assert "matmul" in capsys.readouterr().out
    assert cli.main(["plot", "-o", str(tmp_path / "plots")]) == 0
    assert list((tmp_path / "plots").glob("*.png"))

    exported = tmp_path / "configs.json"
    assert cli.main(["export", str(exported)]) == 0
    tuned.save_all({})
    assert tuned.lookup("matmul", mm.parse_shape("40x24x72")) is None
    assert cli.main(["import", str(exported)]) == 0
    assert tuned.lookup("matmul", mm.parse_shape("40x24x72")) == best[0]["params"]


def test_cli_errors_are_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"entries": {}}')
    for argv, message in ((["import", str(bad)], "not a file written by"),
                          (["sweep", "--shape", "12xfoo", "--trials", "1"], "not MxNxK"),
                          (["sweep", "--kernel", "nope"], "unknown kernel 'nope'"),
                          (["sweep", "--kernel", "conv2d", "--layer", "vgg"], "--layer 'vgg' is not offered")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "matmul.py"), "--shapes", "32x48x40", "--trials", "2",
                    "--storage", f"sqlite:///{tmp_path}/b.db", "--out", str(out)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path,
                   env={**os.environ, "TINYPALLAS_CACHE": str(tmp_path / "cache.json")})
    doc = json.loads(out.read_text())
    row = doc["rows"][0]
    assert doc["env"]["interpreted"] is True and doc["env"]["jax"]
    assert max(row["relative_error_vs_f32"].values()) < row["tolerance"]
    assert row["comparison"]["baseline"] == "xla" and row["comparison"]["ratios"]["default"]["ratio"] > 0


def test_conditional_knobs_are_sampled_only_when_they_apply(tmp_path):
    space = SearchSpace(
        kernel="toy3", problem={"n": 1},
        knobs=(Knob("algorithm", ("direct", "winograd")), Knob("tile", (2, 4), when={"algorithm": ("winograd",)})),
        violations=lambda p: [], to_config=lambda p: p,
        measure=lambda p: {"seconds": 1.0 + (p["tile"] if p["algorithm"] == "winograd" else 0.5)},
        default={"algorithm": "direct", "tile": 2},
    )
    result = tuner.tune(space, storage=f"sqlite:///{tmp_path}/t.db", n_trials=10, seed=0)
    for t in result.study.trials:
        assert ("tile" in t.params) == (t.params["algorithm"] == "winograd")
        assert t.user_attrs["params"]["tile"] in (2, 4)
    assert {t.params["algorithm"] for t in result.study.trials} == {"direct", "winograd"}
    assert result.best_params["algorithm"] == "direct"
