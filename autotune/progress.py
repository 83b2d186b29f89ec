"""Progress of a sweep: on a terminal one bar over every problem with its ETA; otherwise (a log,
a pipe, a batch job) one flushed line per finished trial, so that a long sweep is never silent."""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState


def format_value(value: float | None, objective: str) -> str:
    """An objective's value as people read it: seconds in ms, counts with thousands separators."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if objective == "seconds":
        return f"{value * 1e3:.4g} ms"
    return f"{value:,.0f}"


def describe_trial(study: optuna.Study, trial: FrozenTrial) -> str:
    """One line: the trial's outcome and the knobs it sampled."""
    knobs = " ".join(f"{k}={v}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        if trial.user_attrs.get("violations"):
            return f"illegal ({'; '.join(trial.user_attrs['violations'])[:160]}) {knobs}"
        names = study.metric_names or [f"objective{i}" for i in range(len(trial.values or []))]
        values = ", ".join(format_value(v, n) for n, v in zip(names, trial.values or []))
        return f"{values}  {knobs}"
    if trial.state == TrialState.FAIL:
        reason = trial.user_attrs.get("error", "interrupted")
        return f"FAIL {reason.splitlines()[0][:160] if reason else ''}  {knobs}"
    if trial.state == TrialState.PRUNED:
        reason = trial.user_attrs.get("error") or trial.user_attrs.get("budget", "pruned")
        return f"skipped: {reason}  {knobs}"
    return f"{trial.state.name} {knobs}"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def complete_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


class SweepProgress:
    """``n_problems`` x ``n_trials`` COMPLETE trials to go.

    bar: draw a bar (default: when ``stream`` is a terminal). lines: print one line per finished
    trial (default: when it is not). Counts are the studies' COMPLETE trials, so trials that other
    workers finish on a shared study move the bar too, and a resumed study starts where it was.
    """

    def __init__(self, n_problems: int, n_trials: int, *, bar: bool | None = None, lines: bool | None = None,
                 stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lines = (not tty) if lines is None else lines
        self.n_problems, self.n_trials = n_problems, n_trials
        self.total = n_problems * n_trials
        self.index, self.name = 0, ""
        self.done = 0
        self.started: tuple[float, int] | None = None  # (time, done) when this process began
        self.bar = None
        if tty if bar is None else bar:
            from tqdm.std import tqdm

            self.bar = tqdm(total=self.total, unit="trial", file=self.stream, dynamic_ncols=True, leave=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}]")

    def start_problem(self, index: int, name: str, study: optuna.Study | None = None) -> None:
        self.index, self.name = index, name
        self._set(index * self.n_trials + (min(complete_trials(study), self.n_trials) if study else 0))
        if self.bar is not None:
            self.bar.set_description_str(f"problem {index + 1}/{self.n_problems} {name[:48]}")

    def update(self, done: int) -> None:
        self._set(done)

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """An Optuna callback: move to the study's COMPLETE count; a line when not on a terminal."""
        self._set(self.index * self.n_trials + min(complete_trials(study), self.n_trials))
        if self.lines:
            self.write(f"[{self.index + 1}/{self.n_problems} {self.name}] trial {trial.number} "
                       f"{describe_trial(study, trial)} | {self.done}/{self.total} done, {self.eta()}")

    def eta(self) -> str:
        now = time.monotonic()
        t0, done0 = self.started or (now, self.done)
        elapsed = now - t0
        if self.done <= done0:
            return f"elapsed {_clock(elapsed)}"
        remaining = elapsed / (self.done - done0) * (self.total - self.done)
        return f"elapsed {_clock(elapsed)}, eta {_clock(remaining)}"

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _set(self, done: int) -> None:
        self.done = done
        if self.started is None:  # the rate (and so the ETA) counts trials run since now only
            self.started = (time.monotonic(), done)
            if self.bar is not None:
                self.bar.initial = done
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
