"""Optuna over a kernel's ``SearchSpace``: one study per (kernel, problem, device).

Each trial samples the knobs, reports the constraints (``trial.set_constraint``) before anything
is compiled, and only runs legal configs. Illegal configs finish with an infinite objective and
their reasons in ``user_attrs["violations"]``; configs that fail to compile or run are recorded as
FAIL with the error in ``user_attrs["error"]``; neither stops the sweep.

Storage is any Optuna storage URL (SQLite by default): every finished trial is committed when it
ends, so a sweep killed mid-way (even SIGKILL) keeps its trials, and re-running the same sweep
resumes the study. Workers in other processes or hosts can share one study through the same URL.
A heartbeat marks trials of a dead worker as failed after a grace period and re-enqueues them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from collections.abc import Callable

import jax
import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from autotune import measure
from autotune.measure import Timing, default_repeats
from kernels import platform, tuned
from kernels.space import SearchSpace

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20


@dataclasses.dataclass
class TuneResult:
    study: optuna.Study
    space: SearchSpace
    best_params: dict | None  # full params (default merged with the best trial's knobs)
    best_values: dict | None  # objective name -> value

    @property
    def default_values(self) -> dict | None:
        """The objectives of the heuristic default config (the first enqueued trial), if it ran."""
        for t in self.study.trials:
            if t.user_attrs.get("is_default") and t.state == optuna.trial.TrialState.COMPLETE:
                return _objective_dict(self.space, t)
        return None


def study_name_for(space: SearchSpace, prefix: str | None = None) -> str:
    problem = "-".join(f"{k}{v}" for k, v in sorted(space.problem.items()))
    device = re.sub(r"[^a-z0-9]+", "_", platform.device_kind().lower()).strip("_")
    name = f"{space.kernel}-{problem}-{device}"
    return f"{prefix}-{name}" if prefix else name


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; relational URLs get a heartbeat so dead workers' trials retry."""
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite:") else {}
        # Workers starting together on a new database race to create its schema; the loser
        # sees a unique-constraint or locking error and simply opens the schema the winner made.
        for attempt in range(5):
            try:
                with warnings.catch_warnings():  # the heartbeat API is marked experimental in Optuna 5
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=HEARTBEAT_SECONDS,
                        grace_period=GRACE_SECONDS,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                    )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
    return optuna.storages.get_storage(url)


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


def warm_start_params(space: SearchSpace, limit: int = 2) -> list[dict]:
    """Best params of the nearest already-tuned problems of the same kernel (for enqueueing)."""
    others = [(p, params) for p, params in tuned.tuned_problems(space.kernel) if p != space.problem]
    others.sort(key=lambda item: _distance(item[0], space.problem))
    return [params for _, params in others[:limit]]


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
         write_cache: bool = True) -> TuneResult:
    """Tune ``space`` until the study holds ``n_trials`` finished trials (or ``timeout`` passes).

    Re-running with the same storage and study name resumes: only the missing trials run.
    The best config is written to the best-config cache that the kernels read.
    """
    default_warmup, default_repeat = default_repeats()
    warmup = default_warmup if warmup is None else warmup
    repeats = default_repeat if repeats is None else repeats
    name = study_name or study_name_for(space)
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
                       ("interpreted", platform.interpret_default())):
        study.set_user_attr(key, value)

    default = dict(space.default or {})
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    if not study.trials:  # a new study: the heuristic default first, then the nearest tuned configs
        candidates = [default] + (warm_start_params(space) if warm_start else [])
        seen = []
        for params in candidates:
            knob_params = _knob_params(space, params)
            if knob_params is not None and knob_params not in seen:
                seen.append(knob_params)
                study.enqueue_trial(knob_params, user_attrs={"is_default": params is default})

    def objective(trial: optuna.Trial):
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
        try:
            values, timing = evaluate(space, params, warmup=warmup, repeats=repeats)
        except Exception as e:  # a config that does not compile or run: FAIL with the reason
            trial.set_user_attr("error", f"{type(e).__name__}: {str(e)[:2000]}")
            raise
        if timing is not None:
            for key, value in timing.as_dict().items():
                trial.set_user_attr(key, value)
        ordered = [values[o.name] for o in space.objectives]
        return ordered[0] if len(ordered) == 1 else ordered

    def finished() -> int:
        return sum(t.state in finished_states for t in study.get_trials(deepcopy=False))

    remaining = n_trials - finished()
    if remaining > 0:
        callbacks = [lambda study, trial: on_trial()] if on_trial else []
        study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(Exception,),
                       callbacks=callbacks, gc_after_trial=False)

    best_params, best_values = best_of(study, space)
    if write_cache and best_params is not None:  # several objectives: the Pareto point best on the first
        tuned.store(space.kernel, space.problem, best_params, **best_values,
                    study=name, interpreted=platform.interpret_default())
    return TuneResult(study, space, best_params, best_values)


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
