"""Tuned Pallas matmul vs XLA's ``jnp.dot`` (cuBLAS on GPU) and vs the default config, as ratios.

    python benchmarks/matmul.py                  # GPU: square 1024-8192 + LLaMA-2-7B projections, bf16
    python benchmarks/matmul.py --quick          # CPU-sized shapes (the interpreter: not kernel speed)
    python benchmarks/matmul.py --shapes 4096x4096x4096 --trials 30 --out results/matmul.json

Each shape is first tuned with the autotuner (resumable: the study lives in --storage), then XLA,
the default config and the tuned config are timed in this same run with the same method (warm-up,
repeated runs with block_until_ready, median). Ratios > 1 mean Pallas is faster. JSON output
carries the environment (device, driver, versions) next to the numbers.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.table import Table

from autotune import results, tuner
from autotune.measure import time_callable, workload
from kernels import matmul as mm
from kernels import platform

SQUARE = [1024, 2048, 4096, 8192]
LLAMA_MNK = [(m, n, k) for m in (1, 16, 128, 2048) for (k, n) in ((4096, 4096), (4096, 11008), (11008, 4096))]
QUICK = [(128, 128, 128), (16, 256, 256), (96, 80, 200)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (CPU); the default on a CPU")
    p.add_argument("--shapes", nargs="*", help="MxNxK shapes instead of the default list")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--trials", type=int, default=None, help="autotuner trials per shape (default 24 GPU, 6 CPU)")
    p.add_argument("--storage", default="sqlite:///results/benchmark_matmul.sqlite3")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default="results/benchmark_matmul.json")
    args = p.parse_args(argv)

    on_gpu = platform.backend() == "gpu"
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.shapes:
        shapes = [tuple(mm.parse_shape(s)[d] for d in ("m", "n", "k")) for s in args.shapes]
    elif args.quick or not on_gpu:
        shapes = QUICK
    else:
        shapes = [(s, s, s) for s in SQUARE] + LLAMA_MNK
    trials = args.trials or (24 if on_gpu else 6)
    warmup, repeats = (3, args.repeats or 30) if on_gpu else (1, args.repeats or 3)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.storage.startswith("sqlite:///"):
        pathlib.Path(args.storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)

    console = Console(width=160)
    env = results.environment()
    console.print(f"device: {env['device_kind']} | jax {env['jax']} | {env['timing_note']}")
    rows = []
    for (m, n, k) in shapes:
        problem = mm.problem_key(m, n, k, dtype)
        space = mm.search_space(problem)
        result = tuner.tune(space, storage=args.storage, n_trials=trials, seed=0,
                            warmup=warmup, repeats=max(5, repeats // 3))
        xla = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
        default_cfg = mm.heuristic_config(m, n, k, dtype)
        tuned_cfg = mm.Config(**result.best_params) if result.best_params else default_cfg

        def make_inputs(seed, m=m, n=n, k=k):
            ka, kb = jax.random.split(jax.random.key(seed))
            return jax.random.normal(ka, (m, k), dtype), jax.random.normal(kb, (k, n), dtype)

        # Every contender is a jitted call cycling over the same input sets (more than L2 holds).
        contenders = {
            "xla": xla,
            "default": jax.jit(functools.partial(mm.matmul, config=default_cfg)),
            "tuned": jax.jit(functools.partial(mm.matmul, config=tuned_cfg)),
        }
        timings = {name: time_callable(workload(f, make_inputs),
                                       warmup=warmup, repeats=repeats)
                   for name, f in contenders.items()}
        a, b = make_inputs(0)
        ref = xla(a, b).astype(jnp.float32)
        out = mm.matmul(a, b, config=tuned_cfg).astype(jnp.float32)
        rel_err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        row = {
            "m": m, "n": n, "k": k, "dtype": dtype,
            "tuned_config": tuned_cfg.params(), "default_config": default_cfg.params(),
            "relative_error_vs_xla": rel_err,
            **{f"{name}_seconds": t.median_seconds for name, t in timings.items()},
            **{f"{name}_spread": t.spread for name, t in timings.items()},
            "tuned_tflops": mm.flops(problem) / timings["tuned"].median_seconds / 1e12,
            "xla_tflops": mm.flops(problem) / timings["xla"].median_seconds / 1e12,
            "tuned_vs_xla": timings["xla"].median_seconds / timings["tuned"].median_seconds,
            "tuned_vs_default": timings["default"].median_seconds / timings["tuned"].median_seconds,
            "noisy": any(t.noisy for t in timings.values()),
        }
        rows.append(row)
        pathlib.Path(args.out).write_text(json.dumps({"env": env, "trials_per_shape": trials, "rows": rows}, indent=1))
        console.print(f"{m}x{n}x{k}: tuned/xla {row['tuned_vs_xla']:.2f}x, tuned/default "
                      f"{row['tuned_vs_default']:.2f}x ({tuned_cfg.backend}, {tuned_cfg.block_m}x"
                      f"{tuned_cfg.block_n}x{tuned_cfg.block_k})")

    table = Table(title=f"matmul {dtype} on {env['device_kind']} (ratios > 1: Pallas faster)")
    for col in ("M", "N", "K", "XLA ms", "tuned ms", "TFLOP/s", "vs XLA", "vs default", "config", "noisy"):
        table.add_column(col)
    for r in rows:
        c = r["tuned_config"]
        table.add_row(str(r["m"]), str(r["n"]), str(r["k"]), f"{r['xla_seconds'] * 1e3:.3f}",
                      f"{r['tuned_seconds'] * 1e3:.3f}", f"{r['tuned_tflops']:.1f}", f"{r['tuned_vs_xla']:.2f}x",
                      f"{r['tuned_vs_default']:.2f}x",
                      (f"mosaic wg{c['warpgroups']}" if c['backend'] == "mosaic" else f"triton w{c['num_warps']}")
                      + f" {c['block_m']}x{c['block_n']}x{c['block_k']} {c['order']} s{c['num_stages']}",
                      "yes" if r["noisy"] else "")
    console.print(table)
    pathlib.Path(args.out).write_text(json.dumps({"env": env, "trials_per_shape": trials, "rows": rows}, indent=1))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
