"""The one timing protocol: every figure the tuner, the kernels' search spaces and the benchmarks
report is taken here, so that a reader can say what each number measures.

A *workload* is a kernel with its inputs, the shape every timed thing takes:

* ``fn`` (a function of arrays, usually a public op with its config bound) is jitted and
  compiled once, before anything is timed; its compile time is recorded apart. Its Python-side
  work (validation, config resolution) runs at trace time, never inside the timed loop: the
  loop calls the compiled executable.
* ``make_inputs(seed)`` makes input sets; enough of them are kept on the device that the bytes
  of the other sets exceed the last-level cache (the GPU's L2, the CPU's L3, read from the
  driver or sysfs), and calls cycle through them, so a repeated call reads memory, not the
  operands the previous call left in cache. Capped at ``MAX_INPUT_SETS``; ``Timing.cold_cache``
  says whether the cap was hit.
* Each timed *sample* runs ``calls_per_sample`` calls back to back (about ``SAMPLE_SECONDS`` on
  a GPU, one on the CPU) and waits once. On an NVIDIA GPU a sample's figure is *device time*:
  the summed time of the kernels the calls launched, from CUPTI (the profiler JAX's Mosaic GPU
  profiler uses); the wall time of the jitted calls is recorded beside it. Elsewhere (CPU, or no
  CUPTI) the figure is wall time, and ``Timing.timer`` says so.

Any zero-argument callable that blocks until done (a llama.cpp call in a child process, a whole
jitted decode step with its arguments bound) may be timed too: its first call counts as compile,
and its samples are wall time.

``compare`` times several contenders interleaved, round by round, and reports medians with 95%
bootstrap intervals; a ratio is a win or a loss only when the intervals do not overlap.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from tuning import platform

# Relative spread (p90 - p10) / median above which a measurement is flagged as disturbed by
# something else running on the machine (another process, clock changes, a noisy neighbour).
NOISY_SPREAD = 0.10
MAX_INPUT_SETS = 64
SAMPLE_SECONDS = 0.002  # per sample on a GPU: long enough that one host sync is a small part of it
MIN_ROUNDS = 10
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def bootstrap_interval(samples: Sequence[float], *, level: float = CONFIDENCE,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``samples`` (deterministic for a seed)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, (resamples, x.size))], axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(medians, [alpha, 1.0 - alpha])
    return float(low), float(high)


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], *, level: float = CONFIDENCE,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of median(numerator) / median(denominator), resampling rounds in pairs
    (the two lists were taken interleaved, round by round)."""
    a, b = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    n = min(a.size, b.size)
    if n == 0:
        return math.nan, math.nan
    a, b = a[:n], b[:n]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, (resamples, n))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Timing: what one measurement holds
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """The samples of one measurement and what they measure.

    samples_seconds: per-call time of each sample, device-side where ``timer == "cupti"``, else wall.
    wall_samples_seconds: per-call wall time of each sample (the jitted call from the host).
    kernels: device time per call of each kernel the calls launched (CUPTI only), by kernel name.
    """

    compile_seconds: float  # first call: tracing + compilation (+ one run for a plain callable)
    samples_seconds: tuple[float, ...]
    wall_samples_seconds: tuple[float, ...]
    calls_per_sample: int  # back-to-back calls in each sample (amortises dispatch and sync)
    timer: str = "wall"  # "cupti" (device-side kernel time) or "wall"
    timer_note: str = ""  # why the device timer was not used, where it was not
    input_sets: int = 1
    bytes_per_input_set: int = 0
    cache_bytes: int = 0
    kernels: tuple[tuple[str, float], ...] = ()

    @property
    def repeats(self) -> int:
        return len(self.samples_seconds)

    @property
    def median_seconds(self) -> float:
        return float(np.median(self.samples_seconds))

    @property
    def wall_median_seconds(self) -> float:
        return float(np.median(self.wall_samples_seconds))

    @property
    def p10_seconds(self) -> float:
        return float(np.percentile(self.samples_seconds, 10))

    @property
    def p90_seconds(self) -> float:
        return float(np.percentile(self.samples_seconds, 90))

    @property
    def interval_seconds(self) -> tuple[float, float]:
        """95% bootstrap interval of the median."""
        return bootstrap_interval(self.samples_seconds)

    @property
    def spread(self) -> float:
        med = self.median_seconds
        return (self.p90_seconds - self.p10_seconds) / med if med > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    @property
    def cold_cache(self) -> bool:
        """Whether the other input sets' bytes exceed the last-level cache (each call reads memory)."""
        return (self.input_sets - 1) * self.bytes_per_input_set >= self.cache_bytes > 0

    def as_dict(self) -> dict:
        low, high = self.interval_seconds
        return {
            "compile_seconds": self.compile_seconds, "median_seconds": self.median_seconds,
            "ci_low_seconds": low, "ci_high_seconds": high, "p10_seconds": self.p10_seconds,
            "p90_seconds": self.p90_seconds, "wall_median_seconds": self.wall_median_seconds,
            "repeats": self.repeats, "calls_per_sample": self.calls_per_sample, "spread": self.spread,
            "noisy": self.noisy, "timer": self.timer, "timer_note": self.timer_note,
            "input_sets": self.input_sets, "bytes_per_input_set": self.bytes_per_input_set,
            "cache_bytes": self.cache_bytes, "cold_cache": self.cold_cache,
            "kernels": [list(k) for k in self.kernels],
            "samples_seconds": list(self.samples_seconds), "wall_samples_seconds": list(self.wall_samples_seconds),
        }


# ---------------------------------------------------------------------------------------------
# Workloads: a compiled function and its rotating input sets
# ---------------------------------------------------------------------------------------------


class Stopwatch:
    """The project's one wall clock, for phases that are reported rather than compared (compile
    time, a ``generate`` run's prefill and decode): ``with Stopwatch() as w: ...`` then ``w.seconds``.
    Comparisons go through ``compare``; this only keeps every clock read in this module."""

    seconds: float = 0.0

    def __enter__(self) -> Self:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start


@dataclasses.dataclass
class InputSets:
    sets: list[tuple]
    bytes_per_set: int
    cache_bytes: int


def _nbytes(tree) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


_last_inputs: tuple[Callable, InputSets] | None = None  # the tuner measures many configs on one problem


def input_sets(make_inputs: Callable[[int], Sequence], *, cache_bytes: int | None = None) -> InputSets:
    """Input sets ``make_inputs(0), make_inputs(1), ...`` on the device, enough that the other sets'
    bytes exceed ``cache_bytes`` (default: the device's last-level cache), at most ``MAX_INPUT_SETS``.

    The sets of the last ``make_inputs`` are kept, so the configs of one search space share them.
    """
    global _last_inputs
    if _last_inputs is not None and _last_inputs[0] is make_inputs and cache_bytes is None:
        return _last_inputs[1]
    cache = platform.last_level_cache_bytes() if cache_bytes is None else cache_bytes
    first = jax.device_put(tuple(make_inputs(0)))
    nbytes = _nbytes(first)
    count = min(MAX_INPUT_SETS, 1 + math.ceil(cache / max(nbytes, 1)))
    sets = [first] + [jax.device_put(tuple(make_inputs(seed))) for seed in range(1, count)]
    jax.block_until_ready(sets)
    result = InputSets(sets, nbytes, cache)
    if cache_bytes is None:
        _last_inputs = (make_inputs, result)
    return result


class Workload:
    """A compiled function and its input sets; calling it runs the next input set (asynchronously).

    Build it with ``workload(fn, make_inputs)``.
    """

    def __init__(self, compiled, inputs: InputSets, compile_seconds: float, name: str = ""):
        self.compiled = compiled
        self.inputs = inputs
        self.compile_seconds = compile_seconds
        self.name = name
        self._next = 0

    def __call__(self) -> Any:
        args = self.inputs.sets[self._next]
        self._next = (self._next + 1) % len(self.inputs.sets)
        return self.compiled(*args)

    def hlo_text(self) -> str:
        """The optimized HLO XLA compiled (what ran: fusions, custom calls)."""
        return self.compiled.as_text()

    def xla_kernels(self) -> dict:
        return xla_kernels(self.hlo_text())


def workload(fn: Callable, make_inputs: Callable[[int], Sequence], *, name: str = "",
             cache_bytes: int | None = None) -> Workload:
    """Jit and compile ``fn`` for ``make_inputs``' shapes (compile time measured apart); see module doc."""
    inputs = input_sets(make_inputs, cache_bytes=cache_bytes)
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    with Stopwatch() as w:
        compiled = jitted.lower(*inputs.sets[0]).compile()
    return Workload(compiled, inputs, w.seconds, name)


def xla_kernels(hlo_text: str) -> dict:
    """What an optimized HLO module runs: custom-call targets (cuBLAS, cuDNN, Triton, Mosaic GPU,
    oneDNN), fusions (name, kind and, for custom fusions, the backend: ``__triton_gemm``,
    ``__cudnn$fusion``, ...) and the top-level ops of its entry computation."""
    custom_calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))
    fusions = []
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\sfusion\(.*?kind=(k\w+)", line)
        if m:
            fusion = {"name": m[1], "kind": m[2]}
            backend = re.search(r'"kind":"([^"]+)"', line)  # e.g. __triton_gemm, __cudnn$fusion
            if backend:
                fusion["backend_kind"] = backend[1]
            fusions.append(fusion)
    entry = re.search(r"^ENTRY .*?\{\n(.*?)^\}", hlo_text, re.MULTILINE | re.DOTALL)
    ops = []
    if entry:
        for line in entry[1].splitlines():
            m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(", line)
            if m and m[1] not in ("parameter", "tuple", "get-tuple-element", "bitcast", "constant"):
                ops.append(m[1])
    return {"custom_calls": custom_calls, "fusions": fusions, "entry_ops": ops}


def pallas_calls(closed_jaxpr) -> list[dict]:
    """The Pallas kernels a traced function launches, from its jaxpr (``jax.make_jaxpr(f)(...)`` or
    ``jax.jit(f).trace(...).jaxpr``): before lowering, so the same whether the kernels will be
    interpreted or compiled. One entry per call site: ``name`` (the pallas_call's ``name=``),
    ``grid``, ``calls`` (times it runs per call of the function: a ``scan`` body's kernels run once
    per iteration; a while loop's body is counted once), and the kernel's own cost estimate
    (``flops``, ``bytes_accessed``; None where it gives none)."""
    found: list[dict] = []

    def walk(jaxpr, times: int) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                cost = eqn.params.get("cost_estimate")
                found.append({"name": eqn.params.get("name") or "pallas_call",
                              "grid": tuple(int(g) for g in eqn.params["grid_mapping"].grid),
                              "calls": times,
                              "flops": None if cost is None else int(cost.flops),
                              "bytes_accessed": None if cost is None else int(cost.bytes_accessed)})
                continue
            inner = times * int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else times
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub, inner)

    walk(getattr(closed_jaxpr, "jaxpr", closed_jaxpr), 1)
    return found


# ---------------------------------------------------------------------------------------------
# Device-side time (NVIDIA GPUs): CUPTI kernel activity through jax's Mosaic GPU extension
# ---------------------------------------------------------------------------------------------


def _cupti():
    """``(start, stop)``: start a CUPTI kernel-activity session; stop it and return the kernels
    recorded as ``[(name, milliseconds), ...]``. Raises RuntimeError saying why it is unavailable."""
    if platform.backend() != "gpu":
        raise RuntimeError("device-side timing needs an NVIDIA GPU")
    try:
        from jax._src.lib import mosaic_gpu as mosaic_gpu_lib

        ext = mosaic_gpu_lib._mosaic_gpu_ext
        start, get = ext._cupti_init, ext._cupti_get_timings
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"CUPTI through jax's Mosaic GPU extension is unavailable ({e})") from None

    def stop():
        try:
            return get(True)  # True: detach CUPTI after reading, as jax's profiler does
        except TypeError:  # older extensions take no argument
            return get()

    return start, stop


def _device_sample(target: Workload, calls: int) -> tuple[float, dict[str, float]]:
    """Per-call device time of ``calls`` calls, and each kernel's per-call time."""
    start, stop = _cupti()
    start()
    try:
        out = None
        for _ in range(calls):
            out = target()
        jax.block_until_ready(out)
    finally:
        recorded = stop()
    if not recorded:
        raise RuntimeError(f"CUPTI recorded no kernel for {calls} call(s)")
    per_kernel: dict[str, float] = {}
    for name, ms in recorded or ():
        per_kernel[name] = per_kernel.get(name, 0.0) + ms * 1e-3 / calls
    return sum(per_kernel.values()), per_kernel


def _wall_sample(target: Callable[[], Any], calls: int) -> float:
    out = None
    with Stopwatch() as w:
        for _ in range(calls):
            out = target()
        jax.block_until_ready(out)
    return w.seconds / calls


# ---------------------------------------------------------------------------------------------
# Timing one target, comparing several
# ---------------------------------------------------------------------------------------------


def default_repeats() -> tuple[int, int]:
    """(warmup, repeats): interpreted CPU kernels are slow and steady; GPUs need more samples."""
    return (1, 3) if platform.backend() == "cpu" else (3, 20)


class _Sampler:
    """One target made ready to sample: compiled, warmed up, its calls per sample chosen."""

    def __init__(self, target, *, warmup: int, sample_seconds: float | None, device: bool | None):
        if sample_seconds is None:
            sample_seconds = SAMPLE_SECONDS if platform.backend() == "gpu" else 0.0
        self.target = target
        self.is_workload = isinstance(target, Workload)
        if self.is_workload:
            self.compile_seconds = target.compile_seconds
            jax.block_until_ready(target())
        else:
            with Stopwatch() as w:
                jax.block_until_ready(target())
            self.compile_seconds = w.seconds
        for _ in range(warmup):
            jax.block_until_ready(target())
        single = max(_wall_sample(target, 1), 1e-7)
        self.calls = max(1, min(1000, int(sample_seconds / single)))
        self.timer, self.note = "wall", ""
        want_device = self.is_workload if device is None else device
        if want_device:
            try:
                _device_sample(target, 1)  # probe once: the first CUPTI session pays its setup
                self.timer = "cupti"
            except Exception as e:  # noqa: BLE001 -- no device timer: wall time, and the reason recorded
                self.note = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        elif self.is_workload and platform.backend() == "gpu":
            self.note = "device timing not requested"
        self.samples: list[float] = []
        self.wall: list[float] = []
        self.kernels: dict[str, list[float]] = {}

    def sample(self) -> None:
        wall = _wall_sample(self.target, self.calls)
        self.wall.append(wall)
        if self.timer == "cupti":
            seconds, per_kernel = _device_sample(self.target, self.calls)
            self.samples.append(seconds)
            for name, s in per_kernel.items():
                self.kernels.setdefault(name, []).append(s)
        else:
            self.samples.append(wall)

    def timing(self) -> Timing:
        inputs = self.target.inputs if self.is_workload else None
        kernels = tuple(sorted(((name, float(np.median(v))) for name, v in self.kernels.items()),
                               key=lambda kv: -kv[1]))
        return Timing(self.compile_seconds, tuple(self.samples), tuple(self.wall), self.calls, self.timer, self.note,
                      input_sets=len(inputs.sets) if inputs else 1,
                      bytes_per_input_set=inputs.bytes_per_set if inputs else 0,
                      cache_bytes=inputs.cache_bytes if inputs else 0, kernels=kernels)


def time_callable(target: Workload | Callable[[], Any], *, warmup: int | None = None, repeats: int | None = None,
                  sample_seconds: float | None = None, device: bool | None = None) -> Timing:
    """Time ``target``: a ``Workload`` (see ``workload``) or any zero-argument callable.

    Compilation (a workload's, or a callable's first call) is kept apart, then ``warmup`` untimed
    calls, then ``repeats`` samples. device: use device-side timing (default: for workloads, where
    the device offers it).
    """
    default_warmup, default_repeat = default_repeats()
    sampler = _Sampler(target, warmup=default_warmup if warmup is None else warmup,
                       sample_seconds=sample_seconds, device=device)
    for _ in range(default_repeat if repeats is None else repeats):
        sampler.sample()
    return sampler.timing()


def time_space(space, config, *, warmup: int | None = None, repeats: int | None = None) -> Timing:
    """Time one config of a kernel's ``SearchSpace`` (``space.fn(config)`` on ``space.make_inputs``)."""
    return time_callable(workload(space.fn(config), space.make_inputs, name=space.kernel), warmup=warmup,
                         repeats=repeats)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Contenders timed interleaved; ratios are baseline time over contender time (> 1: faster)."""

    timings: dict[str, Timing]
    baseline: str
    rounds: int

    def ratio(self, name: str) -> dict:
        """Speed-up of ``name`` over the baseline, its 95% interval, and the verdict: "win" or "loss"
        only when the two medians' intervals do not overlap, otherwise "parity"."""
        base, other = self.timings[self.baseline], self.timings[name]
        b_low, b_high = base.interval_seconds
        o_low, o_high = other.interval_seconds
        verdict = "win" if o_high < b_low else "loss" if o_low > b_high else "parity"
        low, high = ratio_interval(base.samples_seconds, other.samples_seconds)
        return {"ratio": base.median_seconds / other.median_seconds, "ratio_ci_low": low, "ratio_ci_high": high,
                "verdict": verdict}

    def as_dict(self) -> dict:
        return {
            "baseline": self.baseline, "rounds": self.rounds, "order": "interleaved, rotated each round",
            "confidence": CONFIDENCE, "timings": {name: t.as_dict() for name, t in self.timings.items()},
            "ratios": {name: self.ratio(name) for name in self.timings if name != self.baseline},
        }


def compare(contenders: Mapping[str, Workload | Callable[[], Any]], *, baseline: str | None = None,
            rounds: int | None = None, warmup: int | None = None, sample_seconds: float | None = None,
            device: bool | None = None) -> Comparison:
    """Time ``contenders`` (name -> Workload or zero-argument callable) interleaved: each of
    ``rounds`` (>= 10) rounds takes one sample of every contender, in an order rotated every
    round (A B, B A, A B, ...) so none always runs first. baseline: the name ratios are taken
    against (default: the first)."""
    names = list(contenders)
    if len(names) < 2:
        raise ValueError(f"compare needs at least two contenders, got {names}")
    baseline = names[0] if baseline is None else baseline
    if baseline not in contenders:
        raise ValueError(f"baseline {baseline!r} is not one of the contenders {names}")
    default_warmup, default_repeat = default_repeats()
    rounds = max(MIN_ROUNDS, default_repeat) if rounds is None else rounds
    if rounds < MIN_ROUNDS:
        raise ValueError(f"rounds={rounds}: a comparison needs at least {MIN_ROUNDS} interleaved rounds")
    samplers = {name: _Sampler(target, warmup=default_warmup if warmup is None else warmup,
                               sample_seconds=sample_seconds, device=device)
                for name, target in contenders.items()}
    if len({s.timer for s in samplers.values()}) > 1:  # a ratio compares like with like
        without = sorted(name for name, s in samplers.items() if s.timer != "cupti")
        for s in samplers.values():
            s.timer, s.note = "wall", f"wall time for every contender: no device time for {', '.join(without)}"
    for r in range(rounds):
        for i in range(len(names)):
            samplers[names[(r + i) % len(names)]].sample()
    return Comparison({name: s.timing() for name, s in samplers.items()}, baseline, rounds)


# ---------------------------------------------------------------------------------------------
# Rooflines
# ---------------------------------------------------------------------------------------------


def peak_flops(program: Callable[[], Any], flops: float, *, repeats: int = 9) -> float:
    """A compute ceiling (flop/s): ``flops`` over the time of ``program`` (e.g. a CPU's FMA chains,
    ``kernels.cpu.matmul.fma_peak``). The fastest tenth of the samples, not the median: the others
    ran beside whatever else shares the machine, and a ceiling is what the hardware can do."""
    return flops / time_callable(program, warmup=1, repeats=repeats).p10_seconds


def read_bandwidth(nbytes: int | None = None, *, repeats: int | None = None) -> dict:
    """Measured device-to-device read stream: bytes over the time of ``jnp.sum`` of an f32 array
    of ``nbytes`` (default: 8x the last-level cache, at least 256 MiB on a GPU), timed by this
    protocol (device-side on a GPU), beside the datasheet bandwidth. Memory-bound rooflines state both."""
    cache = platform.last_level_cache_bytes()
    if nbytes is None:
        nbytes = max(8 * cache, 256 * 2**20) if platform.backend() == "gpu" else 4 * cache
    n = nbytes // 4

    def make_inputs(seed):
        return (jnp.full((n,), float(seed + 1), jnp.float32),)

    t = time_callable(workload(lambda x: jnp.sum(x), make_inputs, name="read_stream"), repeats=repeats)
    low, high = t.interval_seconds
    return {"method": "jnp.sum over a float32 array (one read of every byte)", "bytes": n * 4,
            "seconds": t.median_seconds, "measured_bytes_per_second": n * 4 / t.median_seconds,
            "measured_ci_bytes_per_second": [n * 4 / high, n * 4 / low], "timer": t.timer,
            "nominal_bytes_per_second": platform.nominal_bandwidth(), "device": platform.device_kind()}
