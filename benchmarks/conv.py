"""Pallas convolutions vs ``lax.conv_general_dilated`` (cuDNN on GPU), per layer, as ratios.

    python benchmarks/conv.py                    # GPU: every distinct MobileNetV2 + ResNet-18 layer, bf16
    python benchmarks/conv.py --quick            # CPU-sized layers (the interpreter: not kernel speed)
    python benchmarks/conv.py --network resnet18 --dtype float32 --out results/conv_r18.json
    python benchmarks/conv.py --trials 24        # tune each layer with the autotuner instead

Per layer, each applicable algorithm (im2col, implicit GEMM, Winograd, depthwise, pointwise) runs
a short fixed list of configs (or, with --trials, the autotuner's search), all timed in this run
with the same method as lax: each contender runs 50 times inside one jitted loop (single-image
layers take ~10 us on an H100, less than a Python dispatch), warm-up, repeats, median. The best
algorithm's ratio lax/Pallas is reported (> 1: Pallas faster), with every algorithm's time.
Then the fused MobileNetV2 inverted-residual block against the same block as separate XLA ops,
and the cost of computing in the other layout (NCHW, transposes included) for the 3x3 layers.
The JSON output carries the environment (device, driver, versions) next to the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from rich.console import Console
from rich.table import Table

import kernels.conv as kc
from autotune import results
from autotune.measure import Timing, time_callable
from kernels import platform
from kernels.conv.inverted_residual import MOBILENETV2_BLOCKS

QUICK_LAYERS = [kc.conv_problem(8, 8, 16, 16, 3), kc.conv_problem(8, 8, 16, 32, 3, 2),
                kc.conv_problem(8, 8, 32, 32, 3, groups=32), kc.conv_problem(8, 8, 16, 32, 1)]
QUICK_BLOCKS = [(8, 16, 6, 16, 1), (8, 16, 6, 24, 2)]


def time_in_loop(f, *args, reps: int, warmup: int, repeats: int) -> Timing:
    """Per-call time of ``f(*args)`` run ``reps`` times inside one jitted loop.

    Single-image layers run in ~10 us on an H100, below the cost of dispatching a jitted call
    from Python, so timing calls one by one measures dispatch for lax and Pallas alike. In the
    loop each step's input depends on the previous output (a 1e-30-scaled element of it: no
    numerical effect, but XLA can neither hoist nor drop a step), so one dispatch covers ``reps``
    calls; the one fused element-wise update per step is the same for every contender.
    """
    def loop(x, *rest):
        def step(_, x):
            y = f(x, *rest)
            return x + (y.reshape(-1)[0].astype(jnp.float32) * 1e-30).astype(x.dtype)
        return lax.fori_loop(0, reps, step, x)

    looped = jax.jit(loop)
    t = time_callable(lambda: looped(*args), warmup=warmup, repeats=repeats)
    return Timing(t.compile_seconds, t.median_seconds / reps, t.p10_seconds / reps, t.p90_seconds / reps,
                  t.repeats, t.calls_per_sample * reps)


def candidate_configs(algorithm: str, problem: dict, on_gpu: bool) -> list[kc.Config]:
    """A few configs per algorithm: the heuristic and hand-picked alternatives that are legal."""
    g = kc.geometry_of(problem)
    base = kc.heuristic_config(g, problem["dtype"], algorithm=algorithm)
    if not on_gpu:
        return [base]
    alternatives = {
        "implicit_gemm": [{"block_h": 1, "block_m": 32, "block_n": 64, "block_k": 32},
                          {"block_h": 2, "block_m": 16, "block_n": 64, "block_k": 64},
                          {"block_h": 1, "block_m": 64, "block_n": 128, "block_k": 32, "num_warps": 8}],
        "im2col": [{"block_m": 128, "block_n": 128, "block_k": 32, "num_warps": 8}, {"block_m": 64, "block_n": 64, "block_k": 64}],
        "pointwise": [{"block_m": 128, "block_n": 128, "block_k": 32, "num_warps": 8},
                      {"block_m": 128, "block_n": 64, "block_k": 64}, {"block_m": 64, "block_n": 64, "block_k": 32}],
        "winograd": [{"winograd_m": 2, "block_m": 16, "block_n": 64, "block_k": 32},
                     {"winograd_m": 4, "block_m": 16, "block_n": 32, "block_k": 32},
                     {"winograd_m": 2, "block_m": 32, "block_n": 32, "block_k": 16}],
        "depthwise": [{"block_h": 1, "block_m": 16, "block_c": 64}, {"block_h": 2, "block_m": 32, "block_c": 32},
                      {"block_h": 4, "block_m": 8, "block_c": 128}],
    }[algorithm]
    configs = [base] + [dataclasses.replace(base, **a) for a in alternatives]
    legal = [c for c in configs if not kc.config_violations(c, g)]
    return list(dict.fromkeys(legal))


def operands(problem: dict, seed: int = 0):
    g = kc.geometry_of(problem)
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (g.n, g.h, g.w, g.c), jnp.float32).astype(problem["dtype"])
    w = jax.random.normal(kw, (g.kh, g.kw, g.c // g.groups, g.k), jnp.float32) / np.sqrt(g.kh * g.kw * g.c // g.groups)
    return g, x, w.astype(problem["dtype"])


def conv_kwargs(problem: dict, g) -> dict:
    return {"stride": g.stride, "padding": problem["padding"], "dilation": g.dilation, "groups": g.groups}


def bench_layer(problem: dict, *, on_gpu: bool, warmup: int, repeats: int, reps: int, trials: int | None,
                storage: str) -> dict:
    g, x, w = operands(problem)
    kwargs = conv_kwargs(problem, g)
    lax_conv = jax.jit(lambda x, w: lax.conv_general_dilated(
        x, w, g.stride, (g.pad_h, g.pad_w), rhs_dilation=g.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=g.groups))
    want = lax_conv(x.astype(jnp.float32), w.astype(jnp.float32))
    lax_time = time_in_loop(lax_conv, x, w, reps=reps, warmup=warmup, repeats=repeats)
    if trials:
        from autotune import tuner

        result = tuner.tune(kc.search_space(problem), storage=storage, n_trials=trials, seed=0, warmup=warmup,
                            repeats=max(3, repeats // 3))
        candidates = {}
        if result.best_params:
            best = kc.Config(**result.best_params)
            candidates[best.algorithm] = [best]
    else:
        candidates = {a: candidate_configs(a, problem, on_gpu) for a in kc.applicable_algorithms(g)
                      if a != "im2col" or on_gpu or g.kh * g.kw > 1}
    per_algorithm = {}
    for algorithm, configs in candidates.items():
        best = None
        for cfg in configs:
            try:
                t = time_in_loop(functools.partial(kc.conv2d, config=cfg, **kwargs), x, w, reps=reps, warmup=warmup,
                                 repeats=repeats)
            except Exception as e:  # noqa: BLE001 -- a config the compiler rejects is reported, not fatal
                per_algorithm.setdefault(f"{algorithm}_errors", []).append(f"{cfg}: {type(e).__name__}: {e}"[:300])
                continue
            if best is None or t.median_seconds < best[1].median_seconds:
                best = (cfg, t)
        if best is not None:
            out = kc.conv2d(x, w, config=best[0], **kwargs).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(out - want)) / (jnp.max(jnp.abs(want)) + 1e-30))
            per_algorithm[algorithm] = {"seconds": best[1].median_seconds, "config": best[0].params(),
                                        "max_rel_error": err, "noisy": best[1].noisy}
    timed = {a: r for a, r in per_algorithm.items() if isinstance(r, dict)}
    winner = min(timed, key=lambda a: timed[a]["seconds"]) if timed else None
    row = {"problem": problem, "lax_seconds": lax_time.median_seconds, "algorithms": per_algorithm,
           "best_algorithm": winner, "flops": kc.flops(problem)}
    if winner:
        row["best_seconds"] = timed[winner]["seconds"]
        row["best_vs_lax"] = lax_time.median_seconds / timed[winner]["seconds"]
    return row


def bench_layout(problem: dict, algorithm: str, *, warmup: int, repeats: int, reps: int) -> dict:
    """The same algorithm computing in NHWC and in NCHW on NHWC data (transposes timed with it)."""
    g, x, w = operands(problem)
    kwargs = conv_kwargs(problem, g)
    base = kc.heuristic_config(g, problem["dtype"], algorithm=algorithm)
    out = {}
    for layout in kc.geometry.LAYOUTS:
        cfg = dataclasses.replace(base, layout=layout)
        if kc.config_violations(cfg, g):
            continue
        out[layout] = time_in_loop(functools.partial(kc.conv2d, config=cfg, **kwargs), x, w, reps=reps,
                                   warmup=warmup, repeats=repeats).median_seconds
    return {"problem": problem, "algorithm": algorithm, **{f"{k}_seconds": v for k, v in out.items()}}


def bench_block(size: int, cin: int, t: int, cout: int, stride: int, dtype: str, *, on_gpu: bool, warmup: int,
                repeats: int, reps: int) -> dict:
    ks = jax.random.split(jax.random.key(size + cin), 7)
    ce = cin * t
    x = jax.random.normal(ks[0], (1, size, size, cin)).astype(dtype)
    we = None if t == 1 else (jax.random.normal(ks[1], (cin, ce)) / np.sqrt(cin)).astype(dtype)
    be = None if t == 1 else jax.random.normal(ks[2], (ce,)) * 0.1
    wd = (jax.random.normal(ks[3], (3, 3, 1, ce)) / 3).astype(dtype)
    bd = jax.random.normal(ks[4], (ce,)) * 0.1
    wp = (jax.random.normal(ks[5], (ce, cout)) / np.sqrt(ce)).astype(dtype)
    bp = jax.random.normal(ks[6], (cout,)) * 0.1
    weights = (we, be, wd, bd, wp, bp)
    unfused = functools.partial(kc.inverted_residual_reference, stride=stride, precision=lax.Precision.DEFAULT)
    want = kc.inverted_residual_reference(x.astype(jnp.float32), *[None if v is None else v.astype(jnp.float32)
                                                                   for v in weights], stride=stride)
    xla_time = time_in_loop(unfused, x, *weights, reps=reps, warmup=warmup, repeats=repeats)
    interpret = platform.interpret_default()
    grid = ([{"block_h": 2, "block_m": 16, "block_e": 32}, {"block_h": 1, "block_m": 16, "block_e": 32},
             {"block_h": 4, "block_m": 16, "block_e": 16}, {"block_h": 2, "block_m": 32, "block_e": 64, "num_warps": 8}]
            if on_gpu else [{"block_h": 4, "block_m": 16, "block_e": 64}])
    best, errors = None, []
    for knobs in grid:
        try:
            fused = functools.partial(kc.inverted_residual, stride=stride, interpret=interpret,
                                      config=kc.InvertedResidualConfig(**knobs))
            t_ = time_in_loop(fused, x, *weights, reps=reps, warmup=warmup, repeats=repeats)
        except Exception as e:  # noqa: BLE001 -- reported in the JSON, not fatal
            errors.append(f"{knobs}: {type(e).__name__}: {e}"[:300])
            continue
        if best is None or t_.median_seconds < best[1].median_seconds:
            best = (knobs, t_)
    row = {"block": {"size": size, "c_in": cin, "expansion": t, "c_out": cout, "stride": stride, "dtype": dtype},
           "xla_unfused_seconds": xla_time.median_seconds, "errors": errors}
    if best:
        got = kc.inverted_residual(x, *weights, stride=stride, interpret=interpret,
                                  config=kc.InvertedResidualConfig(**best[0])).astype(jnp.float32)
        row.update(fused_seconds=best[1].median_seconds, fused_config=best[0],
                   fused_vs_xla=xla_time.median_seconds / best[1].median_seconds,
                   max_rel_error=float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))),
                   expanded_activation_bytes=size * size * ce * jnp.dtype(dtype).itemsize)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny layers (CPU, < 2 min); the default on a CPU")
    p.add_argument("--network", choices=["mobilenetv2", "resnet18", "both"], default="both")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--limit", type=int, default=None, help="only the first N layers of each network (and N inverted-residual blocks)")
    p.add_argument("--trials", type=int, default=None, help="tune each layer with the autotuner (N trials)")
    p.add_argument("--storage", default="sqlite:///results/benchmark_conv.sqlite3")
    p.add_argument("--skip-blocks", action="store_true", help="skip the fused inverted-residual comparison")
    p.add_argument("--out", default="results/benchmark_conv.json")
    args = p.parse_args(argv)

    on_gpu = platform.backend() == "gpu"
    quick = args.quick or not on_gpu
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if quick:
        layers = {"quick": [dict(q, dtype=dtype) for q in QUICK_LAYERS]}
        blocks = QUICK_BLOCKS
    else:
        nets = ["mobilenetv2", "resnet18"] if args.network == "both" else [args.network]
        layers = {net: [dict(q, dtype=dtype) for q in kc.PRESETS[net][:args.limit]] for net in nets}
        blocks = MOBILENETV2_BLOCKS[:args.limit]
    warmup, repeats, reps = (3, 20, 50) if on_gpu else (1, 2, 1)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.trials and args.storage.startswith("sqlite:///"):
        pathlib.Path(args.storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)

    console = Console(width=170)
    env = results.environment()
    console.print(f"device: {env['device_kind']} | jax {env['jax']} | dtype {dtype}"
                  + (" | interpreted: timings are of the Pallas interpreter, not kernel speed" if not on_gpu else ""))
    report = {"env": env, "dtype": dtype, "layers": [], "layouts": [], "blocks": []}

    def save():
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    if not args.skip_blocks:
        for block in blocks:
            row = bench_block(*block, dtype, on_gpu=on_gpu, warmup=warmup, repeats=repeats, reps=reps)
            report["blocks"].append(row)
            save()
            console.print(f"inverted residual {block}: fused {row.get('fused_vs_xla', float('nan')):.2f}x unfused XLA")

    for net, problems in layers.items():
        for problem in problems:
            row = bench_layer(problem, on_gpu=on_gpu, warmup=warmup, repeats=repeats, reps=reps, trials=args.trials,
                              storage=args.storage)
            row["network"] = net
            report["layers"].append(row)
            save()
            console.print(f"{net} {describe(problem)}: best {row['best_algorithm']} "
                          f"{row.get('best_vs_lax', float('nan')):.2f}x lax")
    for row in report["layers"]:
        q = row["problem"]
        if q["kh"] == 3 and q["groups"] == 1 and row["best_algorithm"] and row["best_algorithm"] != "winograd":
            report["layouts"].append(bench_layout(q, row["best_algorithm"], warmup=warmup, repeats=repeats, reps=reps))
            save()
    print_tables(console, report, env)
    save()
    console.print(f"wrote {args.out}")
    return 0


def describe(q: dict) -> str:
    kind = "dw" if q["groups"] == q["c"] and q["groups"] > 1 else "conv"
    return f"{q['h']}x{q['w']}x{q['c']}->{q['k']} {kind}{q['kh']}x{q['kw']}/s{q['stride']}"


def print_tables(console, report, env):
    table = Table(title=f"conv2d {report['dtype']} on {env['device_kind']}: ms, ratio lax/best (> 1: Pallas faster)")
    for col in ("net", "layer", "lax ms", *kc.ALGORITHMS, "best", "vs lax"):
        table.add_column(col)
    for r in report["layers"]:
        algos = r["algorithms"]
        table.add_row(r["network"], describe(r["problem"]), f"{r['lax_seconds'] * 1e3:.3f}",
                      *[f"{algos[a]['seconds'] * 1e3:.3f}" if isinstance(algos.get(a), dict) else "" for a in kc.ALGORITHMS],
                      r["best_algorithm"] or "-", f"{r.get('best_vs_lax', float('nan')):.2f}x")
    console.print(table)
    three = [r for r in report["layers"] if r["problem"]["kh"] == 3 and r["problem"]["stride"] == 1
             and r["problem"]["groups"] == 1 and "best_vs_lax" in r]
    if three:
        ratios = [r["best_vs_lax"] for r in three]
        console.print(f"3x3 stride-1 dense layers: best-of-algorithms vs lax, geometric mean "
                      f"{float(np.exp(np.mean(np.log(ratios)))):.2f}x, min {min(ratios):.2f}x (goal on H100: >= 1.0x)")
    if report["layouts"]:
        lt = Table(title="compute layout on NHWC data (NCHW includes the two transposes): ms")
        for col in ("layer", "algorithm", "NHWC", "NCHW", "NCHW/NHWC"):
            lt.add_column(col)
        for r in report["layouts"]:
            nhwc, nchw = r.get("NHWC_seconds"), r.get("NCHW_seconds")
            lt.add_row(describe(r["problem"]), r["algorithm"], f"{nhwc * 1e3:.3f}" if nhwc else "",
                       f"{nchw * 1e3:.3f}" if nchw else "", f"{nchw / nhwc:.2f}" if nhwc and nchw else "")
        console.print(lt)
    if report["blocks"]:
        bt = Table(title="MobileNetV2 inverted residual: fused Pallas vs separate XLA ops (> 1: fused faster)")
        for col in ("block", "unfused XLA ms", "fused ms", "fused vs XLA", "expanded act. KiB", "config"):
            bt.add_column(col)
        for r in report["blocks"]:
            b = r["block"]
            bt.add_row(f"{b['size']}x{b['size']}x{b['c_in']} t{b['expansion']} ->{b['c_out']} s{b['stride']}",
                       f"{r['xla_unfused_seconds'] * 1e3:.3f}",
                       f"{r['fused_seconds'] * 1e3:.3f}" if "fused_seconds" in r else "failed",
                       f"{r['fused_vs_xla']:.2f}x" if "fused_vs_xla" in r else "",
                       f"{r.get('expanded_activation_bytes', 0) / 1024:.0f}", str(r.get("fused_config", "")))
        console.print(bt)


if __name__ == "__main__":
    raise SystemExit(main())
