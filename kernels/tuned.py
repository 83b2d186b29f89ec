"""The best-config cache: a JSON file the autotuner writes and every kernel reads at call time.

Entries are keyed by kernel name, problem (shapes, dtypes, ...), device kind and jax version,
so a config tuned on one machine is never silently used on another. The file lives at
``$TINYPALLAS_CACHE`` or ``~/.cache/tinypallas/best_configs.json``. It is read once per process
(and again whenever it changes on disk), so looking a config up costs a dict access.
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

from kernels import platform

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
