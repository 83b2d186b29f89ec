"""The contract between a kernel and the autotuner.

A kernel module offers ``search_space(...) -> SearchSpace`` for one problem (shapes, dtypes).
The autotuner sees only this object: the knobs and their choices, a constraint check that
needs no compiling, a way to turn chosen knobs into the kernel's ``Config``, and a runner to
time (or a ``measure`` function that returns the objectives itself, e.g. MCU instruction
counts). It never reaches into a kernel body.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

# Bytes of distinct inputs a runner cycles through on an accelerator so that repeated calls read
# device memory, not the last call's operands left in L2 (50-60 MB on H100/H200).
ROTATE_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Knob:
    """One tunable: its name (a ``Config`` field) and the values it may take.

    when: a conditional knob, e.g. ``{"algorithm": ("winograd",)}``: sampled only when every
        named (earlier) knob holds one of the listed values; otherwise it keeps the default and
        is absent from the trial, so the sampler never learns from a knob that had no effect.
    """

    name: str
    choices: tuple
    when: dict | None = None

    def active(self, params: dict) -> bool:
        return not self.when or all(params.get(k) in allowed for k, allowed in self.when.items())


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str  # "seconds", "instructions", "peak_sram_bytes", ...
    direction: str = "minimize"


SECONDS = (Objective("seconds"),)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Everything the autotuner may know about one kernel on one problem.

    kernel:     the kernel's registry name, e.g. ``"matmul"``.
    problem:    JSON-able description (shapes, dtypes, ...); with the device kind and the jax
                version it keys the best-config cache.
    knobs:      the tunables, in the order they should be sampled.
    violations: ``params -> list[str]``: why a choice is illegal (tile does not divide, shared
                memory over budget, non power-of-2 block on Triton); empty when legal. Called
                before anything is compiled; its messages are what Optuna records.
    to_config:  ``params -> Config`` of the kernel.
    runner:     ``Config -> (() -> jax.Array)``: a function that runs the kernel once on fixed
                example inputs (already placed on the device); the autotuner compiles it once
                and times repeated calls. ``None`` when ``measure`` is given.
    measure:    ``Config -> dict[objective name, float]`` for objectives that are not wall time.
    objectives: what is minimised/maximised; seconds by default.
    default:    the heuristic config's params, enqueued as the first trial.
    """

    kernel: str
    problem: dict
    knobs: tuple[Knob, ...]
    violations: Callable[[dict], list[str]]
    to_config: Callable[[dict], Any]
    runner: Callable[[Any], Callable[[], Any]] | None = None
    measure: Callable[[Any], dict] | None = None
    objectives: tuple[Objective, ...] = SECONDS
    default: dict | None = None

    def __post_init__(self):
        if (self.runner is None) == (self.measure is None):
            raise ValueError(f"SearchSpace({self.kernel!r}) needs exactly one of runner= or measure=")
        names = [k.name for k in self.knobs]
        if len(set(names)) != len(names):
            raise ValueError(f"SearchSpace({self.kernel!r}) has duplicate knob names: {names}")


def rotating_runner(fn: Callable, make_inputs: Callable[[int], Sequence], *, on_accelerator: bool) -> Callable[[], Any]:
    """``() -> fn(*inputs)`` cycling over enough input sets (``make_inputs(seed)``) to overflow L2.

    ``fn`` should be jitted, so that a timed call costs one dispatch, not Python-side validation.
    On the CPU one input set is used.
    """
    first = list(make_inputs(0))
    copies = 1
    if on_accelerator:
        nbytes = sum(x.size * x.dtype.itemsize for x in first)
        copies = max(1, min(16, math.ceil(ROTATE_BYTES / max(nbytes, 1))))
    sets = itertools.cycle([first] + [list(make_inputs(seed)) for seed in range(1, copies)])
    return lambda: fn(*next(sets))
