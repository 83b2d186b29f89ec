"""Pallas matmul (tuned and heuristic configs) against ``jnp.dot(a, b)`` as a user writes it.

    python benchmarks/matmul.py                  # GPU: square 1024-8192 + LLaMA-2-7B projections, bf16
    python benchmarks/matmul.py --quick          # CPU-sized shapes (the interpreter: not kernel speed)
    python benchmarks/matmul.py --shapes 4096x4096x4096 --trials 30 --out results/matmul.json

Each shape is first tuned (a study in --storage, by default a SQLite file beside --out that a
re-run resumes; seed 0, no warm start, the best-config cache untouched), then XLA, the heuristic config and the tuned config are
timed by ``autotune.measure``: compiled once, input sets rotated past the last-level cache,
interleaved for --rounds rounds, device-side kernel time on a GPU. Each row records medians with
95% bootstrap intervals, the ratio and its verdict (win/loss only when the intervals do not
overlap, else parity), the raw samples, the kernels XLA compiled for ``jnp.dot`` and the error
of both against an f32 reference. ``python -m autotune report OUT.json`` prints the tables again.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import cli
from autotune import measure, results
from kernels import matmul as mm
from tuning import platform

SQUARE = [1024, 2048, 4096, 8192]
LLAMA_MNK = [(m, n, k) for m in (1, 16, 128, 2048) for (k, n) in ((4096, 4096), (4096, 11008), (11008, 4096))]
QUICK = [(128, 128, 128), (16, 256, 256), (96, 80, 200)]
# Float kernels state their tolerance: relative Frobenius error against an f32 (HIGHEST) product.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


def relative_error(out, ref) -> float:
    out = out.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def bench_shape(m: int, n: int, k: int, dtype: str, *, trials: int, rounds: int | None, storage: str,
                bandwidth: dict | None) -> dict:
    problem = mm.problem_key(m, n, k, dtype)
    space = mm.search_space(problem)
    default_cfg = space.to_config(space.default)
    tuned_cfg = default_cfg
    if trials > 0:
        from autotune import tuner  # needs optuna; --trials 0 runs without it

        result = tuner.tune(space, storage=storage, n_trials=trials, seed=0, warm_start=False, write_cache=False)
        if result.best_params:
            tuned_cfg = space.to_config(result.best_params)
    xla = measure.workload(lambda a, b: jnp.dot(a, b), space.make_inputs, name="xla")
    contenders = {"xla": xla, "default": measure.workload(space.fn(default_cfg), space.make_inputs, name="default")}
    described = {"xla": {"what": "jnp.dot(a, b)", "xla_kernels": xla.xla_kernels()},
                 "default": {"what": "matmul(a, b) with the heuristic config", "config": default_cfg.params()}}
    if tuned_cfg != default_cfg:
        contenders["tuned"] = measure.workload(space.fn(tuned_cfg), space.make_inputs, name="tuned")
        described["tuned"] = {"what": f"matmul(a, b) with the best of {trials} trials", "config": tuned_cfg.params()}
    comparison = measure.compare(contenders, baseline="xla", rounds=rounds)

    a, b = space.make_inputs(0)
    ref = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    errors = {"xla": relative_error(jnp.dot(a, b), ref)}
    for name, cfg in (("default", default_cfg), ("tuned", tuned_cfg)):
        if name in contenders:
            errors[name] = relative_error(space.fn(cfg)(a, b), ref)
    nbytes = (m * k + k * n + m * n) * jnp.dtype(dtype).itemsize
    peak = platform.nominal_peak_flops(dtype)
    roofline = {"flop_bound_seconds_nominal": mm.flops(problem) / peak if peak else None,
                "memory_bound_seconds_measured": nbytes / bandwidth["measured_bytes_per_second"] if bandwidth else None,
                "memory_bound_seconds_nominal": nbytes / platform.nominal_bandwidth()
                if platform.nominal_bandwidth() else None}
    return results.comparison_row(
        f"{dtype}", f"{m}x{n}x{k}", problem, comparison, described, flops=mm.flops(problem), bytes=nbytes,
        roofline=roofline, relative_error_vs_f32=errors, tolerance=TOLERANCE.get(dtype),
        tuned_is_default=tuned_cfg == default_cfg, trials=trials)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    p = cli.ArgumentParser(prog="benchmarks/matmul.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (CPU); the default on a CPU")
    p.add_argument("--shapes", nargs="*", help="MxNxK shapes instead of the default list")
    p.add_argument("--dtype", default=None, choices=TOLERANCE, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--trials", type=cli.whole_number(0), default=None,
                   help="autotuner trials per shape (default 24 GPU, 3 CPU; 0: none)")
    p.add_argument("--rounds", type=cli.whole_number(measure.MIN_ROUNDS), default=None,
                   help="interleaved rounds (default 10 CPU, 30 GPU)")
    p.add_argument("--storage", default=None, help="Optuna storage (default: a fresh SQLite file beside --out)")
    p.add_argument("--out", default="results/benchmark_matmul.json")
    cli.add_debug(p)
    args = p.parse_args(argv)

    on_gpu = platform.backend() == "gpu"
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.shapes:
        shapes = [tuple(mm.parse_shape(s)[d] for d in ("m", "n", "k")) for s in args.shapes]
    elif args.quick or not on_gpu:
        shapes = QUICK
    else:
        shapes = [(s, s, s) for s in SQUARE] + LLAMA_MNK
    trials = args.trials if args.trials is not None else (24 if on_gpu else 3)
    rounds = args.rounds or (30 if on_gpu else measure.MIN_ROUNDS)
    out = pathlib.Path(args.out)
    storage = args.storage or f"sqlite:///{out.with_suffix('.sqlite3').resolve()}"  # its folder: made by the tuner

    bandwidth = measure.read_bandwidth(None if on_gpu else 8 * 2**20)
    doc = results.benchmark_document("matmul", {"dtype": dtype, "shapes": [list(s) for s in shapes], "trials": trials,
                                                "rounds": rounds, "storage": storage, "seed": 0,
                                                "warm_start": False}, read_bandwidth=bandwidth)
    print(f"device: {doc['env']['device_kind']} | jax {doc['env']['jax']} | {doc['env']['timing_note']}")
    for (m, n, k) in shapes:
        try:
            row = bench_shape(m, n, k, dtype, trials=trials, rounds=rounds, storage=storage, bandwidth=bandwidth)
        except Exception as e:  # noqa: BLE001 -- one shape failing to compile is reported, not fatal
            row = results.failed_row(dtype, f"{m}x{n}x{k}", mm.problem_key(m, n, k, dtype), e)
        results.add_row(doc, out, row)
    results.print_tables(doc, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
