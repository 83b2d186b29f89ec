"""Timing a kernel the way a paper needs it: compile kept apart, warm-up, repeats, median, spread."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

# Relative spread (p90 - p10) / median above which a measurement is flagged as disturbed by
# something else running on the machine (another process, clock changes, a noisy neighbour).
NOISY_SPREAD = 0.10


@dataclasses.dataclass(frozen=True)
class Timing:
    compile_seconds: float  # first call: tracing + compilation + one run
    median_seconds: float
    p10_seconds: float
    p90_seconds: float
    repeats: int

    @property
    def spread(self) -> float:
        return (self.p90_seconds - self.p10_seconds) / self.median_seconds if self.median_seconds > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "spread": self.spread, "noisy": self.noisy}


def time_callable(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10,
                  min_seconds: float = 0.0) -> Timing:
    """Time ``fn()`` (which returns jax arrays) with ``block_until_ready`` after every call.

    The first call is timed separately as compile time. Then ``warmup`` untimed calls, then
    at least ``repeats`` timed calls (more, until ``min_seconds`` of samples were taken).
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_seconds = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - t0)
    p10, p90 = np.percentile(samples, [10, 90])
    return Timing(compile_seconds, statistics.median(samples), float(p10), float(p90), len(samples))


def default_repeats() -> tuple[int, int]:
    """(warmup, repeats): interpreted CPU kernels are slow and steady; GPUs need more samples."""
    return (1, 3) if jax.default_backend() == "cpu" else (3, 20)
