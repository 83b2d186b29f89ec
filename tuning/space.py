"""The contract between a kernel and the autotuner.

A kernel module offers ``search_space(...) -> SearchSpace`` for one problem (shapes, dtypes).
The autotuner sees only this object: the knobs and their choices, a constraint check that
needs no compiling, a way to turn chosen knobs into the kernel's ``Config``, and what to time:
the function of a config and a maker of its inputs (``autotune.measure`` alone compiles, warms
up, rotates inputs and times them), or a ``measure`` function that returns the objectives
itself (e.g. MCU instruction counts). It never reaches into a kernel body.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# What abstract evaluation raises where inputs are made on the host (numpy packing of weights).
_HOST_ONLY = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
              jax.errors.TracerIntegerConversionError)


def parse_dims(text: str, form: str, example: str) -> list[int]:
    """The sizes of a ``--shape`` written as ``form``: as many ``x``-separated whole numbers >= 1
    as ``form`` names before any ``[...]`` options (``"MxNxK"``, ``"MxNxK[:gGROUP]"``: three), or a
    ValueError that names the form and an example."""
    try:
        dims = [int(d) for d in text.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) != form.split("[")[0].count("x") + 1 or min(dims) < 1:
        raise ValueError(f"shape {text!r} is not {form} with sizes >= 1, e.g. {example}")
    return dims


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
    fn:         ``Config -> ((*inputs) -> jax.Array)``: the kernel with this config as a function of
                its array inputs (the public op, so the timed program is what users run). It is
                traced once per config; Python-side checks run then, never inside the timed loop.
    make_inputs: ``seed -> tuple`` of the inputs of ``fn`` for this problem (arrays, or pytrees of
                arrays); different seeds give different values of the same shapes, which is how
                ``autotune.measure`` rotates input sets past the last-level cache.
    measure:    ``Config -> dict[objective name, float]`` for objectives that are not time;
                given instead of ``fn``/``make_inputs``.
    objectives: what is minimised/maximised; seconds by default.
    default:    the heuristic config's params, enqueued as the first trial.
    interpreted: ``fn`` runs Pallas in interpret mode here, so its timings are of the interpreter,
                not of a kernel (Pallas kernels on a CPU: ``platform.interpret_default()``); False
                for compiled code (the CPU kernels of ``kernels/cpu``, XLA) and for ``measure=``.
    """

    kernel: str
    problem: dict
    knobs: tuple[Knob, ...]
    violations: Callable[[dict], list[str]]
    to_config: Callable[[dict], Any]
    fn: Callable[[Any], Callable[..., Any]] | None = None
    make_inputs: Callable[[int], Sequence] | None = None
    measure: Callable[[Any], dict] | None = None
    objectives: tuple[Objective, ...] = SECONDS
    default: dict | None = None
    interpreted: bool = False

    def __post_init__(self):
        timed = self.fn is not None and self.make_inputs is not None
        if timed == (self.measure is not None) or (self.fn is None) != (self.make_inputs is None):
            raise ValueError(f"SearchSpace({self.kernel!r}) needs either fn= and make_inputs= (timed) "
                             "or measure=, not both")
        names = [k.name for k in self.knobs]
        if len(set(names)) != len(names):
            raise ValueError(f"SearchSpace({self.kernel!r}) has duplicate knob names: {names}")

    def run(self, config: Any, seed: int = 0) -> Any:
        """The kernel's output for ``config`` on input set ``seed`` (untimed: tests, replay checks)."""
        if self.fn is None:
            raise ValueError(f"SearchSpace({self.kernel!r}) has no fn to run; it is measured by measure=")
        return self.fn(config)(*self.make_inputs(seed))

    def problem_bytes(self) -> int | None:
        """Bytes of one input set and of the default config's result, from the shapes and dtypes
        of ``make_inputs`` and ``fn`` evaluated abstractly (``jax.eval_shape``: nothing is
        allocated, compiled or run), so that a problem too big for the device is refused before
        anything is. None for a ``measure=`` space, or where the inputs are made on the host (numpy)
        and have no abstract form."""
        if self.fn is None:
            return None
        try:
            inputs = jax.eval_shape(lambda: self.make_inputs(0))
            result = jax.eval_shape(self.fn(self.to_config(self.default or {})), *inputs)
        except _HOST_ONLY:
            return None
        except OverflowError:  # a size past what an array index (int64) holds: no device has that memory
            problem = " ".join(f"{k}={v}" for k, v in self.problem.items())
            raise ValueError(f"{self.kernel} problem {problem}: a size is too large to index an array; "
                             "choose a smaller --shape") from None
        return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree.leaves((inputs, result)))
