"""Build an exported model and run it: on the host (gcc, optionally ASan/UBSan) or as a
Cortex-M image (arm-none-eabi-gcc + board linker script) under qemu-system-arm with
semihosting, with executed instructions counted by a TCG plugin the project builds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

from mcu import cmsis_nn
from mcu.boards import Board

C_DIR = pathlib.Path(__file__).parent / "c"
PLUGIN_DIR = pathlib.Path(__file__).parent / "plugin"
APT_HINT = "apt-get install -y gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
EXIT_FAULT = 70  # startup.c's fault handler


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found on PATH; install it (Debian: {APT_HINT})")
    return path


def _run(cmd: list[str], what: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc


def _manifest(src: pathlib.Path) -> dict:
    """The build manifest ``mcu.codegen.export`` wrote: sources (relative to the folder), defines, libraries."""
    manifest = src / "build.json"
    if not manifest.is_file():
        raise ValueError(f"{src} has no build.json; export the model there first (python -m mcu export)")
    return json.loads(manifest.read_text())


def _uses_cmsis_nn(src: pathlib.Path) -> bool:
    return "cmsis-nn" in _manifest(src).get("libraries", [])


def _sources(src: pathlib.Path, host_flags: list[str] | None = None) -> list[str]:
    """The manifest's defines and sources; with ``host_flags``, each kernel library as its cached host object."""
    m = _manifest(src)
    out = [f"-D{d}" for d in m.get("defines", [])]
    for name in m.get("sources", ["model.c", "tp_kernels.c"]):
        path = src / name
        out.append(str(_kernel_object(path, host_flags)) if host_flags is not None and path.name == "tp_kernels.c"
                   else str(path))
    return out


def build_host(src_dir: str | pathlib.Path, sanitize: bool = False, opt: str = "-O2") -> pathlib.Path:
    """Compile model.c + kernels + harness with the system gcc; returns the executable."""
    src = pathlib.Path(src_dir)
    extra: list[str] = []
    if _uses_cmsis_nn(src):
        extra = [*cmsis_nn.include_dirs(), str(cmsis_nn.library("gcc", ["-fsanitize=address,undefined"] if sanitize else []))]
    exe = src / ("harness_host_san" if sanitize else "harness_host")
    flags = ["-std=c99", "-Wall", "-Wextra", "-Werror", opt, "-g" if sanitize else "-g0"]
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    _run(
        [require("gcc"), *flags, f"-I{src}", *_sources(src, flags), str(C_DIR / "harness.c"), *extra, "-o", str(exe),
         "-lm"],
        "host build",
    )
    return exe


def _kernel_object(source: pathlib.Path, flags: list[str]) -> pathlib.Path:
    """The host object of the kernel library, compiled once per content and flags (it is the same
    file in every export; only model.c differs)."""
    names = source.parent / "tp_names.h"  # a prefixed export's symbol names
    text = source.read_bytes() + (source.parent / "tp_kernels.h").read_bytes() + (names.read_bytes() if names.exists() else b"")
    key = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("TINYPALLAS_BUILD", tempfile.gettempdir())) / "tinypallas-objects"
    obj = cache / f"tp_kernels-{key}.o"
    if not obj.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"tp_kernels-{key}.{os.getpid()}.o"  # build aside, then rename: concurrent runs see a whole file
        _run([require("gcc"), *flags, "-c", str(source), "-o", str(tmp)], "host build of the kernels")
        tmp.replace(obj)
    return obj


def build_target(src_dir: str | pathlib.Path, board: Board, opt: str = "-O2", profile_layers: bool = False) -> pathlib.Path:
    """Cross-compile for ``board`` with its linker script; returns the ELF. ``profile_layers``
    compiles the per-layer markers in (a separate image: the marker calls add instructions)."""
    src = pathlib.Path(src_dir)
    ld = src / f"{board.name}.ld"
    ld.write_text(board.linker_script())
    elf = src / f"model_{board.name}{'_profile' if profile_layers else ''}.elf"
    extra: list[str] = ["-DTP_PROFILE_LAYERS"] if profile_layers else []
    if _uses_cmsis_nn(src):
        cc = require("arm-none-eabi-gcc")
        extra += [*cmsis_nn.include_dirs(), str(cmsis_nn.library(cc, [*board.cflags, "-ffunction-sections", "-fdata-sections"]))]
    _run(
        [require("arm-none-eabi-gcc"), *board.cflags, "-std=c99", "-Wall", "-Wextra", "-Werror", opt,
         "-ffunction-sections", "-fdata-sections", "--specs=nano.specs", "--specs=nosys.specs", "-nostartfiles",
         f"-T{ld}", "-Wl,--gc-sections", f"-I{src}", *_sources(src),
         str(C_DIR / "harness.c"), str(C_DIR / "startup.c"), *extra, "-o", str(elf), "-lm"],
        f"Cortex-M build for {board.name}",
    )
    return elf


def section_sizes(elf: str | pathlib.Path) -> dict[str, int]:
    """``text``/``data``/``bss`` bytes of an ELF (arm-none-eabi-size, Berkeley format)."""
    out = _run([require("arm-none-eabi-size"), str(elf)], "size").stdout.splitlines()[1].split()
    return {"text": int(out[0]), "data": int(out[1]), "bss": int(out[2])}


def build_plugin(out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Compile the instruction-counting TCG plugin with the system gcc."""
    out = pathlib.Path(out_dir or os.environ.get("TINYPALLAS_BUILD", "/tmp/tinypallas-mcu"))
    out.mkdir(parents=True, exist_ok=True)
    so = out / "libinsn_count.so"
    src = PLUGIN_DIR / "insn_count.c"
    if not so.exists() or so.stat().st_mtime < max(src.stat().st_mtime, (PLUGIN_DIR / "qemu_plugin_api.h").stat().st_mtime):
        tmp = out / f"libinsn_count.{os.getpid()}.so"  # build aside, then rename: concurrent runs see a whole file
        _run([require("gcc"), "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{PLUGIN_DIR}", str(src),
              "-o", str(tmp)], "plugin build")
        tmp.replace(so)
    return so


def _symbol(elf: pathlib.Path, name: str) -> int:
    for line in _run([require("arm-none-eabi-nm"), str(elf)], "nm").stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16) & ~1  # Thumb bit
    raise RuntimeError(f"symbol {name} not found in {elf}")


@dataclasses.dataclass
class RunResult:
    outputs: np.ndarray  # (count, output bytes) raw bytes
    instructions: list[int] | None  # per inference (QEMU only)
    layer_instructions: list[int] | None = None  # first inference, per Lowered.markers entry (profiled images)


def _write_inputs(work: pathlib.Path, inputs: np.ndarray) -> int:
    data = np.ascontiguousarray(inputs)
    (work / "inputs.bin").write_bytes(data.tobytes())
    out = work / "outputs.bin"
    if out.exists():
        out.unlink()
    return data.shape[0]


def _read_outputs(work: pathlib.Path, count: int) -> np.ndarray:
    raw = np.frombuffer((work / "outputs.bin").read_bytes(), dtype=np.uint8)
    if raw.size % count:
        raise RuntimeError(f"outputs.bin has {raw.size} bytes, not a multiple of {count} inferences")
    return raw.reshape(count, -1)


def run_host(exe: str | pathlib.Path, inputs: np.ndarray, timeout: float = 300) -> RunResult:
    """Run the host harness on ``inputs`` (count, ...) and return the raw output bytes."""
    exe = pathlib.Path(exe)
    work = exe.parent
    count = _write_inputs(work, inputs)
    try:
        _run([str(exe), str(work / "inputs.bin"), str(work / "outputs.bin")], f"host run of {exe.name}", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"host run of {exe} did not finish in {timeout} s (hang?)") from None
    return RunResult(_read_outputs(work, count), None)


def run_qemu(elf: str | pathlib.Path, board: Board, inputs: np.ndarray, count_instructions: bool = True,
             timeout: float = 300) -> RunResult:
    """Run the Cortex-M image under qemu-system-arm with semihosting; count instructions."""
    elf = pathlib.Path(elf)
    work = elf.parent
    count = _write_inputs(work, inputs)
    cmd = [require("qemu-system-arm"), "-M", board.qemu_machine, "-nographic", "-monitor", "none", "-serial", "none",
           "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]
    counts_file = work / "instructions.txt"
    marks_file = work / "layer_marks.txt"
    profiled = elf.name.endswith("_profile.elf")
    if count_instructions:
        plugin = build_plugin()
        begin, end = _symbol(elf, "tp_marker_begin"), _symbol(elf, "tp_marker_end")
        for f in (counts_file, marks_file):
            if f.exists():
                f.unlink()
        spec = f"{plugin},begin={begin:#x},end={end:#x},out={counts_file}"
        if profiled:
            spec += f",mark={_symbol(elf, 'tp_layer_marker'):#x},marks={marks_file}"
        cmd += ["-plugin", spec]
    try:
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"QEMU run of {elf.name} on {board.qemu_machine} did not finish in {timeout} s: the program hangs "
            "(or the timeout is too short for this model)"
        ) from None
    if proc.returncode == EXIT_FAULT:
        raise RuntimeError(f"{elf.name} faulted on {board.qemu_machine}: {proc.stdout.strip()} {proc.stderr.strip()}")
    if proc.returncode != 0:
        raise RuntimeError(f"{elf.name} exited with {proc.returncode} under QEMU: {proc.stdout}{proc.stderr}")
    instructions = None
    if count_instructions:
        instructions = [int(v) for v in counts_file.read_text().split()]
        if len(instructions) != count:
            raise RuntimeError(f"instruction counter saw {len(instructions)} inferences, expected {count}")
    layers = None
    if count_instructions and profiled:
        marks = [int(v) for v in marks_file.read_text().split()]
        per_inference = len(marks) // count
        # the first entry also counts copying the input in, the last copying the output out
        first = [0, *marks[1:per_inference], instructions[0]]
        layers = [b - a for a, b in itertools.pairwise(first)]
    return RunResult(_read_outputs(work, count), instructions, layers)
