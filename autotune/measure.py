"""Timing a kernel the way a paper needs it: compile kept apart, warm-up, repeats, median, spread."""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# Relative spread (p90 - p10) / median above which a measurement is flagged as disturbed by
# something else running on the machine (another process, clock changes, a noisy neighbour).
NOISY_SPREAD = 0.10


@dataclasses.dataclass(frozen=True)
class Timing:
    compile_seconds: float  # first call: tracing + compilation + one run
    median_seconds: float  # per call
    p10_seconds: float
    p90_seconds: float
    repeats: int  # timed samples
    calls_per_sample: int  # back-to-back calls in each sample (amortises dispatch and sync)

    @property
    def spread(self) -> float:
        return (self.p90_seconds - self.p10_seconds) / self.median_seconds if self.median_seconds > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "spread": self.spread, "noisy": self.noisy}


def time_callable(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10,
                  sample_seconds: float | None = None) -> Timing:
    """Time ``fn()`` (which returns jax arrays), waiting with ``block_until_ready``.

    The first call is timed separately as compile time. Then ``warmup`` untimed calls, then
    ``repeats`` timed samples. Each sample runs ``fn`` back to back enough times to last about
    ``sample_seconds`` (default: 5 ms on an accelerator, one call on the CPU) and waits once at
    the end, so that launch and host-sync overheads do not dominate sub-millisecond kernels;
    the per-call time is the sample's time over its call count.
    """
    if sample_seconds is None:
        sample_seconds = 0.0 if jax.default_backend() == "cpu" else 0.005
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_seconds = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    single = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, min(1000, int(sample_seconds / single)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls)
    p10, p90 = np.percentile(samples, [10, 90])
    return Timing(compile_seconds, statistics.median(samples), float(p10), float(p90), len(samples), calls)


def default_repeats() -> tuple[int, int]:
    """(warmup, repeats): interpreted CPU kernels are slow and steady; GPUs need more samples."""
    return (1, 3) if jax.default_backend() == "cpu" else (3, 20)
