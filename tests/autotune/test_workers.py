"""Workers sharing one study: the --trials budget is the study's COMPLETE trials, on SQLite and on a
real PostgreSQL server (``TINYPALLAS_TEST_POSTGRES``, started by .ci/run), also when a worker dies."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings

import optuna
import pytest

from autotune import tuner
from kernels import matmul as mm
from tests.conftest import REPO
from tuning.space import Knob, SearchSpace

POSTGRES = os.environ.get("TINYPALLAS_TEST_POSTGRES")
needs_postgres = pytest.mark.skipif(
    not POSTGRES, reason="no PostgreSQL server: set TINYPALLAS_TEST_POSTGRES=postgresql://USER@HOST:PORT/DB "
                         "(`eval \"$(bash scripts/test-postgres.sh start)\"` starts one; .ci/run does)")
SHAPE = "16x16x16"  # a tiny matmul: a trial takes a fraction of a second in the interpreter
TRIALS = 10


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def storage(request, tmp_path):
    return f"sqlite:///{tmp_path}/shared.db" if request.param == "sqlite" else POSTGRES


def _env(tmp_path) -> dict:
    # Heartbeats every second: a killed worker's trial is retried after 4 s rather than 20 s.
    return {**os.environ, "PYTHONPATH": str(REPO), "TINYPALLAS_CACHE": str(tmp_path / "cache.json"),
            "TINYPALLAS_HEARTBEAT_SECONDS": "1"}


def _sweep(storage: str, prefix: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autotune", "sweep", "--shape", SHAPE, "--trials", str(TRIALS),
            "--storage", storage, "--study-name", prefix, "--no-progress", *extra]


def _study(storage: str, prefix: str) -> optuna.Study:
    name = f"{prefix}-" + tuner.study_name_for(mm.search_space(mm.parse_shape(SHAPE)))
    return optuna.load_study(study_name=name, storage=tuner.make_storage(storage))


def _states(study) -> dict:
    trials = study.get_trials(deepcopy=False)
    return {state: [t for t in trials if t.state == state] for state in optuna.trial.TrialState}


def test_three_workers_end_with_exactly_the_budget_after_one_is_killed(storage, tmp_path):
    prefix = f"kill{uuid.uuid4().hex[:8]}"
    workers = [subprocess.Popen(_sweep(storage, prefix, "--seed", str(i), "--results", str(tmp_path / f"b{i}")),
                                cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for i in range(3)]
    try:
        complete_before_kill = []
        deadline = time.time() + 240
        while time.time() < deadline and len(complete_before_kill) < 3:
            time.sleep(0.3)
            try:
                complete_before_kill = _states(_study(storage, prefix))[optuna.trial.TrialState.COMPLETE]
            except KeyError:  # the study is not created yet
                pass
        assert len(complete_before_kill) >= 3, "the workers made no progress"
        workers[0].send_signal(signal.SIGKILL)
        for w in workers[1:]:
            assert w.wait(timeout=300) == 0, w.stderr.read().decode()[-2000:]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
    study = _study(storage, prefix)
    states = _states(study)
    complete = states[optuna.trial.TrialState.COMPLETE]
    assert len(complete) == TRIALS, {s.name: len(t) for s, t in states.items()}
    assert not states[optuna.trial.TrialState.RUNNING]
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    assert len(numbers) == len(set(numbers)), "duplicate trial numbers"
    kept = {(t.number, json.dumps(t.params, sort_keys=True), t.values[0]) for t in complete}
    assert {(t.number, json.dumps(t.params, sort_keys=True), t.values[0]) for t in complete_before_kill} <= kept


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=needs_postgres),
                                     pytest.param("sqlite", marks=pytest.mark.slow)])
def test_sweep_workers_3_shares_the_budget(backend, tmp_path):
    storage = POSTGRES if backend == "postgresql" else f"sqlite:///{tmp_path}/shared.db"
    prefix = f"w3{uuid.uuid4().hex[:8]}"
    out = subprocess.run(_sweep(storage, prefix, "--workers", "3", "--results", str(tmp_path / "bundle")),
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=400, check=False)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert all(f"[worker {i}]" in out.stdout for i in range(3)), out.stdout[-3000:]
    states = _states(_study(storage, prefix))
    assert len(states[optuna.trial.TrialState.COMPLETE]) == TRIALS
    assert not states[optuna.trial.TrialState.RUNNING]
    rows = json.loads((tmp_path / "bundle" / "trials.json").read_text())  # one bundle, every worker's trials
    assert sum(r["state"] == "COMPLETE" for r in rows) == TRIALS
    env = json.loads((tmp_path / "bundle" / "env.json").read_text())
    assert env["workers"] == 3


@needs_postgres
def test_postgresql_url_errors_are_one_line(tmp_path):
    bad = POSTGRES.rsplit("/", 1)[0] + "/no_such_database"
    out = subprocess.run([sys.executable, "-m", "autotune", "sweep", "--shape", SHAPE, "--storage", bad, "--trials",
                          "1"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 2 and out.stderr.startswith("error: storage") and "no_such_database" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1


def test_slurm_and_kubernetes_recipes_share_one_budget(tmp_path):
    """examples/slurm_sweep.sbatch as an array task and examples/k8s_sweep_job.yaml's container as an
    indexed pod, running together on one study (on PostgreSQL when there is a server)."""
    yaml = pytest.importorskip("yaml")
    storage, prefix = POSTGRES or f"sqlite:///{tmp_path}/recipe.db", f"recipe{uuid.uuid4().hex[:8]}"
    slurm_env = {**_env(tmp_path), "TINYPALLAS_STORAGE": storage, "STUDY": prefix, "PYTHON": sys.executable,
                 "SWEEP_ARGS": f"--shape {SHAPE} --trials 6", "SLURM_SUBMIT_DIR": str(tmp_path),
                 "SLURM_ARRAY_TASK_ID": "0"}
    slurm_task = ["bash", str(REPO / "examples" / "slurm_sweep.sbatch")]

    job = yaml.safe_load((REPO / "examples" / "k8s_sweep_job.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {"TINYPALLAS_STORAGE", "WORKER_INDEX"} <= {e["name"] for e in container["env"]}
    values = {"TINYPALLAS_STORAGE": storage, "WORKER_INDEX": "1"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]
    args[args.index("--study-name") + 1] = prefix
    # The manifest tunes bfloat16 matmuls for hours; here the same command on one tiny problem.
    pod = [sys.executable if a == "python" else a for a in container["command"]] + args + [
        "--shape", SHAPE, "--dtype", "float32", "--trials", "6"]

    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in ((slurm_task, slurm_env), (pod, _env(tmp_path)))]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert len(_states(_study(storage, prefix))[optuna.trial.TrialState.COMPLETE]) == 6


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(tuner, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(tuner, "GRACE_SECONDS", 2)
    storage = f"sqlite:///{tmp_path}/orphan.db"
    space = SearchSpace(kernel="toy_orphan", problem={"n": 1}, knobs=(Knob("a", (1, 2, 3, 4)),), violations=lambda p: [],
                        to_config=lambda p: p, measure=lambda p: {"seconds": float(p["a"])}, default={"a": 1})
    study = optuna.create_study(storage=tuner.make_storage(storage), study_name="orphan")
    with warnings.catch_warnings():  # (Optuna: heartbeats are meant for optimize(), as tune uses them)
        warnings.simplefilter("ignore")
        orphan = study.ask()  # RUNNING with no heartbeat, ever: its worker died right after creating it
    result = tuner.tune(space, storage=storage, n_trials=3, study_name="orphan", timeout=60, warm_start=False)
    assert result.stopped is None, result.stopped  # not a wait for the orphan until the timeout
    states = _states(result.study)
    assert len(states[optuna.trial.TrialState.COMPLETE]) == 3
    assert result.study.trials[orphan.number].state == optuna.trial.TrialState.FAIL


def test_one_queued_trial_is_claimed_by_one_worker_on_sqlite(tmp_path):
    """Four workers racing for one enqueued trial (a default config, a retried trial): one gets it.
    (Without BEGIN IMMEDIATE, SQLite let several read WAITING and all mark it RUNNING.)"""
    storage = f"sqlite:///{tmp_path}/queue.db"
    for round_ in range(10):
        name = f"queue{round_}"
        study = optuna.create_study(storage=tuner.make_storage(storage), study_name=name)
        study.enqueue_trial({"x": 1})
        workers = [optuna.load_study(study_name=name, storage=tuner.make_storage(storage)) for _ in range(4)]
        barrier = threading.Barrier(len(workers))
        claimed = []

        def claim(worker, barrier=barrier, claimed=claimed):
            barrier.wait()
            claimed.append(worker._pop_waiting_trial_id())

        threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(c is not None for c in claimed) == 1, (round_, claimed)
