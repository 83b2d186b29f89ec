"""Compile the C++ kernels in ``csrc/`` for one ISA at first use and register them with XLA's FFI.

The shared library is built with the system C++ compiler (``$CXX``, else ``g++``, else ``c++``)
against the FFI headers jaxlib ships (``jax.ffi.include_dir()``), and cached (``cache_dir``) by a
hash of the sources, the compiler's identity, the flags and the ISA: a second process loads it in
milliseconds.
Each handler is registered as ``tinypallas_<name>_<isa>``, so several ISA builds live side by side
(tests force the scalar and AVX2 bodies on a machine that also runs AVX-512).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import platform as host
import shutil
import subprocess
import tempfile
import threading

import jax

SOURCES = pathlib.Path(__file__).parent / "csrc"
# ISA name -> (compiler flags, preprocessor symbol). "native" bodies are chosen per ISA in csrc/qdot.h.
ISA_FLAGS = {
    "scalar": ([], "TP_ISA_SCALAR"),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], "TP_ISA_AVX2"),
    "avx512vnni": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
                   "TP_ISA_AVX512VNNI"),
    "neon": (["-march=armv8.2-a+dotprod"], "TP_ISA_NEON"),
}
ISAS = tuple(ISA_FLAGS)
COMMON_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno", "-pthread", "-w"]
HANDLERS = {  # registered name -> exported symbol
    "qmatmul": "TpQMatmul", "rmsnorm": "TpRmsnorm", "attention": "TpAttention", "matmul_f32": "TpMatmulF32",
    "fma_peak": "TpFmaPeak",
}

_lock = threading.Lock()
_registered: dict[str, ctypes.CDLL] = {}


class BuildError(RuntimeError):
    """The kernels cannot be compiled or loaded here (no compiler, unsupported ISA, ...)."""


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """ISAs whose bodies this CPU runs, slowest first (``scalar`` always)."""
    machine = host.machine().lower()
    flags = _cpu_flags()
    out = ["scalar"]
    if machine in ("x86_64", "amd64"):
        if {"avx2", "fma", "f16c"} <= flags:
            out.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"} <= flags:
            out.append("avx512vnni")
    elif machine in ("aarch64", "arm64") and ("asimddp" in flags or host.system() == "Darwin"):
        out.append("neon")  # every Apple arm64 core has dot products
    return tuple(out)


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (part of every CPU kernel's problem key: a config tuned on one CPU model
    is never used on another)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return host.processor() or host.machine()


def best_isa() -> str:
    return supported_isas()[-1]


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> pathlib.Path:
    """``$TINYPALLAS_KERNEL_CACHE``, else ``cpu_kernels/`` beside ``$TINYPALLAS_CACHE``, else under
    ``~/.cache/tinypallas``. Builds are named by content, so any number of processes may share one."""
    if os.environ.get("TINYPALLAS_KERNEL_CACHE"):
        return pathlib.Path(os.environ["TINYPALLAS_KERNEL_CACHE"])
    env = os.environ.get("TINYPALLAS_CACHE")
    base = pathlib.Path(env).parent if env else pathlib.Path.home() / ".cache" / "tinypallas"
    return base / "cpu_kernels"


@functools.cache
def _compiler_identity(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return cxx


def _command(cxx: str, isa: str, output: pathlib.Path) -> list[str]:
    flags, symbol = ISA_FLAGS[isa]
    return [cxx, *COMMON_FLAGS, *flags, f"-D{symbol}", "-isystem", jax.ffi.include_dir(), "-I", str(SOURCES),
            str(SOURCES / "kernels.cc"), "-o", str(output)]


def library_path(isa: str) -> pathlib.Path:
    """Where the library for ``isa`` lives (built or not): named by everything that shapes it."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set $CXX, or install g++: apt-get install g++)")
    digest = hashlib.sha256()
    for src in sorted(SOURCES.iterdir()):
        digest.update(src.name.encode() + src.read_bytes())
    digest.update(_compiler_identity(cxx).encode())
    digest.update(" ".join(_command(cxx, isa, pathlib.Path("out"))).encode())
    digest.update(jax.ffi.include_dir().encode())
    return cache_dir() / f"libtinypallas_cpu_{isa}_{digest.hexdigest()[:16]}.so"


def _compile(isa: str, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        cmd = _command(compiler(), isa, pathlib.Path(tmp))
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"compiling the {isa} CPU kernels failed to run: {e}") from None
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            raise BuildError(f"compiling the {isa} CPU kernels failed:\n{' '.join(cmd)}\n{tail}")
        os.replace(tmp, path)  # atomic: concurrent builders (pytest-xdist) never load a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def target(name: str, isa: str) -> str:
    """The FFI target name of handler ``name`` built for ``isa``, compiled and registered on first use."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown ISA {isa!r}; choose one of {ISAS}")
    if isa not in supported_isas():
        raise BuildError(f"this CPU ({host.machine()}) does not run the {isa} kernels; it runs {supported_isas()}")
    registered = f"tinypallas_{name}_{isa}"
    with _lock:
        if isa not in _registered:
            path = library_path(isa)
            if not path.exists():
                _compile(isa, path)
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise BuildError(f"loading {path} failed: {e}; delete it to rebuild") from None
            for handler, symbol in HANDLERS.items():
                jax.ffi.register_ffi_target(f"tinypallas_{handler}_{isa}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            _registered[isa] = lib
    return registered


def library(isa: str) -> ctypes.CDLL:
    """The loaded library for ``isa`` (for its plain C exports, e.g. ``tp_vector_lanes``)."""
    target("qmatmul", isa)
    return _registered[isa]


@functools.cache
def availability() -> str | None:
    """None when the kernels build and load here for the best ISA; else why not, in one line."""
    try:
        target("qmatmul", best_isa())
    except BuildError as e:
        return str(e).splitlines()[0]
    return None


_thread_limit: int | None = None


def default_threads() -> int:
    """One thread per core this process may run on (at most the ``thread_limit`` in force)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        cores = max(1, os.cpu_count() or 1)
    return cores if _thread_limit is None else min(cores, _thread_limit)


def cap_threads(threads: int) -> int:
    """A config's thread count under the ``thread_limit`` in force (what the kernel call runs)."""
    return threads if _thread_limit is None else max(1, min(threads, _thread_limit))


@contextlib.contextmanager
def thread_limit(threads: int):
    """Within the block, every CPU kernel traced runs on at most ``threads`` threads, tuned configs
    included, and heuristic configs assume that many cores (a benchmark at a peer's thread count).
    Read at trace time: a jitted function traced earlier keeps its threads (``jax.clear_caches()``)."""
    global _thread_limit
    if threads < 1:
        raise ValueError(f"thread_limit({threads}): need at least one thread")
    before, _thread_limit = _thread_limit, threads
    try:
        yield
    finally:
        _thread_limit = before
