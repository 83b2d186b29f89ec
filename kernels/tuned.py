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
from collections.abc import Callable
from typing import TypeVar

import jax

from kernels import platform

_loaded: tuple[float, dict] | None = None  # (mtime, entries)
C = TypeVar("C")


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


def load() -> dict:
    """All entries: ``{key: {"params": {...}, "seconds": float, ...}}``."""
    global _loaded
    path = cache_path()
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return {}
    if _loaded is None or _loaded[0] != mtime:
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"best-config cache {path} is not valid JSON ({e}); delete it or re-import it with "
                "`python -m autotune import FILE`"
            ) from None
        _loaded = (mtime, entries)
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
    """Atomically replace the cache file's contents."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".best_configs.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


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
