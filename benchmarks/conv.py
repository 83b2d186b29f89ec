"""Pallas convolutions against ``lax.conv_general_dilated`` as a user writes it, per layer.

    python benchmarks/conv.py                    # GPU: every distinct MobileNetV2 + ResNet-18 layer, bf16
    python benchmarks/conv.py --quick            # CPU-sized layers (the interpreter: not kernel speed)
    python benchmarks/conv.py --network resnet18 --dtype float32 --out results/conv_r18.json
    python benchmarks/conv.py --trials 24        # tune each layer with the autotuner instead

Per layer, each applicable algorithm (im2col, implicit GEMM, Winograd, depthwise, pointwise) runs a
short fixed list of configs (or, with --trials, the autotuner's best); the fastest config of each
algorithm (a short timing) then goes into one interleaved comparison with lax, the same dtype,
timed by ``autotune.measure`` (compiled once, inputs rotated past the last-level cache, device-side
kernel time on a GPU). Then the fused MobileNetV2 inverted-residual block against the same block
as separate XLA ops, and the cost of computing in the other layout (NCHW, transposes included)
for the 3x3 layers. Every row keeps medians with 95% bootstrap intervals, verdicts, raw samples,
errors against an f32 reference and the kernels XLA compiled for lax.
``python -m autotune report OUT.json`` prints the tables again.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp
from jax import lax

import cli
import kernels.conv as kc
from autotune import measure, results
from kernels.conv.inverted_residual import MOBILENETV2_BLOCKS
from tuning import platform

ir = importlib.import_module("kernels.conv.inverted_residual")  # the package exports the function of that name
QUICK_LAYERS = [kc.conv_problem(8, 8, 16, 16, 3), kc.conv_problem(8, 8, 16, 32, 3, 2),
                kc.conv_problem(8, 8, 32, 32, 3, groups=32), kc.conv_problem(8, 8, 16, 32, 1)]
QUICK_BLOCKS = [(8, 16, 6, 16, 1), (8, 16, 6, 24, 2)]
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}  # max error over max |reference|
SELECT_REPEATS = 5  # samples per candidate config when picking each algorithm's config


def candidate_configs(algorithm: str, problem: dict, on_gpu: bool, limit: int | None) -> list[kc.Config]:
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
    legal = list(dict.fromkeys(c for c in configs if not kc.config_violations(c, g)))
    return legal[:limit] if limit else legal


def max_error(out, ref) -> float:
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30))


def pick(space, configs, errors: list[str]) -> tuple | None:
    """(config, workload) of the fastest of ``configs`` by a short timing; failures go to ``errors``."""
    best = None
    for cfg in configs:
        try:
            w = measure.workload(space.fn(cfg), space.make_inputs, name=space.kernel)
            t = measure.time_callable(w, repeats=SELECT_REPEATS) if len(configs) > 1 else None
        except Exception as e:  # noqa: BLE001 -- a config the compiler rejects is reported, not fatal
            errors.append(f"{cfg}: {type(e).__name__}: {e}"[:300])
            continue
        if best is None or (t is not None and t.median_seconds < best[2]):
            best = (cfg, w, t.median_seconds if t else 0.0)
    return best and best[:2]


def bench_layer(problem: dict, section: str, *, on_gpu: bool, rounds: int | None, trials: int | None,
                storage: str, limit: int | None) -> dict:
    g = kc.geometry_of(problem)
    space = kc.search_space(problem)
    layout = problem.get("layout", "NHWC")

    def lax_conv(x, w):
        return lax.conv_general_dilated(x, w, g.stride, (g.pad_h, g.pad_w), rhs_dilation=g.dilation,
                                        dimension_numbers=(layout, "HWIO", layout), feature_group_count=g.groups)

    errors: list[str] = []
    if trials:
        from autotune import tuner

        result = tuner.tune(space, storage=storage, n_trials=trials, seed=0, warm_start=False, write_cache=False)
        candidates = {} if not result.best_params else {result.best_params["algorithm"]:
                                                        [space.to_config(result.best_params)]}
    else:
        candidates = {a: candidate_configs(a, problem, on_gpu, limit) for a in kc.applicable_algorithms(g)
                      if a != "im2col" or on_gpu or g.kh * g.kw > 1}
    xla = measure.workload(lax_conv, space.make_inputs, name="lax")
    contenders = {"lax": xla}
    described = {"lax": {"what": "lax.conv_general_dilated(x, w, ...) in the same dtype",
                         "xla_kernels": xla.xla_kernels()}}
    for algorithm, configs in candidates.items():
        chosen = pick(space, configs, errors)
        if chosen:
            contenders[algorithm] = chosen[1]
            described[algorithm] = {"what": f"conv2d(algorithm={algorithm!r})", "config": chosen[0].params(),
                                    "configs_tried": len(configs)}
    x, w = space.make_inputs(0)
    ref = lax_conv(x.astype(jnp.float32), w.astype(jnp.float32))
    accuracy = {name: max_error(space.fn(kc.Config(**d["config"]))(x, w), ref)
                for name, d in described.items() if "config" in d}
    accuracy["lax"] = max_error(lax_conv(x, w), ref)
    row = {"section": section, "label": describe(problem), "problem": problem, "contenders": described,
           "flops": kc.flops(problem), "max_error_vs_f32": accuracy, "tolerance": TOLERANCE.get(problem["dtype"]),
           "errors": errors}
    if len(contenders) > 1:
        comparison = measure.compare(contenders, baseline="lax", rounds=rounds)
        row["comparison"] = comparison.as_dict()
        timed = {n: t.median_seconds for n, t in comparison.timings.items() if n != "lax"}
        row["best_algorithm"] = min(timed, key=timed.get)
    return row


def bench_layout(row: dict, *, rounds: int | None) -> dict | None:
    """The best algorithm of a layer computing in NHWC and in NCHW on NHWC data (transposes timed with it)."""
    problem, algorithm = row["problem"], row.get("best_algorithm")
    if not algorithm or algorithm == "winograd":  # Winograd computes in NHWC only
        return None
    space = kc.search_space(problem)
    g = kc.geometry_of(problem)
    base = kc.Config(**row["contenders"][algorithm]["config"])
    contenders, described = {}, {}
    for layout in kc.geometry.LAYOUTS:
        cfg = dataclasses.replace(base, layout=layout)
        if kc.config_violations(cfg, g):
            continue
        contenders[layout] = measure.workload(space.fn(cfg), space.make_inputs, name=layout)
        described[layout] = {"what": f"conv2d({algorithm}) computing in {layout}", "config": cfg.params()}
    if len(contenders) < 2:
        return None
    comparison = measure.compare(contenders, baseline="NHWC", rounds=rounds)
    return results.comparison_row("compute layout (NHWC data)", row["label"], problem, comparison, described,
                                  algorithm=algorithm)


def bench_block(size: int, cin: int, t: int, cout: int, stride: int, dtype: str, *, on_gpu: bool,
                rounds: int | None) -> dict:
    problem = dict(ir.problem_key((1, size, size, cin), cout, t, stride, dtype))
    space = ir.search_space(problem)
    label = f"{size}x{size}x{cin} t{t} ->{cout} s{stride}"
    unfused = functools.partial(kc.inverted_residual_reference, stride=stride, precision=lax.Precision.DEFAULT)
    grid = ([{"block_h": 2, "block_m": 16, "block_e": 32}, {"block_h": 1, "block_m": 16, "block_e": 32},
             {"block_h": 4, "block_m": 16, "block_e": 16}, {"block_h": 2, "block_m": 32, "block_e": 64, "num_warps": 8}]
            if on_gpu else [{"block_h": 4, "block_m": 16, "block_e": 64}])
    errors: list[str] = []
    chosen = pick(space, [space.to_config(dict(space.default, **knobs)) for knobs in grid], errors)
    row = {"section": "inverted residual block (fused vs separate XLA ops)", "label": label, "problem": problem,
           "errors": errors, "expanded_activation_bytes": size * size * cin * t * jnp.dtype(dtype).itemsize}
    if not chosen:
        return row
    xla = measure.workload(unfused, space.make_inputs, name="xla_unfused")
    comparison = measure.compare({"xla_unfused": xla, "fused": chosen[1]}, baseline="xla_unfused", rounds=rounds)
    inputs = space.make_inputs(0)
    want = kc.inverted_residual_reference(*[None if v is None else v.astype(jnp.float32) for v in inputs],
                                          stride=stride)
    row.update(contenders={"xla_unfused": {"what": "inverted_residual_reference(..., precision=DEFAULT): separate "
                                                   "XLA ops", "xla_kernels": xla.xla_kernels()},
                           "fused": {"what": "inverted_residual(...): one Pallas kernel",
                                     "config": chosen[0].params()}},
               comparison=comparison.as_dict(),
               max_error_vs_f32={"fused": max_error(space.fn(chosen[0])(*inputs), want),
                                 "xla_unfused": max_error(unfused(*inputs), want)},
               tolerance=TOLERANCE.get(dtype))
    return row


def describe(q: dict) -> str:
    kind = "dw" if q["groups"] == q["c"] and q["groups"] > 1 else "conv"
    return f"{q['h']}x{q['w']}x{q['c']}->{q['k']} {kind}{q['kh']}x{q['kw']}/s{q['stride']}"


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    p = cli.ArgumentParser(prog="benchmarks/conv.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny layers (CPU, < 1 min); the default on a CPU")
    p.add_argument("--network", choices=["mobilenetv2", "resnet18", "both"], default="both")
    p.add_argument("--dtype", default=None, choices=TOLERANCE, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--limit", type=int, default=None, help="only the first N layers of each network (and N blocks)")
    p.add_argument("--configs", type=int, default=None, help="at most N candidate configs per algorithm (GPU)")
    p.add_argument("--trials", type=int, default=None, help="tune each layer with the autotuner (N trials)")
    p.add_argument("--rounds", type=cli.whole_number(measure.MIN_ROUNDS), default=None,
                   help="interleaved rounds (default 10 CPU, 30 GPU)")
    p.add_argument("--storage", default=None, help="Optuna storage for --trials (default: beside --out)")
    p.add_argument("--skip-blocks", action="store_true", help="skip the fused inverted-residual comparison")
    p.add_argument("--skip-layouts", action="store_true", help="skip the NHWC/NCHW comparison")
    p.add_argument("--out", default="results/benchmark_conv.json")
    cli.add_debug(p)
    args = p.parse_args(argv)

    on_gpu = platform.backend() == "gpu"
    quick = args.quick or not on_gpu
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if quick:
        layers = {"quick layers": [dict(q, dtype=dtype) for q in QUICK_LAYERS[:args.limit]]}
        blocks = QUICK_BLOCKS[:args.limit]
    else:
        nets = ["mobilenetv2", "resnet18"] if args.network == "both" else [args.network]
        layers = {f"{net} layers": [dict(q, dtype=dtype) for q in kc.PRESETS[net][:args.limit]] for net in nets}
        blocks = MOBILENETV2_BLOCKS[:args.limit]
    rounds = args.rounds or (30 if on_gpu else measure.MIN_ROUNDS)
    out = pathlib.Path(args.out)
    storage = args.storage or f"sqlite:///{out.with_suffix('.sqlite3').resolve()}"  # its folder: made by the tuner

    doc = results.benchmark_document("conv", {"dtype": dtype, "quick": quick, "rounds": rounds, "trials": args.trials,
                                              "configs_per_algorithm": args.configs, "limit": args.limit, "seed": 0})
    print(f"device: {doc['env']['device_kind']} | jax {doc['env']['jax']} | dtype {dtype} | "
          f"{doc['env']['timing_note']}", flush=True)

    def add(row):
        if row is not None:
            results.add_row(doc, out, row)

    layer_rows = []
    for section, problems in layers.items():
        for problem in problems:
            row = bench_layer(problem, section, on_gpu=on_gpu, rounds=rounds, trials=args.trials, storage=storage,
                              limit=args.configs)
            layer_rows.append(row)
            add(row)
    if not args.skip_blocks:
        for block in blocks:
            add(bench_block(*block, dtype, on_gpu=on_gpu, rounds=rounds))
    if not args.skip_layouts:
        for row in layer_rows:
            q = row["problem"]
            if q["kh"] == 3 and q["groups"] == 1:
                add(bench_layout(row, rounds=rounds))
    results.print_tables(doc, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
