"""``python -m autotune replay BUNDLE``: re-measure a sweep bundle's best configs here.

For each problem of the bundle, its kernel's search space is rebuilt from the problem, the best
params become a config again, and that config is timed by ``autotune.measure`` on this machine
(or, for spaces with their own ``measure``, e.g. MCU instruction counts, measured again). Old
and new are printed side by side with their 95% intervals: "consistent" where the intervals
overlap, otherwise which way it moved. A different device or an interpreted run is said.
"""
from __future__ import annotations

import json
import pathlib

from autotune import measure, registry
from autotune.report import Table, problem_label, timing_cell
from tuning import platform


def _intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def replay(bundle: str | pathlib.Path, *, repeats: int | None = None) -> tuple[Table, list[dict]]:
    """Re-measure every best config of ``bundle``; the comparison table and one record per problem."""
    directory = pathlib.Path(bundle)
    try:
        best = json.loads((directory / "best_configs.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory}: not a sweep bundle (no best_configs.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory}/best_configs.json cannot be read ({e})") from None
    env_path = directory / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    repeats = max(measure.MIN_ROUNDS, measure.default_repeats()[1]) if repeats is None else repeats
    notes = []
    here = platform.device_kind()
    if env.get("device_kind") and env["device_kind"] != here:
        notes.append(f"recorded on {env['device_kind']}, replayed on {here}: a different device")
    interpreted = bool(env.get("interpreted"))
    rows, records = [], []
    for entry in best:
        label = f"{entry['kernel']} {problem_label(entry['problem'])}"
        if entry.get("params") is None:
            rows.append([label, "-", "-", "-", "no feasible trial in the bundle"])
            continue
        space = registry.kernel_module(entry["kernel"]).search_space(entry["problem"])
        interpreted = interpreted or space.interpreted
        config = space.to_config(entry["params"])
        if space.measure is not None:
            new = dict(space.measure(config))
            old = entry.get("values") or {}
            same = all(abs(new[k] - v) <= 1e-9 * max(1.0, abs(v)) for k, v in old.items() if k in new)
            rows.append([label, ", ".join(f"{k}={v:,.0f}" for k, v in old.items()),
                         ", ".join(f"{k}={v:,.0f}" for k, v in new.items()), "-", "same" if same else "differs"])
            records.append({"kernel": entry["kernel"], "problem": entry["problem"], "old": old, "new": new,
                            "verdict": "same" if same else "differs"})
            continue
        timing = measure.time_space(space, config, repeats=repeats)
        old = entry.get("timing") or {"median_seconds": (entry.get("values") or {}).get("seconds")}
        new = timing.as_dict()
        if old.get("ci_low_seconds") is not None:
            consistent = _intervals_overlap((old["ci_low_seconds"], old["ci_high_seconds"]),
                                            (new["ci_low_seconds"], new["ci_high_seconds"]))
            verdict = "consistent" if consistent else (
                "faster here" if new["median_seconds"] < old["median_seconds"] else "slower here")
        else:
            verdict = "no old interval"
        ratio = old["median_seconds"] / new["median_seconds"] if old.get("median_seconds") else None
        rows.append([label, timing_cell(old), timing_cell(new), f"{ratio:.2f}x" if ratio else "-", verdict])
        records.append({"kernel": entry["kernel"], "problem": entry["problem"], "params": entry["params"],
                        "old": old, "new": new, "old_over_new": ratio, "verdict": verdict})
    if interpreted:
        notes.append("interpreted Pallas on at least one side: interpreter speed, not kernel speed")
    notes.append(f"new: {repeats} samples here; medians with 95% bootstrap intervals; old/new > 1: faster here")
    return Table(f"replay of {directory.name}", ["problem", "old (us) [95% CI]", "new (us) [95% CI]", "old/new",
                                                 "verdict"], rows, notes), records
