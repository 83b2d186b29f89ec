"""``python -m autotune``: sweep, show, plot, export, import.

    python -m autotune sweep                       # matmul on a few shapes, on the device present
    python -m autotune sweep --kernel matmul --shape 4096x4096x4096 --dtype bfloat16 --trials 60
    python -m autotune show                        # best configs in the cache
    python -m autotune plot --study-name NAME      # PNGs of one study (all studies without a name)
    python -m autotune export FILE / import FILE   # move tuned configs between machines
    python -m autotune report BUNDLE_OR_JSON... --format md|latex|csv   # tables from results alone
    python -m autotune replay BUNDLE               # re-measure a bundle's best configs here
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

DEFAULT_RESULTS = pathlib.Path("results")


def default_storage() -> str:
    return f"sqlite:///{(DEFAULT_RESULTS / 'autotune.sqlite3').resolve()}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autotune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("sweep", help="tune kernels with Optuna (the default command)")
    s.add_argument("--kernel", default=None,
                   help="kernel to tune (default: matmul on a GPU; cpu, the compiled CPU kernels, on a CPU "
                        "where they build; matmul then tunes the Pallas interpreter)")
    s.add_argument("--shape", action="append", default=[],
                   help="problem shape, repeatable; matmul: MxNxK (default: a few representative shapes)")
    s.add_argument("--layer", help="a named list of problems the kernel offers, e.g. mobilenetv2")
    s.add_argument("--dtype", help="operand dtype: float32, bfloat16, float16, int8")
    s.add_argument("--target", help="MCU board to tune a model's schedule for, e.g. stm32f746")
    s.add_argument("--model", help="the .tflite model whose MCU schedule --target tunes")
    s.add_argument("--trials", type=int, default=None,
                   help="finished trials per problem (default: 12 on CPU, 40 on GPU); a re-run resumes")
    s.add_argument("--timeout", type=float, default=None, help="seconds per problem")
    s.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by workers (default: sqlite file under ./results)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--study-name", default=None, help="prefix of the study names (one study per problem)")
    s.add_argument("--results", default=None, help="folder for the results bundle (default: ./results/sweeps/...)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    sh = sub.add_parser("show", help="table of the best configs in the cache")
    sh.add_argument("--kernel", default=None)
    sh.add_argument("--all-devices", action="store_true", help="also entries tuned on other devices / jax versions")

    pl = sub.add_parser("plot", help="PNG plots (history, importance, time vs tile) of stored studies")
    pl.add_argument("--storage", default=None)
    pl.add_argument("--study-name", default=None, help="one study (default: every study in the storage)")
    pl.add_argument("-o", "--output", default=str(DEFAULT_RESULTS / "plots"))

    ex = sub.add_parser("export", help="write the best-config cache to FILE")
    ex.add_argument("file")
    ex.add_argument("--kernel", default=None)
    im = sub.add_parser("import", help="merge a file written by `export` into the best-config cache")
    im.add_argument("file")

    rp = sub.add_parser("report", help="tables (md, latex, csv) from sweep bundles and benchmark JSONs")
    rp.add_argument("paths", nargs="+", metavar="BUNDLE_OR_JSON")
    rp.add_argument("--format", default="md", choices=("md", "latex", "csv"))
    rp.add_argument("-o", "--output", default=None, help="write to FILE (default: print)")
    rl = sub.add_parser("replay", help="re-measure a bundle's best configs here: old against new with intervals")
    rl.add_argument("bundle")
    rl.add_argument("--repeats", type=int, default=None, help="samples per config (default and minimum: 10)")
    rl.add_argument("--format", default="md", choices=("md", "latex", "csv"))
    return p


def _problems(args, module) -> list[dict]:
    if args.layer:
        presets = getattr(module, "PRESETS", {})
        if args.layer not in presets:
            raise SystemExit(f"--layer {args.layer!r} is not offered by --kernel {args.kernel}; "
                             f"choose one of: {', '.join(sorted(presets)) or 'none'}")
        problems = list(presets[args.layer])
    elif args.shape:
        try:
            problems = [module.parse_shape(s) for s in args.shape]
        except ValueError as e:
            raise SystemExit(str(e)) from None
    else:
        from kernels import platform

        gpu_problems = getattr(module, "GPU_PROBLEMS", None)
        problems = list(gpu_problems if platform.backend() == "gpu" and gpu_problems else module.DEFAULT_PROBLEMS)
    if args.dtype:
        problems = [{**p, "dtype": args.dtype} for p in problems]
    return problems


def cmd_sweep(args) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from autotune import registry, results, tuner
    from kernels import platform

    console = Console(width=None if sys.stdout.isatty() else 140)
    if args.target or args.model:
        if not (args.target and args.model):
            raise SystemExit("--target and --model go together: --target stm32f746 --model PATH.tflite")
        args.kernel = "mcu"
    args.kernel = args.kernel or ("matmul" if args.shape or args.layer else _default_kernel())
    module = registry.kernel_module(args.kernel)
    if args.kernel == "mcu":
        problems = [module.parse_shape(f"{args.model}@{args.target}")]
    else:
        problems = _problems(args, module)
    n_trials = args.trials or (12 if platform.interpret_default() else 40)
    storage = args.storage or default_storage()
    if storage.startswith("sqlite:///"):
        pathlib.Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bundle = pathlib.Path(args.results) if args.results else DEFAULT_RESULTS / "sweeps" / f"{stamp}-{args.kernel}"

    console.print(f"[bold]tinypallas autotune[/] kernel={args.kernel} device={platform.device_kind()} "
                  f"problems={len(problems)} trials/problem={n_trials} seed={args.seed}")
    console.print(f"storage: {storage}")
    if platform.interpret_default() and args.kernel != "mcu" and not args.kernel.startswith("cpu"):
        console.print("[yellow]CPU: Pallas runs in interpret mode; the timings are of the interpreter, "
                      "not of compiled kernels.[/]")
    out = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.no_progress) as progress:
        for problem in problems:
            space = module.search_space(problem)
            name = tuner.study_name_for(space, args.study_name)
            task = progress.add_task(name[:60], total=n_trials)
            progress.update(task, completed=0)
            result = tuner.tune(space, storage=storage, n_trials=n_trials, timeout=args.timeout,
                                study_name=name, seed=args.seed,
                                on_trial=lambda task=task: progress.advance(task))
            progress.update(task, completed=n_trials)
            out.append(result)

    interpreted = platform.interpret_default() and args.kernel != "mcu" and not args.kernel.startswith("cpu")
    table = Table(title="best configs" + (" (interpreted: not kernel speed)" if interpreted else ""))
    columns = ["problem", "best", "default", "speed-up", "params"]
    if any(k.name == "algorithm" for r in out for k in r.space.knobs):
        columns.insert(1, "algorithm")  # which algorithm won on each layer
    for col in columns:
        table.add_column(col)
    for r in out:
        problem = " ".join(f"{k}={v}" for k, v in r.space.problem.items())
        if r.best_values is None:
            table.add_row(problem, *[""] * (len(columns) - 2), "no feasible trial")
            continue
        default = r.default_values
        name0 = r.space.objectives[0].name
        best_v = r.best_values[name0]
        default_v = default[name0] if default else None
        ratio = f"{default_v / best_v:.2f}x" if default_v and best_v else "-"
        knobs = {k.name: r.best_params[k.name] for k in r.space.knobs if k.active(r.best_params)}
        best_text = ", ".join(f"{o.name}={_fmt(r.best_values[o.name], o.name)}" for o in r.space.objectives) \
            if len(r.space.objectives) > 1 else _fmt(best_v, name0)
        row = [problem, best_text, _fmt(default_v, name0), ratio,
               ", ".join(f"{k}={v}" for k, v in knobs.items())]
        if "algorithm" in columns:
            row.insert(1, str(r.best_params.get("algorithm", "-")))
        table.add_row(*row)
    console.print(table)
    env = results.environment(seed=args.seed)
    results.write_bundle(bundle, out, env)
    console.print(f"results bundle: {bundle.resolve()}")
    return 0


def _default_kernel() -> str:
    """The main job (no --kernel, --shape or --layer): matmul on a GPU; on a CPU the compiled CPU
    kernels (real timings), where they build."""
    from kernels import platform

    if platform.backend() == "gpu":
        return "matmul"
    from kernels.cpu import build

    return "cpu" if build.availability() is None else "matmul"


def _fmt(value, objective: str) -> str:
    if value is None:
        return "-"
    if objective == "seconds":
        return f"{value * 1e3:.3f} ms"
    return f"{value:,.0f}"


def cmd_show(args) -> int:
    import jax
    from rich.console import Console
    from rich.table import Table

    from kernels import platform, tuned

    table = Table(title=f"best-config cache: {tuned.cache_path()}")
    for col in ("kernel", "problem", "device", "jax", "params", "value"):
        table.add_column(col)
    rows = 0
    for key, entry in sorted(tuned.load().items()):
        k = json.loads(key)
        if args.kernel and k["kernel"] != args.kernel:
            continue
        if not args.all_devices and (k["device"] != platform.device_kind() or k["jax"] != jax.__version__):
            continue
        value = entry.get("seconds")
        table.add_row(k["kernel"], json.dumps(k["problem"]), k["device"], k["jax"],
                      ", ".join(f"{a}={b}" for a, b in entry["params"].items()),
                      _fmt(value, "seconds") if value is not None else "")
        rows += 1
    Console().print(table)
    if not rows:
        print("no tuned configs for this device and jax version; run `python -m autotune sweep` "
              "(or `show --all-devices`)")
    return 0


def cmd_plot(args) -> int:
    import optuna

    from autotune import plots, tuner

    storage = args.storage or default_storage()
    names = [args.study_name] if args.study_name else [s.study_name for s in optuna.get_all_study_summaries(
        tuner.make_storage(storage))]
    if not names:
        print(f"no studies in {storage}")
        return 1
    written = []
    for name in names:
        try:
            study = optuna.load_study(study_name=name, storage=tuner.make_storage(storage))
        except KeyError:
            raise SystemExit(f"no study named {name!r} in {storage}; `python -m autotune plot` lists all") from None
        written += plots.plot_study(study, pathlib.Path(args.output))
    for path in written:
        print(path)
    return 0


def cmd_export(args) -> int:
    from kernels import tuned

    entries = {key: e for key, e in tuned.load().items()
               if not args.kernel or json.loads(key)["kernel"] == args.kernel}
    pathlib.Path(args.file).write_text(json.dumps({"format": "tinypallas-best-configs/1", "entries": entries},
                                                  indent=1, sort_keys=True))
    print(f"exported {len(entries)} configs to {args.file}")
    return 0


def cmd_import(args) -> int:
    from kernels import tuned

    try:
        doc = json.loads(pathlib.Path(args.file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read {args.file}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != "tinypallas-best-configs/1":
        raise SystemExit(f"{args.file} is not a file written by `python -m autotune export`")
    entries = doc["entries"]
    for key, entry in entries.items():
        k = json.loads(key)
        if not {"kernel", "problem", "device", "jax"} <= set(k) or "params" not in entry:
            raise SystemExit(f"{args.file}: malformed entry {key!r}")
    merged = dict(tuned.load())
    merged.update(entries)
    tuned.save_all(merged)
    print(f"imported {len(entries)} configs into {tuned.cache_path()}")
    return 0


def cmd_report(args) -> int:
    from autotune import report

    try:
        text = report.report(args.paths, args.format)
        if args.output:
            pathlib.Path(args.output).write_text(text)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text if not args.output else f"wrote {args.output}")
    return 0


def cmd_replay(args) -> int:
    from autotune import replay, report

    if args.repeats is not None and args.repeats < 10:
        print(f"error: --repeats {args.repeats}: intervals need at least 10 samples", file=sys.stderr)
        return 2
    try:
        table, _ = replay.replay(args.bundle, repeats=args.repeats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.render([table], args.format))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["sweep"] + argv
    args = _parser().parse_args(argv)
    return {"sweep": cmd_sweep, "show": cmd_show, "plot": cmd_plot, "export": cmd_export,
            "import": cmd_import, "report": cmd_report, "replay": cmd_replay}[args.command](args)
