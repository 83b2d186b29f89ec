"""PNG plots of a study (optimization history, parameter importance, parameter slices, objective
vs tile size, Pareto front) through ``optuna.visualization.matplotlib`` where Optuna has the plot,
and one summary figure for a sweep over a network's layers."""
from __future__ import annotations

import math
import pathlib
import warnings

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState

# The importance evaluator the plots use and the name they print for it (Optuna 5's default).
IMPORTANCE = ("PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator)


def _is_feasible(t) -> bool:
    return (t.state == TrialState.COMPLETE and bool(t.values) and all(math.isfinite(v) for v in t.values)
            and not t.user_attrs.get("violations"))


def _objective_names(study) -> list[str]:
    names = study.metric_names
    return list(names) if names else [f"objective {i}" for i in range(len(study.directions))]


def feasible_copy(study: optuna.Study) -> optuna.Study:
    """An in-memory copy in which only the legal, finished trials are COMPLETE (the others are FAIL
    and so left out of every plot) and trial numbers are the original ones."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        copy = optuna.create_study(directions=study.directions, study_name=study.study_name)
    finally:
        optuna.logging.set_verbosity(level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        copy.set_metric_names(_objective_names(study))
    for t in study.get_trials(deepcopy=False):
        if _is_feasible(t):
            copy.add_trial(t)
        else:
            copy.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params=t.params,
                                                     distributions=t.distributions, user_attrs=t.user_attrs))
    return copy


def plot_study(study: optuna.Study, directory: pathlib.Path) -> list[pathlib.Path]:
    """Write the study's plots into ``directory``; returns the files written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trials = [t for t in study.get_trials(deepcopy=False) if _is_feasible(t)]
    if not trials:
        return []
    name = study.study_name
    interpreted = study.user_attrs.get("interpreted", False)
    names = _objective_names(study)
    unit = "s, Pallas interpreter on CPU" if interpreted else "s"
    label = f"median time [{unit}]" if names[0] == "seconds" else names[0]
    written = []
    # Optuna's plotting functions are marked experimental, warn about small samples, and switch
    # matplotlib to their style globally: all three stay inside this function.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")
        feasible = feasible_copy(study)
        if len(study.directions) == 1:
            ax = optuna.visualization.matplotlib.plot_optimization_history(feasible, target_name=label)
            ys = [t.values[0] for t in trials]
            if min(ys) > 0 and max(ys) / min(ys) > 10:
                ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(loc="upper right", fontsize=8)
            ax.figure.set_size_inches(6.5, 4.2)
            ax.set_title(f"optimization history\n{name}", fontsize=8)
            written.append(_save(ax.figure, directory / f"{name}-history.png"))
            if all("block_m" in t.params and "block_n" in t.params for t in trials):
                written.append(_tiles(trials, ys, label, name, directory))
        else:
            ax = optuna.visualization.matplotlib.plot_pareto_front(feasible, target_names=names[:3])
            ax.set_title(f"Pareto front\n{name}", fontsize=8)
            written.append(_save(ax.figure, directory / f"{name}-pareto.png"))
        knobs = sorted({k for t in trials for k in t.params})
        if knobs and len(study.directions) == 1:
            axes = optuna.visualization.matplotlib.plot_slice(feasible, params=knobs, target_name=label)
            axes = list(axes.flat) if hasattr(axes, "flat") else [axes]
            ys = [t.values[0] for t in trials]
            if min(ys) > 0 and max(ys) / min(ys) > 10:
                for ax in axes:
                    ax.set_yscale("log")
            axes[0].figure.suptitle(f"parameter slices\n{name}", fontsize=8)
            written.append(_save(axes[0].figure, directory / f"{name}-slices.png", tight=False))
        if len(trials) >= 4 and knobs and len({tuple(sorted(t.params.items())) for t in trials}) > 1:
            method, evaluator = IMPORTANCE
            try:
                ax = optuna.visualization.matplotlib.plot_param_importances(
                    feasible, evaluator=evaluator(), target=lambda t: t.values[0], target_name=names[0])
            except (RuntimeError, ValueError):  # e.g. too few distinct trials for the evaluator
                ax = None
            if ax is not None:
                ax.set_xlabel(f"importance for {names[0]} ({method})")
                ax.set_title("", loc="left")
                ax.set_title(f"parameter importance ({method})\n{name}", fontsize=8)
                written.append(_save(ax.figure, directory / f"{name}-importance.png"))
    return written


def _tiles(trials, ys, label, name, directory) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    sc = ax.scatter([t.params["block_m"] * t.params["block_n"] for t in trials], ys,
                    c=[math.log2(t.params.get("block_k", 1)) for t in trials], cmap="viridis", s=18)
    fig.colorbar(sc, ax=ax, label="log2(block_k)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("output tile size block_m x block_n")
    ax.set_ylabel(label)
    ax.set_title(f"time vs tile size\n{name}", fontsize=8)
    return _save(fig, directory / f"{name}-tiles.png")


def plot_layers(results: list, path: pathlib.Path, title: str = "") -> pathlib.Path | None:
    """One figure for a sweep over a network's layers: the speed-up of the tuned config over the
    heuristic default per layer, bars coloured by the algorithm chosen (where the kernel has one)."""
    rows = []
    for i, r in enumerate(results):
        name0 = r.space.objectives[0].name
        default = r.default_values
        if r.best_values is None or not default or not r.best_values.get(name0):
            continue
        rows.append((i, default[name0] / r.best_values[name0], str((r.best_params or {}).get("algorithm", "-"))))
    if not rows:
        return None
    algorithms = sorted({a for _, _, a in rows})
    colors = {a: f"C{k % 10}" for k, a in enumerate(algorithms)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [s for _, s, _ in rows], color=[colors[a] for _, _, a in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [str(i) for i, _, _ in rows], fontsize=7)
    ax.set_xlabel("layer (problem index in the sweep)")
    ax.set_ylabel("speed-up of tuned over default config")
    if algorithms != ["-"]:
        ax.legend(handles=[matplotlib.patches.Patch(color=colors[a], label=a) for a in algorithms],
                  title="algorithm chosen", fontsize=7)
    interpreted = any(r.study.user_attrs.get("interpreted") for r in results)
    ax.set_title((title or "per-layer speed-up") + (" (Pallas interpreter, CPU)" if interpreted else ""), fontsize=9)
    return _save(fig, pathlib.Path(path))


def _save(fig, path: pathlib.Path, tight: bool = True) -> pathlib.Path:
    if tight:  # (Optuna's slice plot places its colour bar itself)
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
