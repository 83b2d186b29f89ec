"""The cmsis-nn backend's link to a CMSIS-NN checkout (``$CMSIS_NN_ROOT``): static libraries
built per toolchain, and the scratch-buffer sizes its ``*_get_buffer_size_dsp`` functions give
for Cortex-M (computed by a small host program, since they differ from the host's own sizes).
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

ENV = "CMSIS_NN_ROOT"


def root() -> pathlib.Path:
    value = os.environ.get(ENV)
    if not value:
        raise ValueError(
            f"the cmsis-nn backend needs a CMSIS-NN checkout: set {ENV} to the directory that holds "
            "Include/arm_nnfunctions.h and Source/ (github.com/ARM-software/CMSIS-NN)"
        )
    path = pathlib.Path(value)
    if not (path / "Include" / "arm_nnfunctions.h").is_file():
        raise ValueError(f"{ENV}={value} has no Include/arm_nnfunctions.h; point it at a CMSIS-NN checkout")
    return path


def include_dirs() -> list[str]:
    r = root()
    return [f"-I{r / 'Include'}", f"-I{r}"]


def _sources(r: pathlib.Path) -> list[pathlib.Path]:
    # int8/int16/int4 kernels and their support code; the float16 and language-binding files
    # need headers this backend does not use.
    return sorted(
        p for p in (r / "Source").rglob("*.c")
        if "Bindings" not in p.parts and "f16" not in p.name and "flt" not in p.name and "f32" not in p.name
    )


@functools.lru_cache(maxsize=8)
def _compiler_version(cc: str) -> str:
    proc = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else cc


def content_key(r: pathlib.Path) -> str:
    """SHA-256 of the checkout's sources and headers (paths and bytes): an updated checkout,
    wherever it lives, gets its own library and buffer sizes; the same content at another path
    reuses them."""
    digest = hashlib.sha256()
    for path in [*_sources(r), *sorted((r / "Include").rglob("*.h"))]:
        digest.update(str(path.relative_to(r)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def library(cc: str, cflags: list[str]) -> pathlib.Path:
    """``libcmsis-nn.a`` built with ``cc`` and ``cflags``, cached by the checkout's content, the
    compiler (and its version) and the flags."""
    r = root()
    key = hashlib.sha256(f"{content_key(r)}|{cc}|{_compiler_version(cc)}|{' '.join(cflags)}".encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("TINYPALLAS_BUILD", tempfile.gettempdir())) / "tinypallas-cmsis-nn" / key
    lib = cache / "libcmsis-nn.a"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    objs = []
    for src in _sources(r):
        obj = cache / (src.stem + ".o")
        proc = subprocess.run([cc, *cflags, "-std=c99", "-O2", *include_dirs(), "-c", str(src), "-o", str(obj)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"building CMSIS-NN ({src.name}) with {cc} failed:\n{proc.stderr[-3000:]}")
        objs.append(str(obj))
    ar = "arm-none-eabi-ar" if "arm-none-eabi" in cc else "ar"
    tmp = cache / "libcmsis-nn.a.tmp"
    subprocess.run([shutil.which(ar) or ar, "rcs", str(tmp), *objs], check=True, capture_output=True)
    tmp.rename(lib)
    return lib


_SIZES: dict[tuple[str, str], int] = {}  # (library, probe) -> bytes: the probe program is compiled once


def buffer_sizes(calls: dict[int, str]) -> dict[int, int]:
    """Scratch bytes per op: ``calls`` maps op index -> a C expression list
    ``(host_expr, dsp_expr)`` joined by ``;``; the larger of the two is taken so one plan
    serves the host build and the Cortex-M build."""
    lib = str(library("gcc", []))
    known = {i: _SIZES[(lib, expr)] for i, expr in calls.items() if (lib, expr) in _SIZES}
    calls = {i: expr for i, expr in calls.items() if i not in known}
    if not calls:
        return known
    lines = [f'  printf("%d %d %d\\n", {i}, (int)({host}), (int)({dsp}));' for i, expr in calls.items()
             for host, dsp in [expr.split(";")]]
    program = "#include <stdio.h>\n#include \"arm_nnfunctions.h\"\nint main(void) {\n" + "\n".join(lines) + "\n  return 0;\n}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "sizes.c"
        src.write_text(program)
        exe = pathlib.Path(tmp) / "sizes"
        proc = subprocess.run(["gcc", "-std=c99", *include_dirs(), str(src), str(lib), "-o", str(exe)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"CMSIS-NN buffer-size probe failed to build:\n{proc.stderr[-3000:]}")
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    sizes = dict(known)
    for line in out.splitlines():
        i, host, dsp = (int(v) for v in line.split())
        sizes[i] = _SIZES[(lib, calls[i])] = max(host, dsp, 0)
    return sizes
