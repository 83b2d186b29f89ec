"""Argument fuzzing of ``python -m mcu`` and ``python -m models.diff``: valid command lines, mutated.

Run as a child process (``python -m tests.cli_fuzz CLI SEED COUNT WORKDIR``, CLI ``mcu`` or
``models.diff``) so that a crash or a hang ends that process, not the test run. Every case runs
in-process through the CLI's ``main`` (one jax import for all of them); the driver writes the case
it starts to WORKDIR/current (so a signal names its case) and prints one JSON object per case:
argv, exit status, stderr, and whether it timed out.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pathlib
import random
import signal
import sys

CASE_SECONDS = 120
STAND_INS = ("standin_fc_autoencoder_ad_int8", "standin_ds_cnn_kws_int8")


def fixtures(work: pathlib.Path) -> dict[str, list[str]]:
    """Models (good, damaged, not models at all) and output folders (good and impossible)."""
    from models import zoo

    work.mkdir(parents=True, exist_ok=True)
    good = [str(zoo.stand_in(name, work / "models")) for name in STAND_INS]
    data = pathlib.Path(good[0]).read_bytes()
    rng = random.Random(0)
    flipped = bytearray(data)
    for _ in range(8):
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
    bad = {"empty.tflite": b"", "short.tflite": b"TFL3", "gguf.tflite": b"GGUF" + bytes(64),
           "zeros.tflite": b"\x10\x00\x00\x00TFL3" + bytes(256), "half.tflite": data[: len(data) // 2],
           "head.tflite": data[:200], "flipped.tflite": bytes(flipped), "text.tflite": b"hello\n" * 40}
    for name, content in bad.items():
        (work / name).write_bytes(content)
    (work / "afile").write_text("x")
    (work / "adir.tflite").mkdir(exist_ok=True)
    models = good + [str(work / n) for n in bad] + [str(work / "afile"), str(work / "adir.tflite"),
                                                     str(work / "missing.tflite"), str(work / "afile" / "x.tflite"), ""]
    outputs = [str(work / "out"), str(work / "new" / "deep" / "out"), str(work / "afile"), str(work / "afile" / "sub"),
               str(work / "adir.tflite"), "/proc/tinypallas/out", "", "."]
    return {"good": good, "models": models, "outputs": outputs}


def base_cases(cli: str, fx: dict) -> list[list[str]]:
    good, out = fx["good"], fx["outputs"][0]
    if cli == "mcu":
        return [["export", good[0], "-o", out], ["export", good[1], "--board", "stm32l4r5", "-o", out],
                ["export", good[1], "--conv1x1", "direct", "--depthwise", "channel_in_place", "-o", out],
                ["export", good[1], "--patch", "3,2", "--no-in-place", "-o", out],
                ["export", good[0], "--min-sram", "--untuned", "--backend", "portable", "-o", out]]
    return [[good[0], "--xla"], [good[1], "--seed", "3"]]


def issue_cases(cli: str, fx: dict) -> list[list[str]]:
    """The refusals the CLIs must make in one line, as fixed cases."""
    work, good, out = pathlib.Path(fx["outputs"][0]).parent, fx["good"][0], fx["outputs"]
    missing, folder, corrupt = str(work / "missing.tflite"), str(work / "adir.tflite"), str(work / "half.tflite")
    if cli == "models.diff":
        return [[missing], [folder], [corrupt], [str(work / "gguf.tflite")], [good, "--seed", "-1"]]
    return [["export", missing, "-o", out[0]], ["export", folder, "-o", out[0]], ["export", corrupt, "-o", out[0]],
            ["export", good, "-o", out[2]], ["export", good, "-o", out[3]], ["export", good, "-o", out[5]],
            ["export", good, "--board", "esp32", "-o", out[0]], ["export", good, "--backend", "nope", "-o", out[0]],
            ["export", good, "--backend", "cmsis-nn", "-o", out[0]]]


OPTIONS = {"mcu": ["--board", "--backend", "--no-in-place", "--conv1x1", "--depthwise", "--patch", "--min-sram",
                   "--untuned", "-o", "--output", "--debug", "--bogus"],
           "models.diff": ["--seed", "--xla", "--debug", "--bogus"]}
WORDS = ["0", "-1", "1", "3", "7,4", "0,1", "-3,2", "99,4", "3,0", "3,99999999999", "a,b", ",", "1e309", "nan", "",
         " ", "x", "ü", "--", "-", "stm32f746", "stm32f446", "esp32", "portable", "cmsis-nn", "1x1", "direct",
         "overlap", "channel_in_place", "export", "--help", "a" * 300, str(2**64)]


def mutate(cli: str, argv: list[str], fx: dict, rng: random.Random) -> list[str]:
    """1-3 mutations: the model, an option's value, an option added, a token dropped, added, replaced
    or swapped."""
    argv = list(argv)
    values = WORDS + fx["models"] + fx["outputs"] + [str(rng.randint(-10**6, 10**6))]
    for _ in range(rng.randint(1, 3)):
        valued = [i for i in range(len(argv) - 1) if argv[i].startswith("-") and not argv[i + 1].startswith("--")]
        op = rng.choices(range(7), weights=(30, 25, 10, 10, 10, 5, 20))[0]
        i = rng.randrange(len(argv) + 1)
        models = [j for j, a in enumerate(argv) if a in fx["models"]]
        if op == 6 and models:
            argv[rng.choice(models)] = rng.choice(fx["models"])
        elif op == 0 and valued:
            argv[rng.choice(valued) + 1] = rng.choice(values)
        elif op == 1:
            argv[i:i] = [rng.choice(OPTIONS[cli]), rng.choice(values)]
        elif op == 2 and argv:
            del argv[min(i, len(argv) - 1)]
        elif op == 3:
            argv.insert(i, rng.choice(values + OPTIONS[cli]))
        elif op == 4 and argv:
            argv[min(i, len(argv) - 1)] = rng.choice(values)
        elif op == 5 and len(argv) > 1:
            j, k = rng.sample(range(len(argv)), 2)
            argv[j], argv[k] = argv[k], argv[j]
    # never write into the root folder or anywhere outside the work folder by accident
    return ["/proc/tinypallas/out" if a == "/" else a for a in argv]


def cases(cli: str, seed: int, count: int, fx: dict) -> list[list[str]]:
    rng = random.Random(seed)
    bases = base_cases(cli, fx)
    out = [[], ["--help"]] + bases + issue_cases(cli, fx)
    while len(out) < count:
        out.append(mutate(cli, rng.choice(bases), fx, rng))
    return out[:count]


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def run_case(main, argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    hung = False
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse's --help, and parse errors
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except _Hang:
        rc, hung = None, True
    finally:
        signal.alarm(0)
    return {"argv": argv, "rc": rc, "stderr": stderr.getvalue()[-2000:], "hung": hung}


def main() -> None:
    cli, seed, count, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
    fx = fixtures(work)
    os.chdir(work)  # a relative output folder lands in the work folder
    entry = importlib.import_module({"mcu": "mcu.__main__", "models.diff": "models.diff"}[cli]).main
    signal.signal(signal.SIGALRM, _alarm)
    for i, argv in enumerate(cases(cli, seed, count, fx)):
        (work / "current").write_text(json.dumps({"index": i, "argv": argv}))
        print(json.dumps(run_case(entry, argv)), flush=True)


if __name__ == "__main__":
    main()
