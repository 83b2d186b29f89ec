"""Argument fuzzing of ``python -m autotune``: valid command lines, mutated.

Run as a child process (``python -m tests.autotune.cli_fuzz SEED COUNT WORKDIR``) so that a crash
or a hang ends that process, not the test run. It runs every case in-process through
``autotune.cli.main`` (one jax import for all of them), writes the index of the case it starts to
WORKDIR/current (so a signal names its case) and prints one JSON object per case: argv, exit
status, stderr, and whether it timed out. Sweeps always get ``--dry-run``: the battery is about
argument handling, and a valid mutated sweep would otherwise tune for hours.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import random
import signal
import sys

CASE_SECONDS = 60

SHAPES = {
    "matmul": "16x16x16", "int8": "dw:64x16x9", "conv2d": "1x8x8x8:8:3x3", "inverted_residual": "8x8x16:6:16",
    "w4a16": "1x64x64:g32", "swiglu": "1x64x64:g32", "rmsnorm": "4x64", "rope": "8x16",
    "flash_attention": "1x16x4x2x16", "decode_attention": "1x64x4x2x16",
}


def fixtures(work: pathlib.Path) -> dict:
    """Files and URLs the cases point to: good, damaged and impossible ones."""
    from tuning import tuned

    work.mkdir(parents=True, exist_ok=True)
    (work / "afile").write_text("x")
    (work / "adir").mkdir(exist_ok=True)
    (work / "corrupt.db").write_bytes(b"not a database" * 64)
    (work / "list.json").write_text("[1, 2, 3]")
    (work / "trunc.json").write_text('{"format": "tinypallas-best-configs/1", "entries": {"')
    key = tuned.cache_key("matmul", {"m": 16, "n": 16, "k": 16, "dtype": "float32"})
    good = {"format": tuned.EXPORT_FORMAT, "entries": {key: {"params": {"block_m": 16}, "seconds": 1e-3}}}
    (work / "good.json").write_text(json.dumps(good))
    (work / "noentries.json").write_text(json.dumps({"format": tuned.EXPORT_FORMAT}))
    (work / "badkeys.json").write_text(json.dumps({"format": tuned.EXPORT_FORMAT, "entries": {"k": {"params": {}}}}))
    (work / "badentries.json").write_text(json.dumps({"format": tuned.EXPORT_FORMAT, "entries": {key: [1]}}))
    (work / "model.tflite").write_bytes(b"TFL3" + bytes(64))
    storage = f"sqlite:///{work}/fuzz.db"
    _stored_study(storage)
    return {
        "storage": storage,
        "paths": [str(work / n) for n in ("afile", "adir", "corrupt.db", "list.json", "trunc.json", "good.json",
                                          "noentries.json", "badkeys.json", "badentries.json", "missing/x.json",
                                          "afile/x.json", "model.tflite", "out.json")] + ["", ".", "/"],
        "storages": [storage, "notaurl:/x", "sqlite:/x.db", f"sqlite:///{work}/afile/x.db", f"sqlite:///{work}/adir",
                     f"sqlite:///{work}/corrupt.db", "mysql://nobody@127.0.0.1:1/x", "http://x/y", "sqlite://",
                     "postgresql://nobody@127.0.0.1:1/x"],
    }


def _stored_study(storage: str) -> None:
    """A small finished study, so that list, plot and show have something to read."""
    from autotune import tuner
    from tuning.space import Knob, SearchSpace

    space = SearchSpace(kernel="fuzz", problem={"n": 1}, knobs=(Knob("a", (1, 2, 3, 4)),), violations=lambda p: [],
                        to_config=lambda p: p, measure=lambda p: {"seconds": 1e-3 * p["a"]}, default={"a": 2})
    tuner.tune(space, storage=storage, n_trials=5, seed=0, study_name="fuzz")


def base_cases(fx: dict) -> list[list[str]]:
    s = fx["storage"]
    cases = [["list", w] for w in ("kernels", "layers", "boards")] + [
        ["list", "studies", "--storage", s], ["show"], ["show", "--all-devices", "--format", "csv"],
        ["export", fx["paths"][12]], ["import", fx["paths"][5]], ["plot", "--storage", s, "-o", fx["paths"][1]],
        ["sweep", "--kernel", "conv2d", "--layer", "mobilenetv2", "--storage", s],
        ["sweep", "--kernel", "int8", "--layer", "kws01", "--storage", s],
        ["sweep", "--target", "stm32f746", "--model", fx["paths"][11], "--storage", s],
        ["sweep", "--storage", s, "--trials", "3", "--timeout", "10", "--seed", "1", "--workers", "2"],
    ]
    cases += [["sweep", "--kernel", k, "--shape", shape, "--storage", s] for k, shape in SHAPES.items()]
    return cases


# The issue's list of refusals, as fixed cases (each must be refused in one line).
def issue_cases(fx: dict) -> list[list[str]]:
    s, p = fx["storage"], fx["paths"]
    sweep = ["sweep", "--shape", "16x16x16", "--storage", s]
    return [
        ["sweep", "--storage", fx["storages"][3]], ["sweep", "--storage", "notaurl:/x"],
        ["sweep", "--storage", "sqlite:/x.db"], ["sweep", "--storage", fx["storages"][5]],
        ["import", p[4]], ["export", p[9]], ["import", p[6]], ["import", p[3]],
        ["import", p[7]], ["import", p[8]], ["sweep", "--target", "nosuchboard", "--model", p[11]],
        sweep + ["--trials", "0"], sweep + ["--trials", "-1"], sweep + ["--timeout", "-5"], sweep + ["--dtype", "int3"],
        ["sweep", "--shape", "1000000000x1000000000x1000000000", "--storage", s],
        ["plot", "--storage", s, "--study-name", "nope"],
    ]


def _values(fx: dict, rng: random.Random) -> list[str]:
    shapes = list(SHAPES.values()) + ["1000000000x1000000000x1000000000", "0x0x0", "-1x2x3", "1x", "x", "16",
                                      "1x2x3x4x5", "dw:0x1x1", "99999999999999999999x1x1", "1x4096x4096:g0",
                                      "1x64x64:q7", "1x16x3x2x16", "8x15", "1x8x8x8:8:3x3:s0", "1x8x8x8:8:3x3:zz"]
    words = ["0", "-1", "1", "3", "1e309", "nan", "inf", "-5", "999999999999999999999", "", " ", "x", "ü", "--",
             "-", "float32", "int3", "int8", "bfloat16", "stm32f746", "nosuchboard", "mobilenetv2", "kws01", "vgg",
             "matmul", "conv2d", "mcu", "swiglu", "kernels", "studies", "table", "json", "xml", "a" * 300,
             "bad name!", "--help"]
    return words + shapes + fx["paths"] + fx["storages"] + [str(rng.randint(-10**6, 10**6))]


OPTIONS = {
    "sweep": ["--kernel", "--shape", "--layer", "--dtype", "--target", "--board", "--model", "--trials", "--timeout",
              "--storage", "--seed", "--study-name", "--results", "--workers", "--no-warm-start", "--no-progress",
              "--debug", "--worker-index"],
    "list": ["--storage", "--format"], "show": ["--kernel", "--all-devices", "--format"],
    "plot": ["--storage", "--study-name", "-o", "--output"], "export": ["--kernel"], "import": [],
}
ALL_OPTIONS = sorted({o for opts in OPTIONS.values() for o in opts}) + ["--bogus"]


def mutate(argv: list[str], fx: dict, rng: random.Random) -> list[str]:
    """1-3 mutations, mostly of option values (which reach the checks past argparse), sometimes of
    the structure (tokens dropped, added, swapped, another command)."""
    argv = list(argv)
    values = _values(fx, rng)
    for _ in range(rng.randint(1, 3)):
        valued = [i for i in range(len(argv) - 1) if argv[i].startswith("-") and not argv[i + 1].startswith("--")]
        op = rng.choices(range(7), weights=(45, 20, 8, 8, 7, 7, 5))[0]
        i = rng.randrange(len(argv) + 1)
        if op == 0 and valued:
            argv[rng.choice(valued) + 1] = rng.choice(values)
        elif op == 1:  # mostly an option of the command, valued at random
            own = OPTIONS.get(argv[0] if argv else "", [])
            option = rng.choice(own if own and rng.random() < 0.8 else ALL_OPTIONS)
            argv[i if argv and i > 0 else len(argv):i if argv and i > 0 else len(argv)] = [option, rng.choice(values)]
        elif op == 2 and argv:
            del argv[min(i, len(argv) - 1)]
        elif op == 3:
            argv.insert(i, rng.choice(values + ALL_OPTIONS))
        elif op == 4 and argv:
            argv[min(i, len(argv) - 1)] = rng.choice(values)
        elif op == 5 and len(argv) > 1:
            j, k = rng.sample(range(len(argv)), 2)
            argv[j], argv[k] = argv[k], argv[j]
        elif op == 6 and argv:
            argv[0] = rng.choice(["sweep", "list", "show", "plot", "export", "import"])
    return argv


def cases(seed: int, count: int, fx: dict) -> list[list[str]]:
    rng = random.Random(seed)
    bases = base_cases(fx)
    out = [[]] + bases + issue_cases(fx)
    while len(out) < count:
        out.append(mutate(rng.choice(bases), fx, rng))
    return out


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def run_case(argv: list[str]) -> dict:
    from autotune import cli


    if "sweep" in argv and "--dry-run" not in argv:
        argv = argv + ["--dry-run"]
    stdout, stderr = io.StringIO(), io.StringIO()
    hung = False
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                rc = cli.main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
    except _Hang:
        rc, hung = None, True
    finally:
        signal.alarm(0)
    return {"argv": argv, "rc": rc, "stderr": stderr.getvalue()[-2000:], "stdout_tail": stdout.getvalue()[-300:],
            "hung": hung}


def main() -> None:
    seed, count, work = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
    fx = fixtures(work)
    os.chdir(work)
    signal.signal(signal.SIGALRM, _alarm)
    for i, argv in enumerate(cases(seed, count, fx)):
        (work / "current").write_text(json.dumps({"index": i, "argv": argv}))
        print(json.dumps(run_case(argv)), flush=True)


if __name__ == "__main__":
    main()
