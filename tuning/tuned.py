"""The best-config cache: a JSON file the autotuner writes and every kernel reads at call time.

Entries are keyed by kernel name, problem (shapes, dtypes, ...), device kind and jax version,
so a config tuned on one machine is never silently used on another. The file lives at
``$TINYPALLAS_CACHE`` or ``~/.cache/tinypallas/best_configs.json``. It is read once per process
(and again whenever it changes on disk), so looking a config up costs a dict access.
``export`` / ``import_file`` move entries between machines (``EXPORT_FORMAT``); for one key the
faster measured config wins.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

import jax

from tuning import platform

_loaded: tuple[float, dict] | None = None  # (mtime, entries)
C = TypeVar("C")

# Temp files of a cache write that was killed before its rename are removed by the next write
# once they are this old (a younger one may belong to a write in progress in another process).
STALE_TEMP_SECONDS = 300
KEY_FIELDS = ("kernel", "problem", "device", "jax")


def cache_path() -> pathlib.Path:
    env = os.environ.get("TINYPALLAS_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "tinypallas" / "best_configs.json"


def cache_key(kernel: str, problem: dict, device: str | None = None, jax_version: str | None = None) -> str:
    return json.dumps(
        {
            "kernel": kernel,
            "problem": problem,
            "device": device or platform.device_kind(),
            "jax": jax_version or jax.__version__,
        },
        sort_keys=True,
    )


_FIX = ("delete the file (the kernels fall back to their heuristic configs) or restore it with "
        "`python -m autotune import FILE` from an export")


def validate_entries(entries, source: str, fix: str = _FIX) -> dict:
    """``entries`` if it has the cache's shape (``{key JSON: {"params": {...}, ...}}``), else a
    ValueError naming ``source``, what is wrong with it and ``fix``."""
    if not isinstance(entries, dict):
        raise ValueError(f"{source} holds a JSON {type(entries).__name__}, not the object of "  # noqa: TRY004
                         "best configs it should; " + fix)
    for key, entry in entries.items():
        try:
            fields = json.loads(key)
        except json.JSONDecodeError:
            fields = None
        if not isinstance(fields, dict) or not set(KEY_FIELDS) <= set(fields):
            raise ValueError(f"{source}: key {key[:80]!r} is not a cache key (JSON with "
                             f"{', '.join(KEY_FIELDS)}); " + fix)
        if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
            raise ValueError(f"{source}: entry {key[:80]!r} has no params object; " + fix)  # noqa: TRY004
    return entries


def load() -> dict:
    """All entries: ``{key: {"params": {...}, "seconds": float, ...}}``."""
    global _loaded
    path = cache_path()
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ValueError(f"best-config cache {path} cannot be read ({e}); set TINYPALLAS_CACHE to "
                         "a file path") from None
    if _loaded is None or _loaded[0] != mtime:
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"best-config cache {path} is not valid JSON ({e}); " + _FIX) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"best-config cache {path} cannot be read ({e}); " + _FIX) from None
        _loaded = (mtime, validate_entries(entries, f"best-config cache {path}"))
    return _loaded[1]


def lookup(kernel: str, problem: dict) -> dict | None:
    """The tuned params for this problem on this device and jax version, or ``None``."""
    entry = load().get(cache_key(kernel, problem))
    return None if entry is None else entry["params"]


def resolve(kernel: str, problem: dict, config: C | None, *, config_type: Callable[..., C],
            heuristic: Callable[[], C], accept: Callable[[C], bool] | None = None) -> C:
    """The config a kernel runs with: explicit ``config`` > tuned cache > ``heuristic()``.

    Every kernel's public op resolves its config here, so the rule is the same everywhere.
    config_type: the kernel's ``Config`` class; a cached entry becomes ``config_type(**params)``.
    accept: a cached config is used only if ``accept(cfg)`` (e.g. conv2d given ``algorithm=``
        takes a cached config only of that algorithm); otherwise the heuristic.
    """
    if config is not None:
        return config
    params = lookup(kernel, problem)
    if params is not None:
        cached = config_type(**params)
        if accept is None or accept(cached):
            return cached
    return heuristic()


def save_all(entries: dict) -> None:
    """Atomically replace the cache file's contents (a temp file renamed over it).

    The temp file is removed whatever stops the write (an error, Ctrl-C); temp files that a killed
    process left behind are swept here once they are ``STALE_TEMP_SECONDS`` old.
    """
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder of the best-config cache {path} ({e}); set "
                         "TINYPALLAS_CACHE to a writable file path") from None
    _sweep_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".best_configs.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _sweep_stale_temp_files(folder: pathlib.Path) -> None:
    cutoff = time.time() - STALE_TEMP_SECONDS
    for tmp in folder.glob(".best_configs.*.json"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:  # removed by another process meanwhile, or not ours to remove
            pass


def store(kernel: str, problem: dict, params: dict, **meta) -> None:
    """Record ``params`` as the best config for ``problem`` here (merging into the file)."""
    entries = dict(load())
    entries[cache_key(kernel, problem)] = {"params": params, **meta}
    save_all(entries)


def tuned_problems(kernel: str) -> list[tuple[dict, dict]]:
    """``(problem, params)`` of every entry for ``kernel`` on this device and jax version."""
    out = []
    for key, entry in load().items():
        k = json.loads(key)
        if k["kernel"] == kernel and k["device"] == platform.device_kind() and k["jax"] == jax.__version__:
            out.append((k["problem"], entry["params"]))
    return out


# ---------------------------------------------------------------------------------------------
# Moving entries between machines: ``python -m autotune export FILE`` / ``import FILE``
# ---------------------------------------------------------------------------------------------

EXPORT_FORMAT = "tinypallas-best-configs/1"


def export(path: str | os.PathLike, kernel: str | None = None) -> int:
    """Write the cache's entries (those of ``kernel`` only, if given) to ``path`` as
    ``{"format": EXPORT_FORMAT, "entries": {...}}``; returns how many were written."""
    entries = {key: e for key, e in load().items() if kernel is None or json.loads(key)["kernel"] == kernel}
    pathlib.Path(path).write_text(json.dumps({"format": EXPORT_FORMAT, "entries": entries}, indent=1, sort_keys=True))
    return len(entries)


def _measured(entry: dict) -> tuple[str, float] | None:
    """(objective, value) an entry was chosen by: what two entries for one key are compared on."""
    objective = entry.get("objective") or ("seconds" if "seconds" in entry else None)
    value = entry.get(objective) if objective else None
    return (objective, float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def merge_entries(current: dict, incoming: dict) -> tuple[dict, dict]:
    """Merge cache entries; for one key (kernel, problem, device kind, jax version) the faster
    measured config wins (entries without a comparable measurement: the incoming one).
    Returns (merged, counts of added/replaced/kept)."""
    merged = dict(current)
    counts = {"added": 0, "replaced": 0, "kept": 0}
    for key, entry in incoming.items():
        if key not in merged:
            merged[key] = entry
            counts["added"] += 1
            continue
        mine, theirs = _measured(merged[key]), _measured(entry)
        as_fast = bool(mine and theirs and mine[0] == theirs[0] and mine[1] <= theirs[1])
        if as_fast or merged[key] == entry:
            counts["kept"] += 1
        else:
            merged[key] = entry
            counts["replaced"] += 1
    return merged, counts


def import_file(path: str | os.PathLike) -> dict:
    """Merge a file written by ``export`` into the cache; the counts of added/replaced/kept entries.
    A file that is not such an export is a ValueError naming it and the fix."""
    path = pathlib.Path(path)
    fix = "re-export it with `python -m autotune export FILE`"
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT or "entries" not in doc:
        raise ValueError(f"{path} is not a file written by `python -m autotune export` "
                         f"(a JSON object with format {EXPORT_FORMAT!r} and entries)")
    merged, counts = merge_entries(load(), validate_entries(doc["entries"], str(path), fix))
    save_all(merged)
    return counts
