"""Argument fuzzing of every command line: valid command lines, mutated.

Run as a child process (``python -m tests.cli_fuzz CLI SEED COUNT WORKDIR``, CLI one of ``PROFILES``:
``autotune``, ``mcu``, ``models.diff``, ``models.llama``) so that a crash or a hang ends that
process, not the test run. Every case runs in-process through the CLI's ``main`` (one jax import
for all of them); the driver writes the case it starts to WORKDIR/current (so a signal names its
case) and prints one JSON object per case: argv, exit status, stderr, and whether it timed out.

A ``Profile`` says what one CLI is fuzzed with: the files it is pointed at (good, damaged and
impossible ones), valid command lines to mutate, the refusals the issues listed as fixed cases,
its options and values, and ``prepare``, which keeps a case cheap without changing what it tests
(``autotune sweep`` gets ``--dry-run``; ``models.llama generate`` always names a model that is
refused, so nothing is decoded). ``tests/test_cli_errors.py`` runs the batteries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import pathlib
import random
import shutil
import signal
import sys
from collections.abc import Callable

CASE_SECONDS = 120
MUTATIONS = ("value", "option", "drop", "insert", "replace", "swap", "retarget")
NUMBERS = ["0", "-1", "1", "3", "1e309", "nan", "inf", "-5", "999999999999999999999", str(2**64)]
NOISE = ["", " ", "x", "ü", "--", "-", "--help", "a" * 300]


@dataclasses.dataclass(frozen=True)
class Profile:
    """How one command line is fuzzed.

    fixtures: ``work folder -> dict`` of what the cases point at (made once per run).
    bases: valid command lines, mutated 1-3 times each case.  issues: fixed refusals.
    options: ``command -> its options`` (``""``: a CLI without subcommands).
    values: ``(fixtures, rng) -> tokens`` an option's value or an inserted token is drawn from.
    retarget: the profile's own mutation (another command, another model file).
    weights: how often each of ``MUTATIONS`` is drawn.
    prepare: ``(argv, fixtures) -> argv`` run instead, e.g. with ``--dry-run``.
    does_not_fit: exit status 1 with only ``  does not fit: ...`` lines is an answer, not an error.
    """

    entry: str
    fixtures: Callable[[pathlib.Path], dict]
    bases: Callable[[dict], list[list[str]]]
    issues: Callable[[dict], list[list[str]]]
    options: dict[str, list[str]]
    values: Callable[[dict, random.Random], list[str]]
    retarget: Callable[[list[str], dict, random.Random], None]
    weights: tuple[int, ...]
    prepare: Callable[[list[str], dict], list[str]] = lambda argv, fx: argv
    does_not_fit: bool = False

    def all_options(self) -> list[str]:
        return sorted({o for opts in self.options.values() for o in opts}) + ["--bogus"]


# ---------------------------------------------------------------------------------------------
# python -m autotune
# ---------------------------------------------------------------------------------------------

SHAPES = {
    "matmul": "16x16x16", "int8": "dw:64x16x9", "conv2d": "1x8x8x8:8:3x3", "inverted_residual": "8x8x16:6:16",
    "w4a16": "1x64x64:g32", "swiglu": "1x64x64:g32", "rmsnorm": "4x64", "rope": "8x16",
    "flash_attention": "1x16x4x2x16", "decode_attention": "1x64x4x2x16",
}


def _autotune_fixtures(work: pathlib.Path) -> dict:
    from tuning import tuned

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
    # report reads copies of committed results (an -o mutated onto them overwrites only the copy)
    repo = pathlib.Path(__file__).resolve().parents[1]
    results = {name: json.loads((repo / "benchmarks" / "results" / name).read_text())
               for name in ("mcu.json", "llama_h100.json")}
    for name, doc in results.items():
        (work / name).write_text(json.dumps(doc))
    shutil.copytree(repo / "tests" / "data" / "bundle_matmul_cpu", work / "bundle", dirs_exist_ok=True)
    (work / "fft.json").write_text(json.dumps({"schema": "tinypallas-benchmark/2", "benchmark": "fft", "rows": []}))
    damaged = dict(results["mcu.json"], rows=[{"schedules": {"portable": {}}}])
    (work / "damaged_mcu.json").write_text(json.dumps(damaged))
    return {
        "storage": storage,
        "paths": [str(work / n) for n in ("afile", "adir", "corrupt.db", "list.json", "trunc.json", "good.json",
                                          "noentries.json", "badkeys.json", "badentries.json", "missing/x.json",
                                          "afile/x.json", "model.tflite", "out.json")] + ["", ".", "/"]
                 + [str(work / n) for n in ("mcu.json", "llama_h100.json", "bundle", "fft.json", "damaged_mcu.json")],
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


def _autotune_bases(fx: dict) -> list[list[str]]:
    s = fx["storage"]
    cases = [["list", w] for w in ("kernels", "layers", "boards")] + [
        ["list", "studies", "--storage", s], ["show"], ["show", "--all-devices", "--format", "csv"],
        ["export", fx["paths"][12]], ["import", fx["paths"][5]], ["plot", "--storage", s, "-o", fx["paths"][1]],
        ["sweep", "--kernel", "conv2d", "--layer", "mobilenetv2", "--storage", s],
        ["sweep", "--kernel", "int8", "--layer", "kws01", "--storage", s],
        ["sweep", "--target", "stm32f746", "--model", fx["paths"][11], "--storage", s],
        ["sweep", "--storage", s, "--trials", "3", "--timeout", "10", "--seed", "1", "--workers", "2"],
    ]
    mcu, llama, bundle = fx["paths"][16:19]
    cases += [["report", mcu], ["report", mcu, "--table", "mcu:summary", "--format", "latex"],
              ["report", bundle, llama, "--columns", "1,3", "--format", "csv"],
              ["report", mcu, "--table", "mcu:*", "--columns", "model,2", "-o", fx["paths"][12]]]
    return cases + [["sweep", "--kernel", k, "--shape", shape, "--storage", s] for k, shape in SHAPES.items()]


def _autotune_issues(fx: dict) -> list[list[str]]:
    s, p = fx["storage"], fx["paths"]
    sweep = ["sweep", "--shape", "16x16x16", "--storage", s]
    return [
        ["sweep", "--storage", fx["storages"][3]], ["sweep", "--storage", "notaurl:/x"],
        ["sweep", "--storage", "sqlite:/x.db"], ["sweep", "--storage", fx["storages"][5]],
        ["import", p[4]], ["export", p[9]], ["import", p[6]], ["import", p[3]],
        ["import", p[7]], ["import", p[8]], ["sweep", "--target", "nosuchboard", "--model", p[11]],
        sweep + ["--trials", "0"], sweep + ["--trials", "-1"], sweep + ["--timeout", "-5"], sweep + ["--dtype", "int3"],
        ["sweep", "--shape", "1000000000x1000000000x1000000000", "--storage", s],
        ["sweep", "--shape", "99999999999999999999x1x1", "--storage", s],
        ["plot", "--storage", s, "--study-name", "nope"],
        ["report", p[9]], ["report", p[3]], ["report", p[19]], ["report", p[20]], ["report", p[1]],
        ["report", p[16], "--table", "nope"], ["report", p[16], "--columns", "0"], ["report", p[16], "--columns", ","],
    ]


def _autotune_values(fx: dict, rng: random.Random) -> list[str]:
    shapes = list(SHAPES.values()) + ["1000000000x1000000000x1000000000", "0x0x0", "-1x2x3", "1x", "x", "16",
                                      "1x2x3x4x5", "dw:0x1x1", "99999999999999999999x1x1", "1x4096x4096:g0",
                                      "1x64x64:q7", "1x16x3x2x16", "8x15", "1x8x8x8:8:3x3:s0", "1x8x8x8:8:3x3:zz"]
    words = ["float32", "int3", "int8", "bfloat16", "stm32f746", "nosuchboard", "mobilenetv2", "kws01", "vgg",
             "matmul", "conv2d", "mcu", "swiglu", "kernels", "studies", "table", "json", "xml", "bad name!",
             "mcu:summary", "mcu:*", "llama:*", "*", "[", "1,2", "model,2", "99", "latex", "csv"]
    return NUMBERS + NOISE + words + shapes + fx["paths"] + fx["storages"] + [str(rng.randint(-10**6, 10**6))]


def _autotune_retarget(argv: list[str], fx: dict, rng: random.Random) -> None:
    if argv:
        argv[0] = rng.choice(["sweep", "list", "show", "plot", "export", "import", "report"])


def _autotune_prepare(argv: list[str], fx: dict) -> list[str]:
    # the battery is about argument handling: a valid mutated sweep would otherwise tune for hours
    return argv + ["--dry-run"] if "sweep" in argv and "--dry-run" not in argv else argv


AUTOTUNE = Profile(
    entry="autotune.cli", fixtures=_autotune_fixtures, bases=_autotune_bases, issues=_autotune_issues,
    options={"sweep": ["--kernel", "--shape", "--layer", "--dtype", "--target", "--board", "--model", "--trials",
                       "--timeout", "--storage", "--seed", "--study-name", "--results", "--workers", "--no-warm-start",
                       "--no-progress", "--debug", "--worker-index"],
             "list": ["--storage", "--format"], "show": ["--kernel", "--all-devices", "--format"],
             "plot": ["--storage", "--study-name", "-o", "--output"], "export": ["--kernel"], "import": [],
             "report": ["--format", "--table", "--columns", "-o", "--output"]},
    values=_autotune_values, retarget=_autotune_retarget, weights=(45, 20, 8, 8, 7, 7, 5), prepare=_autotune_prepare)


# ---------------------------------------------------------------------------------------------
# python -m mcu and python -m models.diff: .tflite models, good and damaged, and output folders
# ---------------------------------------------------------------------------------------------

STAND_INS = ("standin_fc_autoencoder_ad_int8", "standin_ds_cnn_kws_int8")


def _tflite_fixtures(work: pathlib.Path) -> dict:
    from models import zoo

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
    return {"work": str(work), "good": good, "models": models, "outputs": outputs}


def _tflite_values(fx: dict, rng: random.Random) -> list[str]:
    words = ["7,4", "0,1", "-3,2", "99,4", "3,0", "3,99999999999", "a,b", ",", "stm32f746", "stm32f446", "esp32",
             "portable", "cmsis-nn", "1x1", "direct", "overlap", "channel_in_place", "export"]
    return NUMBERS + NOISE + words + fx["models"] + fx["outputs"] + [str(rng.randint(-10**6, 10**6))]


def _another_model(argv: list[str], fx: dict, rng: random.Random) -> None:
    models = [j for j, a in enumerate(argv) if a in fx["models"]]
    if models:
        argv[rng.choice(models)] = rng.choice(fx["models"])


def _mcu_bases(fx: dict) -> list[list[str]]:
    good, out = fx["good"], fx["outputs"][0]
    return [["export", good[0], "-o", out], ["export", good[1], "--board", "stm32l4r5", "-o", out],
            ["export", good[1], "--conv1x1", "direct", "--depthwise", "channel_in_place", "-o", out],
            ["export", good[1], "--patch", "3,2", "--no-in-place", "-o", out],
            ["export", good[0], "--min-sram", "--untuned", "--backend", "portable", "-o", out]]


def _mcu_issues(fx: dict) -> list[list[str]]:
    work, good, out = pathlib.Path(fx["work"]), fx["good"][0], fx["outputs"]
    missing, folder, corrupt = str(work / "missing.tflite"), str(work / "adir.tflite"), str(work / "half.tflite")
    return [["export", missing, "-o", out[0]], ["export", folder, "-o", out[0]], ["export", corrupt, "-o", out[0]],
            ["export", good, "-o", out[2]], ["export", good, "-o", out[3]], ["export", good, "-o", out[5]],
            ["export", good, "--board", "esp32", "-o", out[0]], ["export", good, "--backend", "nope", "-o", out[0]],
            ["export", good, "--backend", "cmsis-nn", "-o", out[0]]]


def _diff_issues(fx: dict) -> list[list[str]]:
    work, good = pathlib.Path(fx["work"]), fx["good"][0]
    return [[str(work / "missing.tflite")], [str(work / "adir.tflite")], [str(work / "half.tflite")],
            [str(work / "gguf.tflite")], [good, "--seed", "-1"]]


MCU = Profile(
    entry="mcu.__main__", fixtures=_tflite_fixtures, bases=_mcu_bases, issues=_mcu_issues,
    options={"export": ["--board", "--backend", "--no-in-place", "--conv1x1", "--depthwise", "--patch", "--min-sram",
                        "--untuned", "--prefix", "-o", "--output", "--debug"]},
    values=_tflite_values, retarget=_another_model, weights=(30, 25, 10, 10, 10, 5, 20), does_not_fit=True)

DIFF = Profile(
    entry="models.diff", fixtures=_tflite_fixtures, bases=lambda fx: [[fx["good"][0], "--xla"],
                                                                       [fx["good"][1], "--seed", "3"]],
    issues=_diff_issues, options={"": ["--seed", "--xla", "--debug"]}, values=_tflite_values,
    retarget=_another_model, weights=(30, 25, 10, 10, 10, 5, 20))


# ---------------------------------------------------------------------------------------------
# python -m models.llama: argument checks and fit plans only (generate is given only models that are
# refused, so nothing decodes)
# ---------------------------------------------------------------------------------------------

def _llama_fixtures(work: pathlib.Path) -> dict:
    (work / "header.gguf").write_bytes(b"GGUF" + bytes(40))
    (work / "weights.bin").write_bytes(bytes(64))
    (work / "text.gguf").write_text("not a model\n" * 10)
    (work / "folder").mkdir(exist_ok=True)
    models = [str(work / n) for n in ("header.gguf", "weights.bin", "text.gguf", "folder", "missing.gguf")]
    return {"work": str(work), "models": models}


def _llama_bases(fx: dict) -> list[list[str]]:
    generate = ["generate", "--prompt", "hi", "--model", fx["models"][0]]
    return [generate, generate + ["--max-tokens", "4", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"],
            generate + ["--seed", "3", "--path", "xla", "--dtype", "bfloat16", "--no-chat"],
            ["generate", "--prompt", "a longer prompt", "--model", fx["models"][3], "--path", "pallas"],
            generate + ["--devices", "2", "--memory-gb", "0.05"],
            ["plan", "--config", "llama2-7b", "--format", "w4a16", "--devices", "2x2", "--batch", "8"],
            ["plan", "--model", fx["models"][0], "--context", "512"]]


def _llama_issues(fx: dict) -> list[list[str]]:
    generate = ["generate", "--prompt", "hi", "--model", fx["models"][0]]
    return [generate + ["--max-tokens", "0"], generate + ["--temperature", "nan"], generate + ["--top-p", "0"],
            generate + ["--top-k", "-1"], generate + ["--path", "gpu"], generate + ["--dtype", "int3"],
            ["generate", "--prompt", "hi", "--model", fx["models"][4]], ["generate", "--prompt", "", "--model",
                                                                         fx["models"][0]]]


def _llama_values(fx: dict, rng: random.Random) -> list[str]:
    words = ["0.5", "1.5", "-0.5", "auto", "xla", "pallas", "cpu", "gpu", "float32", "bfloat16", "int3", "generate",
             "plan", "hello world", "2x2", "3", "0x2", "llama2-7b", "llama2-70b", "w4a16", "bf16", "q9"]
    return NUMBERS + NOISE + words + fx["models"] + [str(rng.randint(-10**6, 10**6))]


def _llama_retarget(argv: list[str], fx: dict, rng: random.Random) -> None:
    _another_model(argv, fx, rng)


def _llama_prepare(argv: list[str], fx: dict) -> list[str]:
    # The last --model wins: where it is not one of the refused files, one is added, so that no
    # mutation makes the case load the bundled model and decode.
    last = max((i for i, a in enumerate(argv[:-1]) if a == "--model"), default=None)
    refused = last is not None and argv[last + 1] in fx["models"]
    return argv if refused or "generate" not in argv else argv + ["--model", fx["models"][0]]


LLAMA = Profile(
    entry="models.llama.__main__", fixtures=_llama_fixtures, bases=_llama_bases, issues=_llama_issues,
    options={"generate": ["--prompt", "--model", "--max-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                          "--path", "--dtype", "--no-chat", "--devices", "--memory-gb", "--debug"],
             "plan": ["--model", "--config", "--format", "--group", "--dtype", "--path", "--context", "--batch",
                      "--table", "--devices", "--memory-gb", "--debug"]},
    values=_llama_values, retarget=_llama_retarget, weights=(40, 20, 8, 8, 8, 6, 10), prepare=_llama_prepare)

PROFILES = {"autotune": AUTOTUNE, "mcu": MCU, "models.diff": DIFF, "models.llama": LLAMA}


# ---------------------------------------------------------------------------------------------
# Mutation and the driver
# ---------------------------------------------------------------------------------------------

def mutate(profile: Profile, argv: list[str], fx: dict, rng: random.Random) -> list[str]:
    """1-3 mutations, mostly of option values (which reach the checks past argparse), sometimes of
    the structure (tokens dropped, added, replaced, swapped) or the profile's own."""
    argv = list(argv)
    values = profile.values(fx, rng)
    for _ in range(rng.randint(1, 3)):
        valued = [i for i in range(len(argv) - 1) if argv[i].startswith("-") and not argv[i + 1].startswith("--")]
        op = rng.choices(MUTATIONS, weights=profile.weights)[0]
        i = rng.randrange(len(argv) + 1)
        if op == "value" and valued:
            argv[rng.choice(valued) + 1] = rng.choice(values)
        elif op == "option":  # mostly an option of the command, valued at random, after the command word
            own = profile.options.get(argv[0] if argv else "", profile.options.get("", []))
            option = rng.choice(own if own and rng.random() < 0.8 else profile.all_options())
            at = i if i > 0 else len(argv)
            argv[at:at] = [option, rng.choice(values)]
        elif op == "drop" and argv:
            del argv[min(i, len(argv) - 1)]
        elif op == "insert":
            argv.insert(i, rng.choice(values + profile.all_options()))
        elif op == "replace" and argv:
            argv[min(i, len(argv) - 1)] = rng.choice(values)
        elif op == "swap" and len(argv) > 1:
            j, k = rng.sample(range(len(argv)), 2)
            argv[j], argv[k] = argv[k], argv[j]
        elif op == "retarget":
            profile.retarget(argv, fx, rng)
    # never write into the root folder by accident
    return ["/proc/tinypallas/out" if a == "/" else a for a in argv]


def cases(profile: Profile, seed: int, count: int, fx: dict) -> list[list[str]]:
    rng = random.Random(seed)
    bases = profile.bases(fx)
    out = [[], ["--help"]] + bases + profile.issues(fx)
    while len(out) < count:
        out.append(mutate(profile, rng.choice(bases), fx, rng))
    return out[:count]


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def run_case(main: Callable[[list[str]], int], argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    hung = False
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                rc = main(argv)
            except SystemExit as e:  # a CLI whose main lets argparse exit
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except _Hang:
        rc, hung = None, True
    finally:
        signal.alarm(0)
    return {"argv": argv, "rc": rc, "stderr": stderr.getvalue()[-2000:], "stdout_tail": stdout.getvalue()[-300:],
            "hung": hung}


def main() -> None:
    name, seed, count, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
    profile = PROFILES[name]
    work.mkdir(parents=True, exist_ok=True)
    fx = profile.fixtures(work)
    os.chdir(work)  # a relative output folder lands in the work folder
    entry = importlib.import_module(profile.entry).main
    signal.signal(signal.SIGALRM, _alarm)
    for i, argv in enumerate(cases(profile, seed, count, fx)):
        argv = profile.prepare(argv, fx)
        (work / "current").write_text(json.dumps({"index": i, "argv": argv}))
        print(json.dumps(run_case(entry, argv)), flush=True)


if __name__ == "__main__":
    main()
