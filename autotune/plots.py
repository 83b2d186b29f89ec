"""PNG plots of a study: optimisation history, parameter importance, objective vs tile size,
and for multi-objective studies the Pareto front."""
from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna


def _feasible(study):
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.values and all(math.isfinite(v) for v in t.values) and not t.user_attrs.get("violations"):
            out.append(t)
    return out


def _objective_names(study) -> list[str]:
    names = study.metric_names
    return list(names) if names else [f"objective {i}" for i in range(len(study.directions))]


def plot_study(study: optuna.Study, directory: pathlib.Path) -> list[pathlib.Path]:
    """Write the study's plots into ``directory``; returns the files written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trials = _feasible(study)
    if not trials:
        return []
    name = study.study_name
    interpreted = study.user_attrs.get("interpreted", False)
    unit = "s (Pallas interpreter, CPU)" if interpreted else "s"
    written = []
    if len(study.directions) == 1:
        # Optimisation history
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [t.number for t in trials]
        ys = [t.values[0] for t in trials]
        best, running = [], math.inf
        for y in ys:
            running = min(running, y)
            best.append(running)
        ax.scatter(xs, ys, s=14, label="trial")
        ax.step(xs, best, where="post", color="C3", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"median time [{unit}]")
        ax.set_yscale("log")
        ax.set_title(f"optimization history\n{name}", fontsize=8)
        ax.legend()
        written.append(_save(fig, directory / f"{name}-history.png"))
        # Time vs tile size
        if all("block_m" in t.params and "block_n" in t.params for t in trials):
            fig, ax = plt.subplots(figsize=(6, 4))
            sc = ax.scatter([t.params["block_m"] * t.params["block_n"] for t in trials], ys,
                            c=[math.log2(t.params.get("block_k", 1)) for t in trials], cmap="viridis", s=18)
            fig.colorbar(sc, ax=ax, label="log2(block_k)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("output tile size block_m x block_n")
            ax.set_ylabel(f"median time [{unit}]")
            ax.set_title(f"time vs tile size\n{name}", fontsize=8)
            written.append(_save(fig, directory / f"{name}-tiles.png"))
    else:
        names = _objective_names(study)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([t.values[0] for t in trials], [t.values[1] for t in trials], s=14, label="trial")
        front = sorted((t.values[0], t.values[1]) for t in study.best_trials)
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="C3", label="Pareto front")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title(f"Pareto front\n{name}", fontsize=8)
        ax.legend()
        written.append(_save(fig, directory / f"{name}-pareto.png"))
    # Parameter importance (fANOVA needs a few distinct completed trials)
    params_seen = {k for t in trials for k in t.params}
    if len(trials) >= 4 and len(study.directions) == 1 and params_seen:
        try:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            feasible = optuna.create_study(directions=study.directions)
            feasible.add_trials(trials)  # importance over legal configs only (illegal ones score inf)
            importances = optuna.importance.get_param_importances(feasible)
        except (RuntimeError, ValueError) as e:  # e.g. every trial has the same params
            importances = {}
            print(f"parameter importance skipped for {name}: {e}")
        if importances:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            keys = list(importances)[::-1]
            ax.barh(keys, [importances[k] for k in keys])
            ax.set_xlabel("importance (fANOVA)")
            ax.set_title(f"parameter importance\n{name}", fontsize=8)
            written.append(_save(fig, directory / f"{name}-importance.png"))
    return written


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
