"""Argument fuzzing of ``python -m autotune``: every command line ends in exit 0, or exit 2 with one
``error:`` line; never a traceback, a hang or a signal. The quick battery runs in the default suite,
a long one under ``-m slow``."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _battery(tmp_path, seed: int, count: int, timeout: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TINYPALLAS_CACHE": str(tmp_path / "cache.json")}
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "tests.autotune.cli_fuzz", str(seed), str(count), str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        current = (work / "current").read_text() if (work / "current").exists() else "?"
        pytest.fail(f"the fuzz driver died with status {proc.returncode} in case {current}: {proc.stderr[-3000:]}")
    assert len(results) == count
    bad = []
    for r in results:
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        debug = "--debug" in r["argv"]  # asked for the traceback: it comes before the one error line
        ok = not r["hung"] and (debug or "Traceback" not in r["stderr"]) and (r["rc"] == 0 or (
            r["rc"] == 2 and len(lines[-1:] if debug else lines) == 1 and lines[-1].startswith("error: ")))
        if not ok:
            bad.append(r)
    assert not bad, json.dumps(bad[:5], indent=1)
    refused = sum(r["rc"] == 2 for r in results)
    assert 0 < refused < count  # the battery reaches both the accepted and the refused paths


def test_cli_argument_fuzz_quick(tmp_path):
    _battery(tmp_path, seed=0, count=300, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cli_argument_fuzz_long(tmp_path, seed):
    _battery(tmp_path, seed=seed, count=3000, timeout=3600)
