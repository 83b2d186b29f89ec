"""``python -m autotune``: sweep, list, show, plot, export, import.

    python -m autotune sweep                       # the main job: matmul on a GPU, the CPU kernels on a CPU
    python -m autotune sweep --kernel matmul --shape 4096x4096x4096 --dtype bfloat16 --trials 60
    python -m autotune sweep --workers 4 --storage postgresql://tune@db/tune --study-name lab
    python -m autotune sweep --target stm32f746 --model mlperf_tiny_kws01_dscnn_int8   # the MCU schedule
    python -m autotune list kernels|layers|boards|studies
    python -m autotune show [--format table|csv|json]   # best configs in the cache
    python -m autotune plot --study-name NAME      # PNGs of one study (all studies without a name)
    python -m autotune export FILE / import FILE   # move tuned configs between machines
    python -m autotune report BUNDLE_OR_JSON... [--table NAME] --format md|latex|csv   # tables from results alone
    python -m autotune replay BUNDLE               # re-measure a bundle's best configs here

Every mistake in the arguments is one line, ``error: ...``, and exit status 2 (``--debug``
shows the traceback).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import cli

DEFAULT_RESULTS = pathlib.Path("results")
MAX_LOCAL_WORKERS = 64
BUNDLE_EVERY_SECONDS = 30.0  # a running sweep rewrites its bundle at most this often (and at the end)
FORMATS = ("table", "csv", "json")


def default_storage() -> str:
    return f"sqlite:///{(DEFAULT_RESULTS / 'autotune.sqlite3').resolve()}"


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _sweep_epilog() -> str:
    """The kernels with their --shape syntax, dtypes and presets (imports every kernel module)."""
    from autotune import registry

    lines = ["kernels (--kernel), how their problems are named (--shape, --layer, --model) and --dtype values:"]
    for name, entry in registry.KERNELS.items():
        try:
            flags = entry.flags()
        except Exception as e:  # noqa: BLE001 - help must print even when an optional dependency is missing
            lines.append(f"  {name:18s} (unavailable here: {type(e).__name__}: {e})")
            continue
        rows = [f"{flag} {text}" for flag, text in flags.items()] or ["(default problems only)"]
        if entry.dtypes:
            rows.append(f"--dtype {', '.join(entry.dtypes)}")
        lines += [f"  {name if i == 0 else '':18s} {row}" for i, row in enumerate(rows)]
    lines.append("Boards for --target: `python -m autotune list boards`.")
    lines.append("Several workers share one study and one --trials budget: --workers N here, or one "
                 "`sweep` per host on one PostgreSQL --storage (examples/slurm_sweep.sbatch).")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    cli.add_debug(common)
    p = cli.ArgumentParser(prog="python -m autotune", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    cli.add_debug(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=cli.ArgumentParser)

    s = sub.add_parser("sweep", help="tune kernels with Optuna", parents=[common], formatter_class=_Formatter,
                       allow_abbrev=False, description="Tune one kernel on one or more problems; one Optuna study "
                       "per problem, resumed when run again.")
    s.lazy_epilog = _sweep_epilog
    s.add_argument("--kernel", default=None, help="kernel to tune (default: matmul on a GPU; cpu, the compiled CPU kernels, "
                   "on a CPU where they build; `list kernels`)")
    s.add_argument("--shape", action="append", default=[],
                   help="problem shape, repeatable, in the kernel's syntax below (default: its default problems)")
    s.add_argument("--layer", help="a named list of problems the kernel offers (below), e.g. mobilenetv2")
    s.add_argument("--dtype", help="operand dtype, among the kernel's (below)")
    s.add_argument("--target", "--board", dest="target", help="the board a --model runs on (`list boards`)")
    s.add_argument("--model", help="a model file or reference model name, for the kernels whose problems are models "
                   "(below)")
    s.add_argument("--trials", type=cli.whole_number(1), default=None,
                   help="COMPLETE trials per problem, counted over every worker of the study "
                        "(default: 12 on CPU, 40 on GPU); a re-run resumes")
    s.add_argument("--timeout", type=cli.seconds, default=None, help="seconds per problem and worker")
    s.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by workers: sqlite:///PATH.db or postgresql://USER@HOST/DB "
                        "(default: results/autotune.sqlite3)")
    s.add_argument("--seed", type=cli.whole_number(0, 2**31 - 1), default=0, help="sampler seed (worker i of --workers uses seed + i)")
    s.add_argument("--no-warm-start", action="store_true",
                   help="new studies start from the heuristic default only, not from the nearest tuned problems")
    s.add_argument("--study-name", type=cli.name, default=None, help="prefix of the study names (one study per problem)")
    s.add_argument("--results", default=None,
                   help="folder for the results bundle (default: results/sweeps/TIME-KERNEL-HOST-PID)")
    s.add_argument("--workers", type=cli.whole_number(1), default=1,
                   help="local worker processes sharing the studies and the --trials budget "
                        "(one per GPU where there are several)")
    s.add_argument("--no-confirm", action="store_true",
                   help="skip the confirmation of each problem's tuned config against the default, timed "
                        "interleaved with 95%% intervals (compiled kernels only; interpreted and MCU sweeps "
                        "have none)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (lines per trial are still "
                   "printed when stdout is not a terminal)")
    s.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)

    ls = sub.add_parser("list", help="kernels, layer presets, MCU boards or stored studies", parents=[common],
                        formatter_class=_Formatter, allow_abbrev=False)
    ls.add_argument("what", choices=("kernels", "layers", "boards", "studies"))
    ls.add_argument("--storage", default=None, help="for studies (default: results/autotune.sqlite3)")
    ls.add_argument("--format", choices=FORMATS, default="table")

    sh = sub.add_parser("show", help="the best configs in the cache", parents=[common], formatter_class=_Formatter,
                        allow_abbrev=False)
    sh.add_argument("--kernel", default=None)
    sh.add_argument("--all-devices", action="store_true", help="also entries tuned on other devices / jax versions")
    sh.add_argument("--format", choices=FORMATS, default="table")

    pl = sub.add_parser("plot", help="PNG plots (history, importance, slices, Pareto front) of stored studies",
                        parents=[common], formatter_class=_Formatter, allow_abbrev=False)
    pl.add_argument("--storage", default=None, help="(default: results/autotune.sqlite3)")
    pl.add_argument("--study-name", default=None, help="one study (default: every study in the storage)")
    pl.add_argument("-o", "--output", default=str(DEFAULT_RESULTS / "plots"))

    ex = sub.add_parser("export", help="write the best-config cache to FILE", parents=[common],
                        formatter_class=_Formatter, allow_abbrev=False)
    ex.add_argument("file", type=cli.output_file)
    ex.add_argument("--kernel", default=None)
    im = sub.add_parser("import", help="merge a file written by `export` into the best-config cache (for one "
                        "key, the faster config wins)", parents=[common], formatter_class=_Formatter,
                        allow_abbrev=False)
    im.add_argument("file")

    rp = sub.add_parser("report", help="tables (md, latex, csv) from sweep bundles and benchmark JSONs",
                        parents=[common], formatter_class=_Formatter, allow_abbrev=False)
    rp.add_argument("paths", nargs="+", metavar="BUNDLE_OR_JSON")
    rp.add_argument("--format", default="md", choices=("md", "latex", "csv"))
    rp.add_argument("--table", action="append", default=None, metavar="NAME",
                    help="only the tables of this name (repeatable; shell patterns, e.g. 'llama:*'; a wrong name "
                         "lists the names)")
    rp.add_argument("--columns", default=None, metavar="LIST",
                    help="only these columns, in this order: comma-separated positions (from 1) or headers")
    rp.add_argument("-o", "--output", default=None, help="write to FILE (default: print)")
    rl = sub.add_parser("replay", help="re-measure a bundle's best configs here: old against new with intervals",
                        parents=[common], formatter_class=_Formatter, allow_abbrev=False)
    rl.add_argument("bundle")
    rl.add_argument("--repeats", type=int, default=None, help="samples per config (default and minimum: 10)")
    rl.add_argument("--format", default="md", choices=("md", "latex", "csv"))
    return p


# ----------------------------------------------------------------------------------------------
# Tables: one printer for show, list and the sweep summary
# ----------------------------------------------------------------------------------------------

def print_rows(title: str, columns: list[str], rows: list[list], fmt: str = "table", out=None) -> None:
    """``rows`` as a table (a rich table on a terminal, plain aligned text otherwise: never cut),
    CSV or JSON (a list of objects)."""
    out = out or sys.stdout
    if fmt == "json":
        print(json.dumps([dict(zip(columns, row)) for row in rows], indent=1, default=str), file=out)
        return
    text_rows = [[_cell(v) for v in row] for row in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(text_rows)
        out.write(buffer.getvalue())
        return
    if out.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in text_rows:
            table.add_row(*row)
        Console(file=out).print(table)
        return
    widths = [max([len(c)] + [len(r[i]) for r in text_rows]) for i, c in enumerate(columns)]
    print(title, file=out)
    for row in [columns, ["-" * w for w in widths]] + text_rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)
    out.flush()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _problem_text(problem: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in problem.items())


# ----------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------

def _plan(args) -> tuple[list, int, str]:
    """Everything a sweep checks before it touches a study: (search spaces, trials, storage URL).

    Raises ValueError naming the argument and its valid values.
    """
    from autotune import registry, tuner
    from tuning import platform, tuned

    gpu = platform.backend() == "gpu"
    args.kernel = args.kernel or registry.default_kernel(gpu=gpu, problems=bool(args.shape or args.layer),
                                                         model=bool(args.model or args.target))
    entry = registry.entry(args.kernel)
    problems = entry.problems(shapes=args.shape, layer=args.layer, model=args.model, target=args.target,
                              dtype=args.dtype, gpu=gpu)
    spaces = []
    for problem in problems:
        space = entry.load().search_space(problem)
        tuner.check_fits(space)
        spaces.append(space)
    trials = args.trials or (40 if gpu else 12)
    storage = args.storage or default_storage()
    if args.dry_run:
        _existing_storage(storage)  # a dry run creates no database
    else:
        tuner.make_storage(storage)  # reachable, a database, the schema in place
    tuned.load()  # a damaged best-config cache is reported now, not after the sweep
    return spaces, trials, storage


def _bundle_dir(args) -> pathlib.Path:
    if args.results:
        return pathlib.Path(args.results)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    host = re.sub(r"[^A-Za-z0-9.-]+", "_", socket.gethostname())[:40] or "host"
    return DEFAULT_RESULTS / "sweeps" / f"{stamp}-{args.kernel}-{host}-{os.getpid()}"


def _make_dir(path: pathlib.Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create the folder ({e.strerror or e}); choose another path") from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stored_study(name: str, storage: str):
    """The study ``name`` if the storage holds it already (a resumed sweep), else None."""
    import optuna

    from autotune import tuner

    try:
        return optuna.load_study(study_name=name, storage=tuner.make_storage(storage))
    except KeyError:
        return None


def cmd_sweep(args) -> int:
    if args.workers > MAX_LOCAL_WORKERS:
        raise ValueError(f"--workers {args.workers}: at most {MAX_LOCAL_WORKERS} on one machine; for more, run "
                         "one sweep per host on a shared PostgreSQL --storage (examples/slurm_sweep.sbatch)")
    if args.workers > 1 and args.worker_index is None:
        # The coordinating process queries the device too: it must not take the GPU's memory.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from tuning import platform

    spaces, n_trials, storage = _plan(args)
    bundle = _bundle_dir(args)
    worker = args.worker_index is not None
    seed = args.seed + (args.worker_index or 0)
    interpreted = any(space.interpreted for space in spaces)
    if not worker:
        print(f"tinypallas autotune: kernel={args.kernel} device={platform.device_kind()} problems={len(spaces)} "
              f"trials/problem={n_trials} seed={args.seed} workers={args.workers}", flush=True)
        print(f"storage: {storage}", flush=True)
        if interpreted:
            print("CPU: Pallas runs in interpret mode; the timings are of the interpreter, not of compiled "
                  "kernels.", flush=True)
    if args.dry_run:
        from autotune import tuner

        rows = [[tuner.study_name_for(s, args.study_name), _problem_text(s.problem),
                 _bytes_text(s.problem_bytes()), len(s.knobs)] for s in spaces]
        print_rows("plan (dry run: nothing ran)", ["study", "problem", "operands and result", "knobs"], rows)
        return 0
    if not worker:
        _make_dir(bundle, "--results")
    if args.workers > 1 and not worker:
        return _run_workers(args, spaces, n_trials, storage, bundle)
    return _run_sweep(args, spaces, n_trials, storage, bundle, seed, worker, interpreted)


def _bytes_text(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _run_sweep(args, spaces, n_trials, storage, bundle, seed, worker, interpreted) -> int:
    from autotune import results, tuner
    from autotune.progress import SweepProgress

    done: list = []
    current: dict = {}
    last_write = [time.monotonic()]
    env = results.environment(seed=seed, interpreted=interpreted)

    progress = SweepProgress(len(spaces), n_trials, bar=None if not args.no_progress else False,
                             lines=True if worker else None)

    def bundle_results():
        out = list(done)
        if current and not any(r.study.study_name == current["study"].study_name for r in out):
            study, space = current["study"], current["space"]
            out.append(tuner.TuneResult(study, space, *tuner.best_of(study, space)))
        return out

    def write_bundle(final: bool = False):
        if worker:
            return
        out = bundle_results()
        env["warm_start_sources"] = {r.study.study_name: r.study.user_attrs.get("warm_start") for r in out}
        try:
            results.write_bundle(bundle, out, env)
            if final and args.layer and len(out) > 1:
                from autotune import plots

                plots.plot_layers(out, bundle / "layers.png", title=f"{args.kernel} --layer {args.layer}")
        except (OSError, ValueError) as e:
            progress.write(f"warning: the results bundle {bundle} could not be written: {e}")
        last_write[0] = time.monotonic()

    def on_trial(study, trial):
        current["study"] = study
        if not worker and time.monotonic() - last_write[0] > BUNDLE_EVERY_SECONDS:
            write_bundle()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM,)}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for i, space in enumerate(spaces):
            name = tuner.study_name_for(space, args.study_name)
            current.clear()
            current["space"] = space
            progress.start_problem(i, name, _stored_study(name, storage))
            result = tuner.tune(space, storage=storage, n_trials=n_trials, timeout=args.timeout, study_name=name,
                                seed=seed, warm_start=not args.no_warm_start, write_cache=not worker,
                                callbacks=[on_trial, progress.trial_done])
            if not worker and not args.no_confirm:
                _confirm(result, progress.write)
            done.append(result)
            if result.stopped:
                progress.write(f"{name}: {result.stopped}")
            progress.update((i + 1) * n_trials)
    except KeyboardInterrupt:
        progress.close()
        print("interrupted: every finished trial is kept in the storage; run the same command again to resume",
              file=sys.stderr, flush=True)
        if not worker:
            write_bundle(final=True)
            print(f"results bundle (partial): {bundle.resolve()}", flush=True)
        return 130
    finally:
        progress.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if worker:
        return 0
    _print_summary(done, interpreted)
    write_bundle(final=True)
    print(f"results bundle: {bundle.resolve()}", flush=True)
    return 0


def _confirm(result, say: Callable[[str], None]) -> None:
    """Time the tuned config against the default, interleaved (``tuner.confirm``) and say the
    verdict; a config that fails here is one warning line, the sweep's results stay."""
    from autotune import report, tuner

    name = result.study.study_name
    try:
        result.confirmation = tuner.confirm(result, write_cache=True)
    except Exception as e:  # noqa: BLE001 -- the sweep is done; its confirmation is an extra
        say(f"warning: {name}: tuned vs default could not be confirmed ({type(e).__name__}: {str(e)[:200]})")
        return
    if result.confirmation is not None and "ratios" in result.confirmation:
        speedup, verdict = report.confirmation_cells(result.confirmation)
        kept = "; the best-config cache holds the default" if result.confirmation["kept"] == "default" else ""
        say(f"{name}: tuned vs default, interleaved: {speedup} {verdict}{kept}")


def _print_summary(out: list, interpreted: bool) -> None:
    from autotune import report
    from autotune.progress import format_value

    columns = ["problem", "best", "default", "speed-up", "params"]
    with_algorithm = any(k.name == "algorithm" for r in out for k in r.space.knobs)
    if with_algorithm:
        columns.insert(1, "algorithm")  # which algorithm won on each layer
    rows = []
    for r in out:
        problem = _problem_text(r.space.problem)
        if r.best_values is None:
            rows.append([problem] + [""] * (len(columns) - 2) + ["no feasible trial"])
            continue
        name0 = r.space.objectives[0].name
        default = r.default_values
        best_v = r.best_values[name0]
        default_v = default[name0] if default else None
        ratio = f"{default_v / best_v:.2f}x" if default_v and best_v else "-"
        if r.confirmation is not None and r.confirmation.get("same_config"):
            ratio = "1.00x (the default is best)"
        elif r.confirmation is not None:
            ratio = " ".join(report.confirmation_cells(r.confirmation))
        knobs = {k.name: r.best_params[k.name] for k in r.space.knobs if k.active(r.best_params)}
        best_text = ", ".join(f"{o.name}={format_value(r.best_values[o.name], o.name)}" for o in r.space.objectives) \
            if len(r.space.objectives) > 1 else format_value(best_v, name0)
        row = [problem, best_text, format_value(default_v, name0), ratio, " ".join(f"{k}={v}" for k, v in knobs.items())]
        if with_algorithm:
            row.insert(1, str(r.best_params.get("algorithm", "-")))
        rows.append(row)
    print_rows("best configs" + (" (interpreted: not kernel speed)" if interpreted else ""), columns, rows)


def _worker_devices(workers: int) -> tuple[list[dict], str]:
    """Environment of each local worker, and a line saying where they run.

    On several GPUs each worker gets one (``CUDA_VISIBLE_DEVICES``, round robin); workers that share
    a GPU each get a share of its memory instead of JAX's default 75 % (which would leave the
    second one none)."""
    from tuning import platform

    if platform.backend() != "gpu":
        return [{} for _ in range(workers)], (f"{workers} workers on the CPU; they share its cores, so their "
                                               "timings disturb each other")
    import jax

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(jax.device_count())]
    per_gpu = -(-workers // len(ids))
    envs = []
    for i in range(workers):
        env = {"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]}
        if per_gpu > 1:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / per_gpu:.3f}"
        envs.append(env)
    where = f"{workers} workers on GPUs {', '.join(e['CUDA_VISIBLE_DEVICES'] for e in envs)}"
    if per_gpu > 1:
        where += (f"; {per_gpu} share each GPU, so their timings disturb each other: use one worker per GPU "
                  "for figures to cite")
    return envs, where


def _worker_argv(args, index: int) -> list[str]:
    argv = [sys.executable, "-m", "autotune", "sweep", "--kernel", args.kernel, "--seed", str(args.seed),
            "--worker-index", str(index), "--no-progress"]
    for shape in args.shape:
        argv += ["--shape", shape]
    for flag, value in (("--layer", args.layer), ("--model", args.model), ("--target", args.target),
                        ("--dtype", args.dtype), ("--trials", args.trials),
                        ("--timeout", args.timeout), ("--storage", args.storage or default_storage()),
                        ("--study-name", args.study_name)):
        if value is not None:
            argv += [flag, str(value)]
    if args.no_warm_start:
        argv.append("--no-warm-start")
    return argv


def _run_workers(args, spaces, n_trials, storage, bundle) -> int:
    """``--workers N``: N processes on the same studies, one per GPU where there are several."""
    import optuna

    from autotune import results, tuner
    from autotune.progress import SweepProgress, complete_trials
    from tuning import tuned

    devices, where = _worker_devices(args.workers)
    names = [tuner.study_name_for(s, args.study_name) for s in spaces]
    progress = SweepProgress(len(spaces), n_trials, bar=None if not args.no_progress else False, lines=False)
    procs = []
    for i in range(args.workers):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **devices[i]}
        procs.append(subprocess.Popen(_worker_argv(args, i), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1))
    print(f"{where} (pids {', '.join(str(p.pid) for p in procs)})", flush=True)
    tails: list[list[str]] = [[] for _ in procs]

    def relay(i, proc):
        for line in proc.stdout:
            tails[i] = (tails[i] + [line.rstrip()])[-20:]
            progress.write(f"[worker {i}] {line.rstrip()}")

    threads = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    storage_obj = tuner.make_storage(storage)

    def poll_progress():
        total = 0
        for name in names:
            try:
                total += min(complete_trials(optuna.load_study(study_name=name, storage=storage_obj)), n_trials)
            except KeyError:  # not created yet
                pass
        progress.update(total)

    interrupted = False
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while any(p.poll() is None for p in procs):
            poll_progress()
            time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for t in threads:
            t.join(timeout=5)
        poll_progress()
        progress.close()
    out = []
    for space, name in zip(spaces, names):
        try:
            study = optuna.load_study(study_name=name, storage=storage_obj)
        except KeyError:
            continue
        best_params, best_values = tuner.best_of(study, space)
        if best_params is not None:
            tuned.store(space.kernel, space.problem, best_params, **best_values, study=name,
                        objective=space.objectives[0].name, interpreted=space.interpreted)
        result = tuner.TuneResult(study, space, best_params, best_values)
        if not interrupted and not args.no_confirm:
            _confirm(result, print)
        out.append(result)
    env = results.environment(seed=args.seed, interpreted=any(s.interpreted for s in spaces))
    env["workers"] = args.workers
    env["warm_start_sources"] = {r.study.study_name: r.study.user_attrs.get("warm_start") for r in out}
    if out:
        results.write_bundle(bundle, out, env)
    if interrupted:
        print("interrupted: every finished trial is kept in the storage; run the same command again to resume",
              file=sys.stderr)
        print(f"results bundle (partial): {bundle.resolve()}")
        return 130
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        i, code = failed[0]
        last = next((line for line in reversed(tails[i]) if line.startswith("error:")), tails[i][-1] if tails[i] else "")
        raise ValueError(f"worker {i} exited with status {code}: {last.removeprefix('error: ')}")
    _print_summary(out, any(space.interpreted for space in spaces))
    print(f"results bundle: {bundle.resolve()}")
    return 0


# ----------------------------------------------------------------------------------------------
# list, show, plot, export, import
# ----------------------------------------------------------------------------------------------

def _existing_storage(url: str | None):
    """The storage of ``url`` for reading; a SQLite file that does not exist is not created."""
    from sqlalchemy.engine import make_url

    from autotune import tuner

    url = url or default_storage()
    engine_url = tuner.storage_url(url)
    parsed = make_url(engine_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not pathlib.Path(parsed.database).exists():
        return url, None
    return url, tuner.make_storage(url)


def cmd_list(args) -> int:
    from autotune import registry

    if args.what == "kernels":
        rows = []
        for name, entry in registry.KERNELS.items():
            flags = entry.flags()
            presets = getattr(entry.load(), "PRESETS", {})
            rows.append([name, entry.module, ", ".join(entry.dtypes) or "-", ", ".join(presets),
                         flags.get("--shape", ""), flags.get("--model", "")])
        print_rows("kernels (--kernel)", ["kernel", "module", "dtypes", "layers", "shape", "model"], rows, args.format)
    elif args.what == "layers":
        rows = []
        for name, entry in registry.KERNELS.items():
            for layer, problems in getattr(entry.load(), "PRESETS", {}).items():
                rows.append([name, layer, len(problems)])
        print_rows("layer presets (--kernel K --layer L)", ["kernel", "layer", "problems"], rows, args.format)
    elif args.what == "boards":
        targets = registry.targets()
        columns = list(dict.fromkeys(key for target in targets for key in target)) or ["board"]
        print_rows("boards (--target)", columns, [[t.get(c, "") for c in columns] for t in targets], args.format)
    else:
        return _list_studies(args)
    return 0


def _list_studies(args) -> int:
    import optuna
    from optuna.trial import TrialState

    from autotune.progress import format_value

    url, storage = _existing_storage(args.storage)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False) if storage else []
    rows = []
    for summary in summaries:
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        count = {state: sum(t.state == state for t in trials) for state in
                 (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)}
        feasible = [t for t in trials if t.state == TrialState.COMPLETE and t.values
                    and not t.user_attrs.get("violations") and all(math.isfinite(v) for v in t.values)]
        best = ""
        if feasible:
            sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
            metric = (study.metric_names or ["value"])[0]
            best = format_value(min(t.values[0] * sign for t in feasible) * sign, metric)
        attrs = summary.user_attrs
        rows.append([summary.study_name, attrs.get("kernel", ""), attrs.get("problem", ""), attrs.get("device", ""),
                     count[TrialState.COMPLETE], count[TrialState.FAIL], count[TrialState.RUNNING], best])
    print_rows(f"studies in {url}", ["study", "kernel", "problem", "device", "complete", "fail", "running", "best"],
               rows, args.format)
    if not rows and args.format == "table":
        print("no studies yet; `python -m autotune sweep` makes some")
    return 0


def cmd_show(args) -> int:
    import jax

    from autotune.progress import format_value
    from tuning import platform, tuned

    rows = []
    for key, entry in sorted(tuned.load().items()):
        k = json.loads(key)
        if args.kernel and k["kernel"] != args.kernel:
            continue
        if not args.all_devices and (k["device"] != platform.device_kind() or k["jax"] != jax.__version__):
            continue
        objective = entry.get("objective") or ("seconds" if "seconds" in entry else None)
        value = entry.get(objective) if objective else None
        value_text = format_value(value, objective) if isinstance(value, (int, float)) else ""
        if args.format == "table":
            rows.append([k["kernel"], json.dumps(k["problem"]), k["device"], k["jax"],
                         " ".join(f"{a}={b}" for a, b in entry["params"].items()), value_text])
        else:
            rows.append([k["kernel"], k["problem"], k["device"], k["jax"], entry["params"], objective, value])
    columns = ["kernel", "problem", "device", "jax", "params", "value"] if args.format == "table" else \
        ["kernel", "problem", "device", "jax", "params", "objective", "value"]
    print_rows(f"best-config cache: {tuned.cache_path()}", columns, rows, args.format)
    if not rows and args.format == "table":
        print("no tuned configs for this device and jax version; run `python -m autotune sweep` "
              "(or `show --all-devices`)")
    return 0


def cmd_plot(args) -> int:
    import optuna

    from autotune import plots

    url, storage = _existing_storage(args.storage)
    if storage is None:
        raise ValueError(f"no storage at {url}; run a sweep first or pass --storage")
    names = [args.study_name] if args.study_name else [s.study_name for s in optuna.get_all_study_summaries(
        storage, include_best_trial=False)]
    if not names:
        print(f"no studies in {url}")
        return 0
    output = pathlib.Path(args.output)
    _make_dir(output, "-o")
    written = []
    for name in names:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise ValueError(f"no study named {name!r} in {url}; `python -m autotune list studies"
                             f"{'' if args.storage is None else ' --storage ' + args.storage}` lists them") from None
        written += plots.plot_study(study, output)
    for path in written:
        print(path)
    return 0


def cmd_export(args) -> int:
    from tuning import tuned

    count = tuned.export(args.file, args.kernel or None)
    print(f"exported {count} configs to {args.file}")
    return 0


def cmd_import(args) -> int:
    from tuning import tuned

    counts = tuned.import_file(args.file)
    print(f"imported {args.file} into {tuned.cache_path()}: added {counts['added']}, replaced {counts['replaced']} "
          f"(the file's config measured faster), kept {counts['kept']} (the cache's was as fast or faster)")
    return 0


def cmd_report(args) -> int:
    from autotune import report

    text = report.report(args.paths, args.format, args.table, args.columns)  # a ValueError: one error line
    if args.output:
        pathlib.Path(args.output).write_text(text)
    print(text if not args.output else f"wrote {args.output}")
    return 0


def cmd_replay(args) -> int:
    from autotune import replay, report

    if args.repeats is not None and args.repeats < 10:
        raise ValueError(f"--repeats {args.repeats}: intervals need at least 10 samples")
    table, _ = replay.replay(args.bundle, repeats=args.repeats)  # a ValueError is one error line (main)
    print(report.render([table], args.format))
    return 0


COMMANDS = {"sweep": cmd_sweep, "list": cmd_list, "show": cmd_show, "plot": cmd_plot, "export": cmd_export,
            "import": cmd_import, "report": cmd_report, "replay": cmd_replay}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for every mistake in the arguments)."""
    import sqlalchemy.exc

    return cli.run(_main, argv, user_errors=(sqlalchemy.exc.SQLAlchemyError,))


def _main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `python -m autotune` (or only --debug): what it can do
        parser.print_help()
        return 0
    if args.command in ("sweep", "list", "plot"):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are reported one line each
    return COMMANDS[args.command](args)
