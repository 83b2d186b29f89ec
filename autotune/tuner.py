"""Optuna over a kernel's ``SearchSpace``: one study per (kernel, problem, device).

Each trial samples the knobs, reports the constraints (``trial.set_constraint``) before anything
is compiled, and only runs legal configs. Illegal configs finish with an infinite objective and
their reasons in ``user_attrs["violations"]``; configs that fail to compile or run are recorded as
FAIL with the error in ``user_attrs["error"]``; neither stops the sweep.

Storage is any Optuna storage URL (SQLite by default, PostgreSQL for many hosts): every finished
trial is committed when it ends, so a sweep killed mid-way (even SIGKILL) keeps its trials, and
re-running the same sweep resumes the study. Workers in other processes or hosts share one study
through the same URL and one budget: ``n_trials`` is the number of COMPLETE trials the study ends
with, whoever ran them. A heartbeat marks the trials of a dead worker as failed after a grace
period and re-enqueues them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import random
import re
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import optuna
import sqlalchemy.event
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from autotune import measure
from autotune.measure import Timing, default_repeats
from tuning import platform, tuned
from tuning.space import SearchSpace

# A worker's heartbeat every HEARTBEAT_SECONDS; a RUNNING trial without one for GRACE_SECONDS
# belongs to a dead worker and is failed and re-enqueued. TINYPALLAS_HEARTBEAT_SECONDS shortens
# both (the grace period is four heartbeats), e.g. for tests that kill workers.
HEARTBEAT_SECONDS = int(os.environ.get("TINYPALLAS_HEARTBEAT_SECONDS", "5"))
GRACE_SECONDS = max(4 * HEARTBEAT_SECONDS, 4)
STORAGE_FORMS = "sqlite:///PATH.db or postgresql://USER:PASSWORD@HOST[:PORT]/DB"

Callback = Callable[[optuna.Study, FrozenTrial], None]


@dataclasses.dataclass
class TuneResult:
    study: optuna.Study
    space: SearchSpace
    best_params: dict | None  # full params (default merged with the best trial's knobs)
    best_values: dict | None  # objective name -> value
    stopped: str | None = None  # why this worker stopped before the budget was reached, if it did
    confirmation: dict | None = None  # ``confirm``: tuned vs default, interleaved (``Comparison.as_dict()``)

    @property
    def default_values(self) -> dict | None:
        """The objectives of the heuristic default config (the first enqueued trial), if it ran."""
        for t in self.study.trials:
            if t.user_attrs.get("is_default") and t.state == TrialState.COMPLETE:
                return _objective_dict(self.space, t)
        return None


def study_name_for(space: SearchSpace, prefix: str | None = None) -> str:
    problem = "-".join(f"{k}{v}" for k, v in sorted(space.problem.items()))
    device = re.sub(r"[^a-z0-9]+", "_", platform.device_kind().lower()).strip("_")
    name = f"{space.kernel}-{problem}-{device}"
    return f"{prefix}-{name}" if prefix else name


def storage_url(url: str) -> str:
    """``url`` checked and made ready for SQLAlchemy, or a ValueError saying which forms work.

    A ``sqlite:///`` file's folder is created. A bare ``postgresql://`` is sent to the psycopg
    (version 3) driver that ``pip install tinypallas[postgres]`` installs, whichever driver the
    installed SQLAlchemy would default to.
    """
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        raise ValueError(f"storage {url!r} is not a database URL; use {STORAGE_FORMS}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise ValueError(f"storage {url!r} is not a SQLite, PostgreSQL or MySQL URL; use {STORAGE_FORMS}")
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        folder = pathlib.Path(parsed.database).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"storage {url!r}: cannot create the folder {folder} ({e.strerror or e}); "
                             "choose a path in a folder you can write") from None
        if pathlib.Path(parsed.database).is_dir():
            raise ValueError(f"storage {url!r} names a folder; add a file name, e.g. {url.rstrip('/')}/autotune.db")
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def _transient(e: Exception) -> bool:
    """A schema-creation race between workers starting together, or a briefly locked SQLite file."""
    text = str(e).lower()
    return isinstance(e, sqlalchemy.exc.IntegrityError) or "locked" in text or "already exists" in text


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url`` with a heartbeat, so that dead workers' trials are retried.

    Raises ValueError (naming the URL and the fix) for a malformed URL, a missing driver, a
    database that cannot be reached or a file that is not a database.
    """
    engine_url = storage_url(url)
    engine_kwargs = {"connect_args": {"timeout": 30}} if engine_url.startswith("sqlite:") else {}
    # Workers starting together on a new database race to create its schema; the loser sees a
    # unique-constraint or locking error and simply opens the schema the winner made.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat API is marked experimental in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    engine_url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
            _serialize_sqlite(storage)
            return storage
        except (ImportError, sqlalchemy.exc.NoSuchModuleError) as e:
            raise ValueError(f"storage {url!r} needs a database driver that is not installed ({e}); "
                             "`pip install tinypallas[postgres]` installs the PostgreSQL one") from None
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt < 4 and _transient(e):
                time.sleep(0.5 * (attempt + 1))
                continue
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise ValueError(f"storage {url!r} cannot be opened: {reason}; check the URL, that the server "
                             "runs, and that a SQLite path is a database file (or a new one)") from None
        except RuntimeError as e:  # e.g. a database written by another Optuna version
            raise ValueError(f"storage {url!r}: {e}") from None
    raise AssertionError("unreachable")


def _serialize_sqlite(storage: RDBStorage) -> None:
    """Make every transaction on a SQLite file take the write lock when it begins.

    Optuna claims a queued trial by reading that it is WAITING and then marking it RUNNING;
    ``SELECT ... FOR UPDATE`` means nothing to SQLite, and Python's sqlite3 begins a transaction
    only at the first write, so two workers could both read WAITING and both run the trial (the
    second then fails to tell it). ``BEGIN IMMEDIATE`` makes the read and the write one step.
    """
    engine = storage.engine
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return
    if not os.access(engine.url.database, os.W_OK):  # a read-only file: readers only, nothing to claim
        return

    def autocommit_driver(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below opens transactions

    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(engine, "connect", autocommit_driver)
    sqlalchemy.event.listen(engine, "begin", begin_immediate)
    engine.dispose()  # pooled connections made while the schema was created get the listeners too


def device_memory_bytes() -> int | None:
    """Memory of the default device: the allocator's limit on a GPU, physical RAM on the CPU."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n:.2e} bytes"


def check_fits(space: SearchSpace) -> None:
    """ValueError when the problem's operands and result alone exceed the device's memory
    (``space.problem_bytes()``, from the shapes of its inputs and result: nothing is allocated)."""
    need = space.problem_bytes()
    limit = device_memory_bytes()
    if need is not None and limit is not None and need > limit:
        problem = " ".join(f"{k}={v}" for k, v in space.problem.items())
        raise ValueError(f"{space.kernel} problem {problem} needs about {_gib(need)} for its operands and "
                         f"result, more than the {_gib(limit)} of memory of {platform.device_kind()}; "
                         "choose a smaller --shape")


def _objective_dict(space: SearchSpace, trial) -> dict:
    values = trial.values if trial.values is not None else []
    return {o.name: v for o, v in zip(space.objectives, values)}


def _distance(p: dict, q: dict) -> float:
    """How far apart two problems are: log-ratio over shared numeric fields, 1 per differing label."""
    d = 0.0
    for key in set(p) | set(q):
        a, b = p.get(key), q.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
            d += abs(math.log(a / b))
        elif a != b:
            d += 1.0
    return d


def warm_start_sources(space: SearchSpace, limit: int = 2) -> list[dict]:
    """The nearest already-tuned problems of the same kernel here: ``{"problem", "params"}`` each,
    nearest first (their params are enqueued as the first trials of a new study)."""
    others = [(p, params) for p, params in tuned.tuned_problems(space.kernel) if p != space.problem]
    others.sort(key=lambda item: _distance(item[0], space.problem))
    return [{"problem": p, "params": params} for p, params in others[:limit]]


def _knob_params(space: SearchSpace, params: dict) -> dict | None:
    """Restrict ``params`` to this space's active knobs; None if a value is not among a knob's choices."""
    out = {}
    for knob in space.knobs:
        if not knob.active(params):
            continue
        if params.get(knob.name) not in knob.choices:
            return None
        out[knob.name] = params[knob.name]
    return out


def evaluate(space: SearchSpace, params: dict, *, warmup: int, repeats: int) -> tuple[dict, Timing | None]:
    """Run one config: objectives and (when timed, by ``autotune.measure``'s protocol) its ``Timing``.
    Raises on compile/run errors."""
    cfg = space.to_config(params)
    if space.measure is not None:
        return dict(space.measure(cfg)), None
    timing = measure.time_space(space, cfg, warmup=warmup, repeats=repeats)
    return {"seconds": timing.median_seconds}, timing


def tune(space: SearchSpace, *, storage: str, n_trials: int, timeout: float | None = None,
         study_name: str | None = None, seed: int = 0, on_trial: Callable[[], None] | None = None,
         warmup: int | None = None, repeats: int | None = None, warm_start: bool = True,
         write_cache: bool = True, progress: bool = False, callbacks: Sequence[Callback] = ()) -> TuneResult:
    """Tune ``space`` until its study holds ``n_trials`` COMPLETE trials (or ``timeout`` passes).

    The budget is the study's, not this call's: FAIL and PRUNED trials do not count, and workers
    in other processes or hosts that share the study (same ``storage`` and study name) count
    toward it, so any number of workers end with exactly ``n_trials`` COMPLETE trials. Re-running
    with the same storage and study name resumes: only the missing trials run.

    seed: fixes the sampler; with the same measurements the same seed gives the same trials.
    warm_start: a new study first tries the heuristic default, then the best configs of the
        nearest problems already in the best-config cache (recorded in the study's user attrs
        ``warm_start``); False: the default only.
    progress: a progress bar (for notebooks; the CLI draws its own over all problems).
    callbacks: Optuna-style ``(study, frozen_trial)`` functions called after each trial.
    The best config is written to the best-config cache that the kernels read.
    """
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials={n_trials!r} must be an integer >= 1")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout={timeout!r} must be a number of seconds > 0, or None")
    check_fits(space)
    default_warmup, default_repeat = default_repeats()
    warmup = default_warmup if warmup is None else warmup
    repeats = default_repeat if repeats is None else repeats
    name = study_name or study_name_for(space)
    if optuna.logging.get_verbosity() < optuna.logging.WARNING:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = [o.direction for o in space.objectives]
    study = optuna.create_study(
        storage=make_storage(storage),
        study_name=name,
        directions=directions,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(n_trials // 3, 1))),
        load_if_exists=True,
    )
    with warnings.catch_warnings():  # metric names are marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in space.objectives])
    for key, value in (("kernel", space.kernel), ("problem", json.dumps(space.problem, sort_keys=True)),
                       ("device", platform.device_kind()), ("jax", jax.__version__),
                       ("interpreted", space.interpreted)):
        study.set_user_attr(key, value)

    default = dict(space.default or {})
    if not study.trials:  # a new study: the heuristic default first, then the nearest tuned configs
        sources = warm_start_sources(space) if warm_start else []
        study.set_user_attr("warm_start", sources)
        seen = []
        for params, is_default in [(default, True)] + [(s["params"], False) for s in sources]:
            knob_params = _knob_params(space, params)
            if knob_params is not None and knob_params not in seen and len(seen) < n_trials:
                seen.append(knob_params)
                study.enqueue_trial(knob_params, user_attrs={"is_default": is_default}, skip_if_exists=True)

    def objective(trial: optuna.Trial):
        # Claim one unit of the shared budget; back off if COMPLETE and RUNNING trials (this
        # one aside) already fill it. Every pair of trials claiming at once sees at least one
        # the other (each reads after its own trial is stored), so the budget is never overrun.
        if _counts(study, exclude=trial.number)[0] >= n_trials:
            trial.set_user_attr("budget", "the study already had --trials COMPLETE or RUNNING trials")
            raise optuna.TrialPruned("budget reached by other workers")
        params = dict(default)
        for knob in space.knobs:  # in order, so a conditional knob sees the knobs it depends on
            if knob.active(params):
                params[knob.name] = trial.suggest_categorical(knob.name, knob.choices)
        problems = space.violations(params)
        trial.set_constraint("violations", float(len(problems)))
        trial.set_user_attr("params", params)
        if problems:
            trial.set_user_attr("violations", problems)
            values = [math.inf if d == "minimize" else -math.inf for d in directions]
            return values[0] if len(values) == 1 else values
        for failed in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if "error" in failed.user_attrs and failed.user_attrs.get("params") == params:
                # Not compiled again; a PRUNED trial (unlike a FAIL) tells the sampler to look elsewhere.
                trial.set_user_attr("error", f"same config as failed trial {failed.number}")
                raise optuna.TrialPruned(f"same config as failed trial {failed.number}")
        try:
            values, timing = evaluate(space, params, warmup=warmup, repeats=repeats)
        except Exception as e:  # a config that does not compile or run: FAIL with the reason
            trial.set_user_attr("error", f"{type(e).__name__}: {str(e)[:2000]}")
            raise
        if timing is not None:
            for key, value in timing.as_dict().items():
                trial.set_user_attr(key, value)
        for key, value in values.items():  # what the measure reports beside the objectives
            if key not in {o.name for o in space.objectives}:
                trial.set_user_attr(key, value)
        ordered = [values[o.name] for o in space.objectives]
        return ordered[0] if len(ordered) == 1 else ordered

    all_callbacks = list(callbacks) + ([lambda study, trial: on_trial()] if on_trial else [])
    bar = None
    if progress:
        from autotune.progress import SweepProgress

        bar = SweepProgress(1, n_trials)
        bar.start_problem(0, name, study)
        all_callbacks.append(bar.trial_done)
    try:
        stopped = _run_budget(study, objective, n_trials, timeout, all_callbacks)
    finally:
        if bar is not None:
            bar.close()

    best_params, best_values = best_of(study, space)
    if write_cache and best_params is not None:  # several objectives: the Pareto point best on the first
        tuned.store(space.kernel, space.problem, best_params, **best_values, study=name,
                    objective=space.objectives[0].name, interpreted=space.interpreted)
    return TuneResult(study, space, best_params, best_values, stopped)


CONFIRM_ROUNDS = 30
CONFIRM_SAMPLE_SECONDS = 0.005


def confirm(result: TuneResult, *, rounds: int = CONFIRM_ROUNDS, write_cache: bool = True) -> dict | None:
    """The tuned config against the heuristic default, timed interleaved in one run by
    ``measure.compare`` (baseline "default", contender "tuned"): ``Comparison.as_dict()``, whose
    ``ratios["tuned"]`` holds the speed-up, its 95% interval and the verdict. The trials' own
    medians come from different moments of the study, so a speed-up read from them alone is not
    yet a verdict. None where there is nothing to confirm: no feasible best, a space measured by
    its own ``measure`` (e.g. MCU instruction counts, exact), an interpreted space (the
    interpreter's speed is not the kernel's). A best that is the default itself gives
    ``{"kept": "default", "same_config": True}`` (nothing to time).

    Where the tuned config loses (its interval entirely slower), the default is what ``kept`` says
    and, with ``write_cache``, what the best-config cache holds for the problem: a config chosen on
    noise is not kept."""
    space = result.space
    if result.best_params is None or space.measure is not None or space.interpreted:
        return None
    default = dict(space.default or {})
    if _knob_params(space, default) == _knob_params(space, result.best_params):
        return {"kept": "default", "same_config": True}  # the sweep's ratio is the same config timed twice
    contenders = {name: measure.workload(space.fn(space.to_config(params)), space.make_inputs, name=space.kernel)
                  for name, params in (("default", default), ("tuned", result.best_params))}
    # several calls per sample, so that a microsecond kernel's sample is not one timer read
    comparison = measure.compare(contenders, baseline="default", rounds=rounds, sample_seconds=CONFIRM_SAMPLE_SECONDS)
    out = comparison.as_dict()
    out["kept"] = "default" if out["ratios"]["tuned"]["verdict"] == "loss" else "tuned"
    if out["kept"] == "default" and write_cache:
        objective = space.objectives[0].name
        tuned.store(space.kernel, space.problem, default, **{objective: comparison.timings["default"].median_seconds},
                    study=result.study.study_name, objective=objective, interpreted=space.interpreted,
                    confirmation="the tuned config lost to this default when timed interleaved")
    return out


def _counts(study: optuna.Study, exclude: int | None = None) -> tuple[int, int]:
    """(COMPLETE + RUNNING trials other than number ``exclude``, COMPLETE trials) of the study."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    return sum(t.number != exclude for t in trials), complete


def _run_budget(study: optuna.Study, objective, n_trials: int, timeout: float | None,
                callbacks: list[Callback]) -> str | None:
    """Run trials one at a time until the study holds ``n_trials`` COMPLETE ones.

    Before each trial the shared count is read again: when the COMPLETE and RUNNING trials of all
    workers fill the budget, this worker waits (a RUNNING trial may still fail, or belong to a
    dead worker and be retried after the grace period) and stops once ``n_trials`` are COMPLETE.
    Returns why it stopped early (timeout, too many failures), or None.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    max_failures = max(10, 2 * n_trials)
    failures = 0
    rng = random.Random()  # back-off jitter only; never the sampler's randomness
    ran: list[FrozenTrial] = []
    callbacks = [lambda study, trial: ran.append(trial), *callbacks]
    silent_since: dict[int, float] = {}
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            return f"timeout of {timeout:g} s reached"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
            _fail_silent_trials(study, silent_since)
        claimed, complete = _counts(study)
        if complete >= n_trials:
            return None
        if claimed >= n_trials:  # the rest of the budget is running in other workers
            time.sleep(0.2 + rng.random() * 0.3)
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=False)
        except optuna.exceptions.UpdateFinishedTrialError:
            # This worker's heartbeat was late by more than the grace period (a locked database, a
            # stalled host): another worker failed the trial and enqueued it again. Carry on.
            continue
        if not ran:
            continue
        if ran[-1].state == TrialState.PRUNED and "budget" in ran[-1].user_attrs:
            time.sleep(0.1 + rng.random() * 0.4)  # lost a race for the last unit of the budget
        elif ran[-1].state in (TrialState.FAIL, TrialState.PRUNED):
            failures += 1
            if failures >= max_failures:
                return f"{failures} trials failed in this worker (see their errors); stopped"


def _fail_silent_trials(study: optuna.Study, silent_since: dict[int, float]) -> None:
    """Fail (and retry) RUNNING trials that never recorded a heartbeat for a grace period.

    Optuna's stale-trial check skips trials without any heartbeat, yet a worker killed between
    creating its trial and its heartbeat thread's first write (which waits whenever SQLite is
    locked by another worker) leaves exactly such a trial, and a shared budget would wait for it
    forever. How long each has been silent is measured on this worker's clock, never by comparing
    timestamps written by different hosts.
    """
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    if not isinstance(rdb, RDBStorage) or rdb.heartbeat_interval is None:
        return
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(rdb.scoped_session) as session:
            silent = {trial_id for (trial_id,) in session.query(models.TrialModel.trial_id)
                      .outerjoin(models.TrialHeartbeatModel,
                                 models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
                      .filter(models.TrialModel.study_id == study._study_id,
                              models.TrialModel.state == TrialState.RUNNING,
                              models.TrialHeartbeatModel.trial_id.is_(None))}
    except (ImportError, AttributeError, sqlalchemy.exc.SQLAlchemyError):  # another Optuna layout
        return
    now = time.monotonic()
    for trial_id in list(silent_since):
        if trial_id not in silent:
            del silent_since[trial_id]
    for trial_id in silent:
        if now - silent_since.setdefault(trial_id, now) <= rdb.grace_period:
            continue
        try:
            failed = storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # it finished, or another worker failed it
            failed = False
        if failed:
            retry = storage.get_heartbeat_stale_trial_callback()
            if retry is not None:
                retry(study, storage.get_trial(trial_id))
        del silent_since[trial_id]


def feasible_trials(study: optuna.Study) -> list:
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if not t.user_attrs.get("violations") and all(math.isfinite(v) for v in t.values):
            out.append(t)
    return out


def best_of(study: optuna.Study, space: SearchSpace) -> tuple[dict | None, dict | None]:
    """Best feasible trial for a single objective; for several, the Pareto point best on the first."""
    trials = feasible_trials(study)
    if not trials:
        return None, None
    if len(space.objectives) == 1:
        sign = 1 if space.objectives[0].direction == "minimize" else -1
        best = min(trials, key=lambda t: sign * t.values[0])
    else:
        front = {t.number for t in study.best_trials}
        pareto = [t for t in trials if t.number in front] or trials
        sign = 1 if space.objectives[0].direction == "minimize" else -1
        best = min(pareto, key=lambda t: sign * t.values[0])
    return dict(best.user_attrs["params"]), _objective_dict(space, best)
