"""The autotune command line and what it leaves behind: refusals in one line with no trial left over,
reproducible seeds, recorded warm starts, cache merging and temp files, tables, bundles on SIGTERM."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import types

import optuna
import pytest

from autotune import cli, plots, registry, tuner
from kernels.cpu import build as cpu_build
from tests.conftest import REPO
from tuning import tuned
from tuning.space import Knob, SearchSpace


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _refused(argv, capsys, *fragments) -> str:
    rc, _, err = _run(argv, capsys)
    assert rc == 2, (argv, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_bare_command_prints_help_and_sweep_help_lists_kernels_and_presets(capsys):
    rc, out, _ = _run([], capsys)
    assert rc == 0 and "sweep" in out and "list" in out
    rc, out, _ = _run(["sweep", "--help"], capsys)
    assert rc == 0
    for word in ("conv2d", "mobilenetv2", "kws01", "flash_attention", "bfloat16", "(default: 1)", "--dry-run"):
        assert word in out, word


def test_issue_battery_is_refused_in_one_line_and_leaves_no_trial(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    regular = tmp_path / "afile"
    regular.write_text("x")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a SQLite database" * 100)
    storage = f"sqlite:///{tmp_path}/s.db"
    sweep = ["sweep", "--shape", "16x16x16", "--storage", storage]
    _refused(["sweep", "--storage", f"sqlite:///{regular}/x.db"], capsys, "afile", "cannot create the folder")
    _refused(["sweep", "--storage", "notaurl:/x"], capsys, "is not a database URL", "sqlite:///")
    _refused(["sweep", "--storage", "sqlite:/x.db"], capsys, "is not a database URL")
    _refused(["sweep", "--storage", f"sqlite:///{corrupt}"], capsys, "corrupt.db", "cannot be opened")
    _refused(["list", "studies", "--storage", f"sqlite:///{corrupt}"], capsys, "cannot be opened")
    _refused(["sweep", "--target", "nosuchboard", "--model", "m.tflite"], capsys, "nosuchboard", "stm32f746")
    _refused(sweep + ["--trials", "0"], capsys, "--trials", "1 or more")
    _refused(sweep + ["--trials", "-1"], capsys, "--trials")
    _refused(sweep + ["--timeout", "-5"], capsys, "--timeout")
    _refused(sweep + ["--dtype", "int3"], capsys, "int3", "float32, bfloat16, float16, int8")
    _refused(["sweep", "--shape", "1000000000x1000000000x1000000000", "--storage", storage], capsys,
             "memory", "smaller --shape")
    _refused(["sweep", "--kernel", "conv2d", "--layer", "vgg", "--storage", storage], capsys, "mobilenetv2, resnet18")
    _refused(["export", str(tmp_path / "missing" / "x.json")], capsys, "does not exist")
    _refused(["plot", "--storage", storage], capsys, "no storage")
    # No run above created a study, let alone a RUNNING or WAITING trial.
    assert not (tmp_path / "s.db").exists() or not optuna.get_all_study_summaries(tuner.make_storage(storage))
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("content, fragment", [("[1, 2]", "holds a JSON list"), ('{"a": {"par', "not valid JSON"),
                                                 ('{"not a key": {"params": {}}}', "is not a cache key")])
def test_damaged_cache_is_named_with_the_fix(content, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tuned.cache_path().write_text(content)
    for argv in (["show"], ["sweep", "--shape", "16x16x16", "--dry-run"], ["export", str(tmp_path / "e.json")]):
        _refused(argv, capsys, str(tuned.cache_path()), fragment, "delete the file")


@pytest.mark.parametrize("doc, fragment", [
    ({"format": tuned.EXPORT_FORMAT}, "not a file written by"),
    ([1, 2], "not a file written by"),
    ({"format": tuned.EXPORT_FORMAT, "entries": [1]}, "holds a JSON list"),
    ({"format": tuned.EXPORT_FORMAT, "entries": {"nojson": {"params": {}}}}, "is not a cache key"),
    ({"format": tuned.EXPORT_FORMAT, "entries": {tuned.cache_key("matmul", {"m": 1}, "cpu", "0"): 3}}, "no params"),
])
def test_import_of_malformed_files_is_refused(doc, fragment, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    _refused(["import", str(bad)], capsys, "bad.json", fragment)
    assert not tuned.cache_path().exists()


def test_import_merges_keeping_the_faster_config(tmp_path, capsys):
    k1, k2, k3 = (tuned.cache_key("matmul", {"m": m}, "NVIDIA H200", "0.10.2") for m in (1, 2, 3))
    tuned.save_all({k1: {"params": {"block_m": 16}, "seconds": 2.0, "objective": "seconds"},
                    k2: {"params": {"block_m": 32}, "seconds": 1.0, "objective": "seconds"}})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": tuned.EXPORT_FORMAT, "entries": {
        k1: {"params": {"block_m": 64}, "seconds": 1.5, "objective": "seconds"},  # faster: replaces
        k2: {"params": {"block_m": 128}, "seconds": 3.0, "objective": "seconds"},  # slower: kept out
        k3: {"params": {"block_m": 256}, "seconds": 9.0, "objective": "seconds"}}}))  # new: added
    rc, out, _ = _run(["import", str(other)], capsys)
    assert rc == 0 and "added 1, replaced 1" in out and "kept 1" in out
    entries = tuned.load()
    assert [entries[k]["params"]["block_m"] for k in (k1, k2, k3)] == [64, 32, 256]


def test_cache_write_leaves_no_temp_file(monkeypatch):
    folder = tuned.cache_path().parent
    stale, fresh = folder / ".best_configs.stale.json", folder / ".best_configs.fresh.json"
    for path in (stale, fresh):
        path.write_text("{")
    old = time.time() - tuned.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    tuned.save_all({})
    assert not stale.exists() and fresh.exists()  # a young temp file may be another writer's

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuned.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tuned.save_all({"x": 1})
    assert sorted(p.name for p in folder.glob(".best_configs.*.json")) == [fresh.name]


def _deterministic_space() -> SearchSpace:
    """Eight x four x two configs; the cost is a fixed function of the params, so a sweep's trials
    depend on the sampler alone."""
    return SearchSpace(
        kernel="toy_deterministic", problem={"n": 1},
        knobs=(Knob("a", tuple(range(1, 9))), Knob("b", (1, 2, 4, 8)), Knob("c", ("x", "y"))),
        violations=lambda p: ["a*b > 32"] if p["a"] * p["b"] > 32 else [], to_config=lambda p: p,
        measure=lambda p: {"seconds": (p["a"] - 3) ** 2 + 0.1 * p["b"] + (0.5 if p["c"] == "x" else 0.0)},
        default={"a": 1, "b": 1, "c": "x"})


def test_same_seed_same_trials(tmp_path):
    def sequence(run: str, seed: int) -> list:
        result = tuner.tune(_deterministic_space(), storage=f"sqlite:///{tmp_path}/{run}.db", n_trials=12,
                            seed=seed, warm_start=False)
        return [(t.state.name, t.params, t.values) for t in result.study.trials]

    first, again, other = sequence("a", 7), sequence("b", 7), sequence("c", 8)
    assert first == again
    assert first != other  # the seed is what fixes the sequence


def test_warm_start_sources_are_recorded(tmp_path):
    space = _deterministic_space()
    tuned.store(space.kernel, {"n": 2}, {"a": 3, "b": 1, "c": "y"}, seconds=0.1)
    warm = tuner.tune(space, storage=f"sqlite:///{tmp_path}/w.db", n_trials=3, seed=0, write_cache=False)
    assert warm.study.user_attrs["warm_start"] == [{"problem": {"n": 2}, "params": {"a": 3, "b": 1, "c": "y"}}]
    assert warm.study.trials[1].params == {"a": 3, "b": 1, "c": "y"}
    cold = tuner.tune(space, storage=f"sqlite:///{tmp_path}/c.db", n_trials=3, seed=0, warm_start=False)
    assert cold.study.user_attrs["warm_start"] == []
    assert sum("fixed_params" in t.system_attrs for t in cold.study.trials) == 1  # the default only


def test_tune_validates_and_shows_progress(tmp_path, capsys):
    with pytest.raises(ValueError, match="n_trials=0"):
        tuner.tune(_deterministic_space(), storage=f"sqlite:///{tmp_path}/v.db", n_trials=0)
    with pytest.raises(ValueError, match="is not a database URL"):
        tuner.tune(_deterministic_space(), storage="sqlite:/x.db", n_trials=1)
    tuner.tune(_deterministic_space(), storage=f"sqlite:///{tmp_path}/p.db", n_trials=3, progress=True)
    assert capsys.readouterr().out.count("] trial ") == 3  # not a terminal here: a line per trial


def test_show_and_list_print_everything_in_three_formats(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    long_value = "v" * 150
    tuned.store("matmul", {"m": 1, "n": 2, "k": 3, "dtype": "float32"}, {"block_m": 16, "order": long_value},
                seconds=0.004, objective="seconds")
    rc, out, _ = _run(["show"], capsys)
    assert rc == 0 and f"order={long_value}" in out and "4 ms" in out  # piped: never cut to 80 columns
    rc, out, _ = _run(["show", "--format", "json"], capsys)
    assert json.loads(out)[0]["params"]["order"] == long_value and json.loads(out)[0]["value"] == 0.004
    rc, out, _ = _run(["show", "--format", "csv"], capsys)
    assert out.splitlines()[0] == "kernel,problem,device,jax,params,objective,value"
    for what, expected in (("kernels", "flash_attention"), ("layers", "mobilenetv2"), ("boards", "stm32f746")):
        rc, out, _ = _run(["list", what, "--format", "json"], capsys)
        assert rc == 0 and expected in out and json.loads(out)
    storage = f"sqlite:///{tmp_path}/s.db"
    tuner.tune(_deterministic_space(), storage=storage, n_trials=4, seed=0, study_name="det")
    rc, out, _ = _run(["list", "studies", "--storage", storage, "--format", "json"], capsys)
    (row,) = json.loads(out)
    assert (row["study"], row["kernel"], row["complete"], row["running"]) == ("det", "toy_deterministic", 4, 0)
    assert row["best"]
    err = _refused(["plot", "--storage", storage, "--study-name", "nope"], capsys, "no study named 'nope'")
    assert "list studies" in err


def test_layer_summary_figure(tmp_path):
    space = SearchSpace(kernel="toy_layers", problem={"n": 1}, knobs=(Knob("algorithm", ("direct", "winograd")),),
                        violations=lambda p: [], to_config=lambda p: p,
                        measure=lambda p: {"seconds": 1.0 if p["algorithm"] == "direct" else 0.5},
                        default={"algorithm": "direct"})
    result = tuner.tune(space, storage=f"sqlite:///{tmp_path}/l.db", n_trials=4, seed=0)
    assert result.best_params["algorithm"] == "winograd"
    path = plots.plot_layers([result, result], tmp_path / "layers.png", title="toy")
    assert path.exists() and path.stat().st_size > 1000


def test_sigterm_leaves_a_uniquely_named_bundle_and_no_running_trial(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TINYPALLAS_CACHE": str(tmp_path / "cache.json")}
    storage = f"sqlite:///{tmp_path}/term.db"
    proc = subprocess.Popen([sys.executable, "-m", "autotune", "sweep", "--shape", "16x16x16", "--trials", "200",
                             "--storage", storage, "--study-name", "term"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:  # a line per finished trial, as it finishes: stdout is a pipe
            lines.append(line)
            if sum("] trial " in x for x in lines) >= 3:
                break
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    (bundle,) = (tmp_path / "results" / "sweeps").iterdir()
    host = re.sub(r"[^A-Za-z0-9.-]+", "_", socket.gethostname())[:40]
    assert bundle.name.endswith(f"-matmul-{host}-{proc.pid}")
    rows = json.loads((bundle / "trials.json").read_text())
    assert sum(r["state"] == "COMPLETE" for r in rows) >= 3
    (summary,) = optuna.get_all_study_summaries(tuner.make_storage(storage))
    study = optuna.load_study(study_name=summary.study_name, storage=tuner.make_storage(storage))
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_module_entry_point_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TINYPALLAS_CACHE": str(tmp_path / "cache.json")}
    for argv, code in ((["sweep", "--trials", "0"], 2), (["list", "boards"], 0), (["nosuchcommand"], 2)):
        out = subprocess.run([sys.executable, "-m", "autotune", *argv], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120, check=False)
        assert out.returncode == code, out.stderr
        assert "Traceback" not in out.stderr and (code == 0 or out.stderr.startswith("error: "))
    assert pathlib.Path(tmp_path).exists()


def _toy_entry(seconds_by_a: dict) -> types.ModuleType:
    """A tunable thing the command line has never heard of: problems named by --model/--target."""
    module = types.ModuleType("toy_tunable")

    def parse_model(model: str, target: str | None = None) -> dict:
        """``NAME [--target t1]``: a toy model."""
        if target not in (None, "t1"):
            raise ValueError(f"unknown target {target!r}; choose t1")
        return {"model": model, "target": target or "t1"}

    module.parse_model = parse_model
    module.DEFAULT_PROBLEMS = [{"model": "m0", "target": "t1"}]
    module.targets = lambda: [{"board": "t1", "note": "toy"}]
    module.search_space = lambda problem: SearchSpace(
        kernel="toy", problem=problem, knobs=(Knob("a", tuple(seconds_by_a)),), violations=lambda p: [],
        to_config=lambda p: p, measure=lambda config: {"seconds": seconds_by_a[config["a"]]}, default={"a": 1})
    return module


def test_an_entry_names_its_own_problems_and_the_cli_special_cases_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "toy_tunable", _toy_entry({1: 2.0, 2: 1.0}))
    monkeypatch.setitem(registry.KERNELS, "toy", registry.Kernel("toy", "toy_tunable"))
    storage = f"sqlite:///{tmp_path}/s.db"
    rc, out, _ = _run(["sweep", "--kernel", "toy", "--model", "m1", "--target", "t1", "--dry-run", "--storage",
                       storage], capsys)
    assert rc == 0 and "model=m1 target=t1" in out
    _refused(["sweep", "--model", "m1", "--dry-run"], capsys, "mcu, toy", "give --kernel")  # two entries take --model
    _refused(["sweep", "--kernel", "toy", "--model", "m1", "--target", "t9"], capsys, "unknown target 't9'")
    _refused(["sweep", "--kernel", "toy", "--shape", "3"], capsys, "takes no --shape", "matmul")
    _refused(["sweep", "--kernel", "matmul", "--model", "m1"], capsys, "takes no --model", "mcu, toy")
    _refused(["sweep", "--kernel", "matmul", "--target", "t1"], capsys, "add --model")
    rc, out, _ = _run(["list", "boards", "--format", "json"], capsys)
    boards = {row["board"]: row for row in json.loads(out)}
    assert rc == 0 and boards["t1"]["note"] == "toy" and boards["stm32f746"]["sram_kib"]
    rc, out, _ = _run(["sweep", "--kernel", "toy", "--model", "m1", "--trials", "2", "--storage", storage,
                       "--results", str(tmp_path / "bundle")], capsys)
    assert rc == 0 and "interpret" not in out
    (entry,) = tuned.load().values()
    assert entry["seconds"] == {1: 2.0, 2: 1.0}[entry["params"]["a"]] and entry["interpreted"] is False


@pytest.mark.skipif(cpu_build.availability() is not None, reason="the compiled CPU kernels do not build here")
def test_a_sweep_of_compiled_cpu_kernels_is_not_labelled_interpreted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/s.db"
    rc, out, err = _run(["sweep", "--kernel", "cpu_rmsnorm", "--shape", "4x64", "--trials", "2", "--storage", storage,
                         "--results", str(tmp_path / "bundle")], capsys)
    assert rc == 0, err
    assert "interpret" not in out  # neither the banner nor the summary title
    assert json.loads((tmp_path / "bundle" / "env.json").read_text())["interpreted"] is False
    (entry,) = tuned.load().values()
    assert entry["interpreted"] is False
    (summary,) = optuna.get_all_study_summaries(tuner.make_storage(storage))
    assert summary.user_attrs["interpreted"] is False
