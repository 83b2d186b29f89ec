"""Every command line fails in one line: each mistake is ``error: ...`` naming the problem and the
fix, exit status 2, no traceback (``--debug`` shows it). Argument fuzzing of all four CLIs
(``autotune``, ``mcu``, ``models.diff``, ``models.llama``, through ``tests.cli_fuzz``): every command
line ends in exit 0 (or 1 for a model that does not fit the board), or exit 2 with one ``error:``
line; never a traceback, a hang or a signal. A quick battery runs in the default suite, a long one
under -m slow."""
import json
import os
import re
import subprocess
import sys

import pytest

from mcu import __main__ as mcu_cli
from models import diff
from tests.cli_fuzz import PROFILES
from tests.conftest import REPO

KWS = "mlperf_tiny_kws01_dscnn_int8"


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "text.tflite").write_text("not a model\n" * 10)
    (tmp_path / "folder.tflite").mkdir()
    return tmp_path


@pytest.mark.parametrize("argv, expected", [
    (["export", "{tmp}/missing.tflite", "-o", "{tmp}/out"], r"missing\.tflite: no such file; check the path"),
    (["export", "{tmp}/folder.tflite", "-o", "{tmp}/out"], r"folder\.tflite is a folder; pass a file in it"),
    (["export", "{tmp}/text.tflite", "-o", "{tmp}/out"], r"not the TFLite file identifier"),
    (["export", "{model}", "-o", "{tmp}/afile"], r"afile is an existing file; name a folder"),
    (["export", "{model}", "-o", "{tmp}/afile/sub"], r"afile is a file, not a folder; choose another output folder"),
    (["export", "{model}", "-o", "/proc/tinypallas/out"], r"cannot write to /proc/tinypallas/out: .*choose another"),
    (["export", "{model}", "--board", "esp32", "-o", "{tmp}/out"], r"invalid choice: 'esp32' \(choose from .*stm32f746"),
    (["export", "{model}", "--backend", "nope", "-o", "{tmp}/out"], r"'nope' is not available; choose one of: portable"),
    (["export", "{model}", "--backend", "cmsis-nn", "-o", "{tmp}/out"], r"set CMSIS_NN_ROOT to"),
    (["export", "{model}", "--patch", "7", "-o", "{tmp}/out"], r"--patch '7': expected SPLIT,GRID"),
    ([], r"required: command"),
])
def test_mcu_export_mistakes_are_one_line(argv, expected, files, model_path, capsys, monkeypatch):
    monkeypatch.delenv("CMSIS_NN_ROOT", raising=False)
    argv = [a.format(tmp=files, model=model_path(KWS)) for a in argv]
    assert mcu_cli.main(argv) == 2
    assert re.search(expected, _one_error(capsys))
    assert not (files / "out").exists()  # refused before anything is written


def test_mcu_export_debug_shows_the_traceback(files, capsys):
    assert mcu_cli.main(["export", str(files / "text.tflite"), "-o", str(files / "out"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_mcu_export_creates_missing_parent_folders(files, model_path, capsys):
    out = files / "new" / "deep" / "out"
    assert mcu_cli.main(["export", str(model_path(KWS)), "-o", str(out)]) == 0
    assert (out / "model.c").is_file()


@pytest.mark.parametrize("argv, expected", [
    (["{tmp}/missing.tflite"], r"missing\.tflite: no such file"),
    (["{tmp}/folder.tflite"], r"is a folder"),
    (["{tmp}/text.tflite"], r"not the TFLite file identifier"),
    (["{tmp}/afile"], r"too short for a \.tflite"),
    (["{model}", "--seed", "-1"], r"--seed -1 is negative"),
])
def test_diff_mistakes_are_one_line(argv, expected, files, model_path, capsys):
    argv = [a.format(tmp=files, model=model_path(KWS)) for a in argv]
    assert diff.main(argv) == 2
    assert re.search(expected, _one_error(capsys))


def _battery(tmp_path, cli: str, seed: int, count: int, timeout: int) -> None:
    """Run ``count`` cases of ``tests.cli_fuzz`` for ``cli`` in a child process and check each answer."""
    env = {k: v for k, v in os.environ.items() if k != "CMSIS_NN_ROOT"}
    env.update(PYTHONPATH=str(REPO), TINYPALLAS_CACHE=str(tmp_path / "cache.json"))
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "tests.cli_fuzz", cli, str(seed), str(count), str(work)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        current = (work / "current").read_text() if (work / "current").exists() else "?"
        pytest.fail(f"the fuzz driver died with status {proc.returncode} in case {current}: {proc.stderr[-3000:]}")
    assert len(results) == count
    bad = []
    for r in results:
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        debug = "--debug" in r["argv"]  # asked for the traceback: it comes before the one error line
        one_error = len(lines[-1:] if debug else lines) == 1 and lines[-1].startswith("error: ")
        does_not_fit = PROFILES[cli].does_not_fit and lines and all(line.startswith("  does not fit: ")
                                                                    for line in lines)
        ok = not r["hung"] and (debug or "Traceback" not in r["stderr"]) and (
            r["rc"] == 0 or (r["rc"] == 2 and one_error) or (r["rc"] == 1 and does_not_fit))
        if not ok:
            bad.append(r)
    assert not bad, json.dumps(bad[:5], indent=1)
    refused = sum(r["rc"] == 2 for r in results)
    assert 0 < refused < count  # the battery reaches both the accepted and the refused paths


# Quick: seconds each, in the default suite; long: under -m slow.
QUICK = [("autotune", 300), ("mcu", 150), ("models.diff", 20), ("models.llama", 40)]
LONG = [("autotune", 3000), ("mcu", 1000), ("models.diff", 300), ("models.llama", 300)]


@pytest.mark.parametrize("cli, count", QUICK)
def test_cli_argument_fuzz_quick(tmp_path, cli, count):
    _battery(tmp_path, cli, seed=0, count=count, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("cli, count", LONG)
@pytest.mark.parametrize("seed", [1, 2])
def test_cli_argument_fuzz_long(tmp_path, cli, count, seed):
    _battery(tmp_path, cli, seed=seed, count=count, timeout=7200)


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """``python -m autotune list kernels | head -1``: no error line, exit status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "autotune", "list", "kernels"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()  # gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and not err.strip(), err
