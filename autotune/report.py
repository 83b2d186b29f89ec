"""Tables from results alone: ``python -m autotune report BUNDLE_OR_JSON... [--table NAME] --format md|latex|csv``.

Reads sweep bundles (folders written by ``python -m autotune sweep``) and the JSONs of
``benchmarks/*.py``, and regenerates the tables the README and notebooks quote; nothing is
re-measured (``python -m autotune replay`` does that). Each kind of JSON has one reader in
``READERS``, keyed by the document's ``benchmark`` field (schema ``tinypallas-benchmark/2``,
written through ``autotune.results``) or, for files older than that schema, by the legacy kind
``kind_of`` recognises; those are shown with that said, and without verdicts. Every table has a
``name`` (``mcu:summary``, ``matmul:float32``) that ``--table`` selects.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import pathlib
import re
from collections.abc import Callable, Sequence

FORMATS = ("md", "latex", "csv")
SCHEMA = "tinypallas-benchmark/2"  # what benchmarks/*.py write


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)
    name: str = ""  # what ``--table`` selects, e.g. "mcu:summary"


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------


def sig3(value: float) -> str:
    """Three significant digits, whole numbers from 1000 on."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def us(seconds: float | None) -> str:
    """Seconds as microseconds with three significant digits."""
    return "-" if seconds is None else sig3(seconds * 1e6)


def with_interval(value: str, low: str, high: str) -> str:
    return f"{value} [{low}, {high}]"


def timing_cell(t: dict | None) -> str:
    """``median [ci_low, ci_high]`` in microseconds of a ``Timing.as_dict()``."""
    if not t or t.get("median_seconds") is None:
        return "-"
    if t.get("ci_low_seconds") is None:
        return us(t["median_seconds"])
    return with_interval(us(t["median_seconds"]), us(t["ci_low_seconds"]), us(t["ci_high_seconds"]))


def rate_cell(t: dict | None, units_per_call: float | None) -> str:
    """``units / median [units / ci_high, units / ci_low]`` of a ``Timing.as_dict()`` (e.g. tok/s)."""
    if not t or t.get("median_seconds") is None or not units_per_call:
        return "-"
    rate = sig3(units_per_call / t["median_seconds"])
    if t.get("ci_low_seconds") is None:
        return rate
    return with_interval(rate, sig3(units_per_call / t["ci_high_seconds"]), sig3(units_per_call / t["ci_low_seconds"]))


def ratio_cell(r: dict) -> str:
    return with_interval(f"{r['ratio']:.2f}x", f"{r['ratio_ci_low']:.2f}", f"{r['ratio_ci_high']:.2f}")


def fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def nbytes(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def confirmation_cells(confirmed: dict | None) -> tuple[str, str]:
    """(speed-up [95% CI], verdict) of a sweep's tuned-vs-default confirmation (``tuner.confirm``):
    "the default is best" where the two are one config, "-" where nothing was confirmed."""
    confirmed = confirmed or {}
    if confirmed.get("same_config"):
        return "-", "the default is best"
    r = confirmed.get("ratios", {}).get("tuned")
    if r is None:
        return "-", "-"
    return ratio_cell(r), r["verdict"] + (" (default kept)" if confirmed.get("kept") == "default" else "")


def problem_label(problem: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in problem.items())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "rows"


def code_note(env: dict) -> str:
    """Which code produced a file: its commit, whether the tree had changes, and the date."""
    commit = env.get("git_commit")
    code = f"commit {commit[:10]}" if commit else "commit unknown"
    if env.get("git_dirty"):
        code += " (uncommitted changes)"
    if env.get("git_commit_recorded"):
        code += " (recorded at commit time, not at measurement time)"
    return f"{code}; {env.get('date_utc') or env.get('time_utc') or 'date unknown'}"


def env_note(env: dict) -> str:
    device = env.get("device_kind") or env.get("device") or "?"
    if env.get("interpreted"):
        device += ", Pallas interpreted: not kernel speed"
    return f"{device}; jax {env.get('jax', '?')}; {code_note(env)}"


# ---------------------------------------------------------------------------------------------
# Sweep bundles
# ---------------------------------------------------------------------------------------------


def bundle_tables(directory: pathlib.Path) -> list[Table]:
    best = json.loads((directory / "best_configs.json").read_text())
    env = json.loads((directory / "env.json").read_text()) if (directory / "env.json").exists() else {}
    by_kernel: dict[str, list[dict]] = {}
    for entry in best:
        by_kernel.setdefault(entry["kernel"], []).append(entry)
    tables = []
    for kernel, entries in by_kernel.items():
        objectives = list(entries[0].get("values") or {"seconds": None})
        timed = objectives == ["seconds"]
        confirmed = any((e.get("confirmed") or {}).get("ratios") for e in entries)
        columns = ["problem", "best (us) [95% CI]" if timed else "best", "default (us)" if timed else "default",
                   "default/best"] + (["tuned vs default, interleaved [95% CI]", "verdict"] if confirmed else []) \
            + ["params"]
        rows = []
        for e in entries:
            values, default = e.get("values"), e.get("default_values")
            if values is None:
                rows.append([problem_label(e["problem"]), "no feasible trial"] + ["-"] * (len(columns) - 2))
                continue
            first = objectives[0]
            if timed:
                best_cell = timing_cell(e.get("timing")) if e.get("timing") else us(values[first])
                default_cell = us(default[first]) if default else "-"
            else:
                best_cell = ", ".join(f"{k}={v:,.0f}" for k, v in values.items())
                default_cell = ", ".join(f"{k}={v:,.0f}" for k, v in default.items()) if default else "-"
            ratio = f"{default[first] / values[first]:.2f}x" if default and values[first] else "-"
            if (e.get("confirmed") or {}).get("same_config"):
                ratio = "1.00x (same config)"
            params = ", ".join(f"{k}={v}" for k, v in (e.get("params") or {}).items())
            extra = list(confirmation_cells(e.get("confirmed"))) if confirmed else []
            rows.append([problem_label(e["problem"]), best_cell, default_cell, ratio, *extra, params])
        notes = [f"sweep bundle {directory.name}: {env_note(env)}; seed {env.get('seed')}"]
        if timed:
            notes.append("best: the best trial's median with its 95% bootstrap interval; default: the heuristic "
                         "config's median in the same sweep (a tuning figure, not an interleaved comparison)")
            if confirmed:
                notes.append("tuned vs default, interleaved: the two configs timed again in alternating rounds "
                             "after the sweep (default time / tuned time); win or loss only where the intervals "
                             "do not overlap, else parity")
        tables.append(Table(f"{kernel}: best configs", columns, rows, notes, f"{kernel}:best"))
    return tables


# ---------------------------------------------------------------------------------------------
# Benchmark JSONs: one reader per kind
# ---------------------------------------------------------------------------------------------


def comparison_tables(doc: dict, name: str) -> list[Table]:
    """Rows of ``results.comparison_row`` (matmul, conv, int8, llama): one table per section. Rows with
    ``flops`` get a TFLOP/s column; rows with ``tokens_per_call`` are shown as tok/s."""
    env = doc.get("env", {})
    benchmark = doc.get("benchmark", name)
    groups: dict[str, list[dict]] = {}
    for row in doc.get("rows", []):
        groups.setdefault(row.get("section", benchmark), []).append(row)
    tables = []
    for section, rows in groups.items():
        has_flops = any(r.get("flops") for r in rows)
        rates = any(r.get("tokens_per_call") for r in rows)
        unit = "tok/s" if rates else "us"
        columns = ["problem", "contender", f"baseline ({unit}) [95% CI]", f"contender ({unit}) [95% CI]",
                   "speed-up [95% CI]", "verdict"] + (["TFLOP/s"] if has_flops else []) + ["timer"]
        out = []
        baselines = set()
        for r in rows:
            c = r.get("comparison")
            if not c:
                out.append([r.get("label", "?"), "-", "-", "-", "-", "failed: " + "; ".join(r.get("errors", []))[:80]]
                           + (["-"] if has_flops else []) + ["-"])
                continue

            def cell(t: dict, r: dict = r, rates: bool = rates) -> str:
                return rate_cell(t, r.get("tokens_per_call")) if rates else timing_cell(t)

            base = c["baseline"]
            baselines.add(f"{base} = {r.get('contenders', {}).get(base, {}).get('what', base)}")
            for contender, ratio in c["ratios"].items():
                t = c["timings"][contender]
                cells = [r.get("label", "?"), contender, cell(c["timings"][base]), cell(t), ratio_cell(ratio),
                         ratio["verdict"]]
                if has_flops:
                    cells.append(f"{r['flops'] / t['median_seconds'] / 1e12:.1f}" if r.get("flops") else "-")
                cells.append(t.get("timer", "?"))
                out.append(cells)
        notes = [f"{name}: {env_note(env)}",
                 ("interleaved rounds; medians with 95% bootstrap intervals; speed-up = baseline time / contender "
                  "time; win or loss only where the intervals do not overlap, else parity")]
        if rates:
            notes.append("tok/s = tokens per timed call / median time, its interval from the time's")
        notes += [f"baseline {b}" for b in sorted(baselines)]
        if doc.get("read_bandwidth"):
            bw = doc["read_bandwidth"]
            nominal = bw.get("nominal_bytes_per_second")
            notes.append(f"read stream measured {bw['measured_bytes_per_second'] / 1e9:.0f} GB/s"
                         + (f", nominal {nominal / 1e9:.0f} GB/s" if nominal else ", nominal unknown"))
        tables.append(Table(f"{benchmark}: {section}", columns, out, notes, f"{benchmark}:{slug(section)}"))
    return tables


def model_label(file_name: str) -> str:
    """``mlperf_tiny_kws01_dscnn_int8.tflite`` -> ``kws01_dscnn``; ``_floatio`` -> `` float I/O``."""
    stem = file_name.removesuffix(".tflite")
    for prefix in ("mlperf_tiny_", "tinyengine_"):
        stem = stem.removeprefix(prefix)
    float_io = stem.endswith("_floatio")
    stem = stem.removesuffix("_floatio").removesuffix("_int8")
    return stem + (" float I/O" if float_io else "")


def mcu_tables(doc: dict, name: str) -> list[Table]:
    """``benchmarks/mcu.py``: per model, each schedule's executed instructions under QEMU, peak SRAM
    and flash, against CMSIS-NN's instructions and TFLite Micro's arena."""
    env, rows = doc.get("env", {}), doc.get("rows", [])
    board = doc.get("settings", {}).get("board") or env.get("board", "?")
    qemu_board = next((r.get("qemu_board") for r in rows if r.get("qemu_board")), None)
    where = (f"instructions of one inference under QEMU {env.get('qemu_machine', '?')} ({qemu_board} memory map)"
             if qemu_board else "no instruction counts (built without QEMU)")
    cmsis = env.get("cmsis_nn_commit")
    provenance = (f"{name}: board {board}; {where}; CMSIS-NN {cmsis[:8] if cmsis else 'not used'}; "
                  f"{code_note(env)}")
    runs = [e.get("bit_exact_vs_tflm") for r in rows for e in r["schedules"].values() if "bit_exact_vs_tflm" in e]
    exact = (f"bit-exact with TFLite Micro in {sum(1 for x in runs if x)} of {len(runs)} runs" if runs
             else "not run, so not checked against TFLite Micro")
    notes = [provenance, exact] + ([doc["restructured"]] if doc.get("restructured") else [])
    summary, schedules = [], []
    for r in rows:
        s = r["schedules"]
        spec, port = s.get("specialized", {}), s.get("portable", {})
        cmsis_default, cmsis_min = s.get("cmsis-nn", {}), s.get("cmsis-nn min-SRAM", {})
        patches = [p for p in cmsis_min.get("schedule", "").split(", ") if p.startswith("patches ")]
        with_input = ((cmsis_min["peak_sram"] + r["caller_input_bytes"]) / r["tflm_arena_total"]
                      if cmsis_min else None)
        cmsis_cell = (f"{fraction(cmsis_default.get('sram_ratio_vs_tflm'))}, "
                      f"{fraction(cmsis_min.get('sram_ratio_vs_tflm'))} "
                      f"({', '.join([fraction(cmsis_min.get('instructions_ratio_vs_cmsis_nn')), *patches])})")
        summary.append([model_label(r["model"]), fraction(spec.get("instructions_ratio_vs_cmsis_nn")),
                        f"{nbytes(spec.get('peak_sram'))} ({nbytes(port.get('peak_sram'))})", cmsis_cell,
                        fraction(with_input), nbytes(r["tflm_arena_total"])])
        for schedule, e in s.items():
            exact_cell = {True: "yes", False: "NO", None: "-"}[e.get("bit_exact_vs_tflm")]
            schedules.append([
                model_label(r["model"]), schedule, nbytes(e.get("instructions")),
                fraction(e.get("macs_per_instruction")), fraction(e.get("instructions_ratio_vs_cmsis_nn")),
                nbytes(e["peak_sram"]), fraction(e["sram_ratio_vs_tflm"]), nbytes(e.get("flash_bytes")),
                "yes" if e["fits"] else "NO: " + "; ".join(e.get("does_not_fit", [])), exact_cell,
                f"{e['schedule']} [{e['origin']}]"])
    arena = ("peak SRAM: the arena in bytes; the caller's input buffer is outside it (TFLite Micro's arena "
             "holds its input tensor, so \"+ input\" is the like-for-like total)")
    return [
        Table(f"mcu: {board}, specialized against CMSIS-NN and TFLite Micro",
              ["model", "specialized instr. / CMSIS-NN", "specialized peak SRAM (portable default)",
               "cmsis-nn peak / TFLM arena: default, min-SRAM (its instr. vs CMSIS-NN)",
               "cmsis-nn min-SRAM + input / TFLM",
               "TFLM arena"], summary,
              notes + ["instr. / CMSIS-NN: executed instructions over those of the cmsis-nn default schedule; "
                       + arena], "mcu:summary"),
        Table(f"mcu: {board}, every schedule",
              ["model", "schedule", "instructions", "MAC/instr.", "instr. / CMSIS-NN", "peak SRAM",
               "peak / TFLM arena", "flash", "fits", "bit-exact", "schedule used"], schedules,
              notes + ["fits: SRAM with the stack, flash with the code; " + arena], "mcu:schedules"),
    ]


_LEGACY_NOTE = ("earlier host-timed protocol: contenders timed one after another, medians without intervals, "
                "so no ratio here is a verdict; to be re-measured")


def legacy_matmul_tables(doc: dict, name: str) -> list[Table]:
    rows = [[f"{r['m']}x{r['n']}x{r['k']}", us(r["xla_seconds"]), us(r["tuned_seconds"]),
             f"{r['tuned_vs_xla']:.2f}x", "yes" if r.get("noisy") else ""] for r in doc["rows"]]
    return [Table("matmul (earlier protocol)", ["MxNxK", "xla (us)", "tuned (us)", "xla/tuned", "noisy"], rows,
                  [f"{name}: {env_note(doc.get('env', {}))}", _LEGACY_NOTE], "matmul:earlier")]


def legacy_conv_tables(doc: dict, name: str) -> list[Table]:
    rows = []
    for r in doc["layers"]:
        q = r["problem"]
        layer = f"{q['h']}x{q['w']}x{q['c']}->{q['k']} {q['kh']}x{q['kw']}/s{q['stride']} g{q['groups']}"
        rows.append([r.get("network", ""), layer, us(r.get("lax_seconds")), r.get("best_algorithm") or "-",
                     us(r.get("best_seconds")), f"{r['best_vs_lax']:.2f}x" if "best_vs_lax" in r else "-"])
    return [Table("conv2d (earlier protocol)", ["network", "layer", "lax (us)", "best algorithm", "best (us)",
                                               "lax/best"], rows, [f"{name}: {env_note(doc.get('env', {}))}",
                                                                   _LEGACY_NOTE], "conv2d:earlier")]


def legacy_llama_gpu_tables(doc: dict, name: str) -> list[Table]:
    """``llama_h100.json``: LLaMA-2-7B decode tok/s of the pallas and xla paths against the roofline,
    measured before the current LLaMA kernels."""
    rows = [[r["format"], f"{r['weight_bytes'] / 1e9:.2f}", sig3(r["xla_tok_s"]), sig3(r["pallas_tok_s"]),
             f"{r['pallas_over_xla']:.2f}x", sig3(r["roofline_nominal_tok_s"]), sig3(r["roofline_measured_tok_s"]),
             fraction(r["xla_fraction_of_nominal_roofline"]), fraction(r["pallas_fraction_of_nominal_roofline"])]
            for r in doc["results"]]
    notes = [f"{name}: {env_note(doc.get('env', {}))}", _LEGACY_NOTE,
             ("measured before the current LLaMA kernels (per-layer weights and KV caches, separate q/k/v GEMVs, "
             "a separate RoPE kernel): not a figure of today's code"),
             (f"{doc.get('model', '?')}; batch 1, context {doc.get('context')}, {doc.get('tokens')} tokens; roofline "
             f"= bandwidth / bytes per step, at the nominal {doc['bandwidth_nominal'] / 1e9:.0f} GB/s and at a "
             f"host-timed copy's {doc['bandwidth_measured'] / 1e9:.0f} GB/s (flattering)")]
    return [Table("llama: GPU decode (earlier protocol, earlier kernels)",
                  ["format", "weights (GB)", "xla tok/s", "pallas tok/s", "pallas/xla", "roofline tok/s (nominal)",
                   "roofline tok/s (copy)", "xla / nominal roofline", "pallas / nominal roofline"],
                  rows, notes, "llama:gpu-earlier")]


def legacy_llama_cpu_tables(doc: dict, name: str) -> list[Table]:
    """The first ``llama_cpu.json``: decode tok/s of the xla path and llama.cpp, best of a few rounds."""
    rows = [["xla path", ", ".join(sig3(v) for v in doc["xla_tok_s_rounds"]), sig3(doc["xla_tok_s"]),
             f"{doc['xla_over_llama_cpp']:.3f}x"],
            [f"llama.cpp {doc.get('llama_cpp_version', '')}".strip(),
             ", ".join(sig3(v) for v in doc["llama_cpp_tok_s_rounds"]), sig3(doc["llama_cpp_tok_s"]), "-"]]
    notes = [f"{name}: {env_note(doc.get('env', {}))}",
             ("earlier protocol: the best of each side's rounds, no intervals, so the ratio is not a verdict; "
             "the compiled CPU kernels did not exist yet; to be re-measured"),
             (f"{doc.get('model', '?')}; context {doc.get('context')}, {doc.get('tokens')} tokens per round; the "
             "file's tiny_pallas_interpret_tok_s is left out (what it timed is not recorded)")]
    return [Table("llama: CPU decode (earlier protocol)",
                  ["contender", "decode tok/s per round", "reported (best round)", "vs llama.cpp"], rows, notes,
                  "llama:cpu-earlier")]


Reader = Callable[[dict, str], list[Table]]

# kind -> reader: benchmark/2 documents by their ``benchmark`` field, older files by ``LEGACY`` below.
READERS: dict[str, Reader] = {
    "matmul": comparison_tables, "conv": comparison_tables, "int8": comparison_tables,
    "llama": comparison_tables, "mcu": mcu_tables,
    "matmul (earlier protocol)": legacy_matmul_tables, "conv2d (earlier protocol)": legacy_conv_tables,
    "llama gpu (earlier protocol)": legacy_llama_gpu_tables, "llama cpu (earlier protocol)": legacy_llama_cpu_tables,
}

# Files from before the benchmark/2 schema: their kind, told by their fields.
LEGACY: tuple[tuple[str, Callable[[dict], bool]], ...] = (
    ("matmul (earlier protocol)", lambda d: bool(d.get("rows")) and "xla_seconds" in d["rows"][0]),
    ("conv2d (earlier protocol)", lambda d: "layers" in d),
    ("llama gpu (earlier protocol)", lambda d: d.get("kind") == "gpu" and "results" in d),
    ("llama cpu (earlier protocol)", lambda d: d.get("kind") == "cpu" and "xla_tok_s_rounds" in d),
)


def kind_of(doc: dict, name: str) -> str:
    """The ``READERS`` key of a benchmark document, or a ValueError naming what it is not."""
    if "schema" in doc:
        if doc["schema"] != SCHEMA:
            raise ValueError(f"{name}: schema {doc['schema']!r}; `report` reads {SCHEMA!r} and the earlier files")
        if doc.get("benchmark") not in READERS:
            known = ", ".join(k for k in READERS if "(" not in k)
            raise ValueError(f"{name}: benchmark {doc.get('benchmark')!r} has no table reader (known: {known}); "
                             "add one to READERS in autotune/report.py")
        return doc["benchmark"]
    for kind, recognises in LEGACY:
        try:
            if recognises(doc):
                return kind
        except (TypeError, AttributeError, IndexError):
            continue
    raise ValueError(f"{name}: not a sweep bundle or a benchmark JSON that `report` reads (neither schema {SCHEMA!r} "
                     "nor an earlier matmul, conv2d or llama file)")


def tables_of(doc: dict, name: str) -> list[Table]:
    """The tables of one benchmark document, by the reader of its kind."""
    kind = kind_of(doc, name)
    try:
        return READERS[kind](doc, name)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"{name}: damaged {kind} results ({type(e).__name__}: {e})") from None


def load(path: str | pathlib.Path) -> list[Table]:
    """The tables of one bundle folder or benchmark JSON file."""
    p = pathlib.Path(path)
    if p.is_dir():
        if not (p / "best_configs.json").exists():
            raise ValueError(f"{p}: a folder, but not a sweep bundle (no best_configs.json)")
        try:
            return bundle_tables(p)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
            raise ValueError(f"{p}: a damaged sweep bundle ({type(e).__name__}: {e})") from None
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file or folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot be read as JSON ({e})") from None
    if not isinstance(doc, dict):  # a user's file: one error line, as every ValueError here
        raise ValueError(f"{p}: not a sweep bundle or a benchmark JSON that `report` reads (a JSON "  # noqa: TRY004
                         f"{type(doc).__name__}, not an object)")
    return tables_of(doc, p.name)


def select(tables: Sequence[Table], names: Sequence[str] | None = None, columns: str | None = None) -> list[Table]:
    """The tables whose ``name`` matches one of ``names`` (shell patterns: ``llama:*``), each cut to
    ``columns`` (comma-separated 1-based positions or whole headers, in the order wanted)."""
    chosen = list(tables)
    if names:
        for pattern in names:
            if not any(fnmatch.fnmatchcase(t.name, pattern) for t in tables):
                raise ValueError(f"--table {pattern!r} matches none of these tables: "
                                 f"{', '.join(t.name for t in tables)}")
        chosen = [t for t in tables if any(fnmatch.fnmatchcase(t.name, n) for n in names)]
    if columns is None:
        return chosen
    out = []
    for t in chosen:
        picked = []
        for token in columns.split(","):
            token = token.strip()
            if token.isdigit() and 1 <= int(token) <= len(t.columns):
                picked.append(int(token) - 1)
            elif token in t.columns:
                picked.append(t.columns.index(token))
            else:
                listing = "; ".join(f"{i} {c}" for i, c in enumerate(t.columns, 1))
                raise ValueError(f"--columns: {token!r} is not a column of {t.name} (by position or header: "
                                 f"{listing})")
        out.append(dataclasses.replace(t, columns=[t.columns[i] for i in picked],
                                       rows=[[row[i] for i in picked] for row in t.rows]))
    return out


# ---------------------------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------------------------


def _md(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
    lines += [""] + [line for n in t.notes for line in (">", f"> {n}")][1:]  # one quoted paragraph per note
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(a, b)
    return text


def _latex(t: Table) -> str:
    lines = [r"\begin{table}", r"\centering", r"\begin{tabular}{" + "l" * len(t.columns) + "}", r"\hline",
             " & ".join(_latex_escape(c) for c in t.columns) + r" \\", r"\hline"]
    lines += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in t.rows]
    lines += [r"\hline", r"\end{tabular}",
              r"\caption{" + _latex_escape(t.title + ". " + " ".join(t.notes)) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _csv(t: Table) -> str:
    import csv
    import io

    buf = io.StringIO()
    buf.write(f"# {t.title}\n")
    for n in t.notes:
        buf.write(f"# {n}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(t.columns)
    writer.writerows(t.rows)
    return buf.getvalue()


def render(tables: Sequence[Table], fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    one = {"md": _md, "latex": _latex, "csv": _csv}[fmt]
    return "\n".join(one(t) for t in tables)


def report(paths: Sequence[str | pathlib.Path], fmt: str = "md", tables: Sequence[str] | None = None,
           columns: str | None = None) -> str:
    """The tables of every bundle and benchmark JSON in ``paths`` (those ``tables`` names, cut to
    ``columns``: see ``select``), rendered as ``fmt``."""
    return render(select([t for p in paths for t in load(p)], tables, columns), fmt)
