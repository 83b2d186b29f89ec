"""Tables from results alone: ``python -m autotune report BUNDLE_OR_JSON... --format md|latex|csv``.

Reads sweep bundles (folders written by ``python -m autotune sweep``: ``best_configs.json`` and
``env.json``) and benchmark JSONs (written by ``benchmarks/*.py``: ``{"benchmark", "env", "rows"}``
with one ``measure.Comparison`` per row), and regenerates the tables the README and notebooks
quote. Nothing is re-measured (``python -m autotune replay`` does that). Files from the earlier
host-timed protocol (no intervals) are shown with that said, and without verdicts.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

FORMATS = ("md", "latex", "csv")
SCHEMA = "tinypallas-benchmark/2"  # what benchmarks/*.py write


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------


def us(seconds: float | None) -> str:
    """Seconds as microseconds with three significant digits."""
    if seconds is None:
        return "-"
    v = seconds * 1e6
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def with_interval(value: str, low: str, high: str) -> str:
    return f"{value} [{low}, {high}]"


def timing_cell(t: dict | None) -> str:
    """``median [ci_low, ci_high]`` in microseconds of a ``Timing.as_dict()``."""
    if not t or t.get("median_seconds") is None:
        return "-"
    if t.get("ci_low_seconds") is None:
        return us(t["median_seconds"])
    return with_interval(us(t["median_seconds"]), us(t["ci_low_seconds"]), us(t["ci_high_seconds"]))


def ratio_cell(r: dict) -> str:
    return with_interval(f"{r['ratio']:.2f}x", f"{r['ratio_ci_low']:.2f}", f"{r['ratio_ci_high']:.2f}")


def problem_label(problem: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in problem.items())


def env_note(env: dict) -> str:
    commit = env.get("git_commit")
    code = f"commit {commit[:10]}" if commit else "commit unknown"
    if env.get("git_dirty"):
        code += " (uncommitted changes)"
    if env.get("git_commit_recorded"):
        code += " (recorded at commit time, not at measurement time)"
    device = env.get("device_kind", "?")
    if env.get("interpreted"):
        device += ", Pallas interpreted: not kernel speed"
    return f"{device}; jax {env.get('jax', '?')}; {code}; {env.get('date_utc') or 'date unknown'}"


# ---------------------------------------------------------------------------------------------
# Readers
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
        columns = ["problem", "best (us) [95% CI]" if timed else "best", "default (us)" if timed else "default",
                   "default/best", "params"]
        rows = []
        for e in entries:
            values, default = e.get("values"), e.get("default_values")
            if values is None:
                rows.append([problem_label(e["problem"]), "no feasible trial", "-", "-", "-"])
                continue
            first = objectives[0]
            if timed:
                best_cell = timing_cell(e.get("timing")) if e.get("timing") else us(values[first])
                default_cell = us(default[first]) if default else "-"
            else:
                best_cell = ", ".join(f"{k}={v:,.0f}" for k, v in values.items())
                default_cell = ", ".join(f"{k}={v:,.0f}" for k, v in default.items()) if default else "-"
            ratio = f"{default[first] / values[first]:.2f}x" if default and values[first] else "-"
            params = ", ".join(f"{k}={v}" for k, v in (e.get("params") or {}).items())
            rows.append([problem_label(e["problem"]), best_cell, default_cell, ratio, params])
        notes = [f"sweep bundle {directory.name}: {env_note(env)}; seed {env.get('seed')}"]
        if timed:
            notes.append("best: the best trial's median with its 95% bootstrap interval; default: the heuristic "
                         "config's median in the same sweep (a tuning figure, not an interleaved comparison)")
        tables.append(Table(f"{kernel}: best configs", columns, rows, notes))
    return tables


def benchmark_tables(doc: dict, name: str) -> list[Table]:
    env = doc.get("env", {})
    groups: dict[str, list[dict]] = {}
    for row in doc.get("rows", []):
        groups.setdefault(row.get("section", doc.get("benchmark", name)), []).append(row)
    tables = []
    for section, rows in groups.items():
        has_flops = any(r.get("flops") for r in rows)
        columns = ["problem", "contender", "baseline (us) [95% CI]", "contender (us) [95% CI]",
                   "speed-up [95% CI]", "verdict"] + (["TFLOP/s"] if has_flops else []) + ["timer"]
        out = []
        baselines = set()
        for r in rows:
            c = r.get("comparison")
            if not c:
                out.append([r.get("label", "?"), "-", "-", "-", "-", "failed: " + "; ".join(r.get("errors", []))[:80]]
                           + (["-"] if has_flops else []) + ["-"])
                continue
            base = c["baseline"]
            baselines.add(f"{base} = {r.get('contenders', {}).get(base, {}).get('what', base)}")
            for contender, ratio in c["ratios"].items():
                t = c["timings"][contender]
                cells = [r.get("label", "?"), contender, timing_cell(c["timings"][base]), timing_cell(t),
                         ratio_cell(ratio), ratio["verdict"]]
                if has_flops:
                    cells.append(f"{r['flops'] / t['median_seconds'] / 1e12:.1f}" if r.get("flops") else "-")
                cells.append(t.get("timer", "?"))
                out.append(cells)
        notes = [f"{name}: {env_note(env)}",
                 ("interleaved rounds; medians with 95% bootstrap intervals; speed-up = baseline time / contender "
                  "time; win or loss only where the intervals do not overlap, else parity")]
        notes += [f"baseline {b}" for b in sorted(baselines)]
        if doc.get("read_bandwidth"):
            bw = doc["read_bandwidth"]
            nominal = bw.get("nominal_bytes_per_second")
            notes.append(f"read stream measured {bw['measured_bytes_per_second'] / 1e9:.0f} GB/s"
                         + (f", nominal {nominal / 1e9:.0f} GB/s" if nominal else ", nominal unknown"))
        tables.append(Table(f"{doc.get('benchmark', name)}: {section}", columns, out, notes))
    return tables


_LEGACY_NOTE = ("earlier host-timed protocol: contenders timed one after another, medians without intervals, "
                "so no ratio here is a verdict; to be re-measured")


def legacy_tables(doc: dict, name: str) -> list[Table]:
    env = doc.get("env", {})
    notes = [f"{name}: {env_note(env)}", _LEGACY_NOTE]
    if "rows" in doc and doc["rows"] and "xla_seconds" in doc["rows"][0]:
        rows = [[f"{r['m']}x{r['n']}x{r['k']}", us(r["xla_seconds"]), us(r["tuned_seconds"]),
                 f"{r['tuned_vs_xla']:.2f}x", "yes" if r.get("noisy") else ""] for r in doc["rows"]]
        return [Table("matmul (earlier protocol)", ["MxNxK", "xla (us)", "tuned (us)", "xla/tuned", "noisy"], rows,
                      notes)]
    if "layers" in doc:
        rows = []
        for r in doc["layers"]:
            q = r["problem"]
            layer = f"{q['h']}x{q['w']}x{q['c']}->{q['k']} {q['kh']}x{q['kw']}/s{q['stride']} g{q['groups']}"
            rows.append([r.get("network", ""), layer, us(r.get("lax_seconds")), r.get("best_algorithm") or "-",
                         us(r.get("best_seconds")), f"{r['best_vs_lax']:.2f}x" if "best_vs_lax" in r else "-"])
        return [Table("conv2d (earlier protocol)", ["network", "layer", "lax (us)", "best algorithm", "best (us)",
                                                   "lax/best"], rows, notes)]
    raise ValueError(f"{name}: not a sweep bundle or a benchmark JSON that `report` reads")


def load(path: str | pathlib.Path) -> list[Table]:
    """The tables of one bundle folder or benchmark JSON file."""
    p = pathlib.Path(path)
    if p.is_dir():
        if not (p / "best_configs.json").exists():
            raise ValueError(f"{p}: a folder, but not a sweep bundle (no best_configs.json)")
        return bundle_tables(p)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file or folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot be read as JSON ({e})") from None
    if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
        return benchmark_tables(doc, p.name)
    return legacy_tables(doc if isinstance(doc, dict) else {}, p.name)


# ---------------------------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------------------------


def _md(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
    lines += [""] + [f"> {n}" for n in t.notes]
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


def report(paths: Sequence[str | pathlib.Path], fmt: str = "md") -> str:
    """The tables of every bundle and benchmark JSON in ``paths``, rendered as ``fmt``."""
    return render([t for p in paths for t in load(p)], fmt)
