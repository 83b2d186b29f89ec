"""The lecture's f32 matmul on the CPU, one optimization at a time, plus the machine's ceilings.

C (M, N) = A (M, K) @ B (K, N) as ``variant``:
  ijk      the textbook loop nest; the inner loop walks B down a column (a cache miss per element)
  ikj      reordered: the inner loop runs along rows of B and C (unit stride)
  tiled    ikj over tile_m x tile_k x tile_n blocks that stay in cache
  unrolled tiled, the inner loop unrolled by ``unroll``
  simd     tiled, a 4-row register tile of C accumulated in vector registers
The first four are compiled without auto-vectorization, so each step shows what it alone buys;
``threads`` splits rows of C. ``fma_peak`` is the program of the ceiling a compute-bound kernel is
judged against (independent vector FMA chains), timed by ``autotune.measure.peak_flops``;
``autotune.measure.read_bandwidth`` measures the memory one.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu import build
from kernels.llm import common
from tuning import tuned
from tuning.space import Knob, SearchSpace, parse_dims

VARIANTS = ("ijk", "ikj", "tiled", "unrolled", "simd")


@dataclasses.dataclass(frozen=True)
class Config:
    variant: str = "simd"
    tile_m: int = 64
    tile_n: int = 256
    tile_k: int = 128
    unroll: int = 4
    isa: str = "scalar"
    threads: int = 1

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not one of {VARIANTS}")
        if self.isa not in build.ISAS:
            raise ValueError(f"isa={self.isa!r} is not one of {build.ISAS}")
        if self.unroll not in (1, 2, 4, 8):
            raise ValueError(f"unroll={self.unroll} must be 1, 2, 4 or 8")
        if min(self.tile_m, self.tile_n, self.tile_k, self.threads) < 1:
            raise ValueError("tiles and threads must be >= 1")

    def params(self) -> dict:
        return common.params_of(self)


def reference(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def heuristic_config(m: int, n: int, k: int) -> Config:
    return Config(isa=build.best_isa(), threads=build.default_threads())


def problem_key(m: int, n: int, k: int) -> dict:
    return {"m": m, "n": n, "k": k, "cpu": build.cpu_name()}


def matmul(a: jax.Array, b: jax.Array, *, config: Config | None = None) -> jax.Array:
    """A (M, K) @ B (K, N) in f32 through the compiled lesson kernels."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"expected A (M, K) and B (K, N); got {a.shape} and {b.shape}")
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"the lesson matmul takes float32; got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    cfg = tuned.resolve("cpu_matmul", problem_key(m, n, k), config, config_type=Config,
                       heuristic=lambda: heuristic_config(m, n, k))
    return jax.ffi.ffi_call(build.target("matmul_f32", cfg.isa), jax.ShapeDtypeStruct((m, n), jnp.float32))(
        a, b, variant=np.int64(VARIANTS.index(cfg.variant)), tile_m=np.int64(cfg.tile_m),
        tile_n=np.int64(cfg.tile_n), tile_k=np.int64(cfg.tile_k), unroll=np.int64(cfg.unroll),
        threads=np.int64(cfg.threads))


def fma_peak(*, isa: str | None = None, threads: int | None = None,
             iterations: int = 2_000_000) -> tuple[Callable[[], jax.Array], float]:
    """(a call running ``threads`` threads of independent vector FMA chains, the flops it does):
    the multiply-add ceiling of this CPU as a program, for ``autotune.measure.peak_flops``."""
    isa, threads = isa or build.best_isa(), threads or build.default_threads()
    lib = build.library(isa)
    flops = 2.0 * iterations * lib.tp_peak_chains() * lib.tp_vector_lanes() * threads
    fn = jax.jit(lambda s: jax.ffi.ffi_call(build.target("fma_peak", isa), jax.ShapeDtypeStruct((1,), jnp.float32))(
        s, iterations=np.int64(iterations), threads=np.int64(threads)))
    seed = jnp.zeros((1,), jnp.float32)
    return (lambda: fn(seed)), flops


DEFAULT_PROBLEMS = [problem_key(512, 512, 512)]


def parse_shape(text: str) -> dict:
    """``MxNxK``, e.g. ``512x512x512``."""
    return problem_key(*parse_dims(text, "MxNxK", "512x512x512"))


def search_space(problem: dict) -> SearchSpace:
    m, n, k = problem["m"], problem["n"], problem["k"]

    def make_inputs(seed):
        ka, kb = jax.random.split(jax.random.key(seed))
        return jax.random.normal(ka, (m, k), jnp.float32), jax.random.normal(kb, (k, n), jnp.float32)

    def fn(cfg: Config):
        return functools.partial(matmul, config=cfg)

    threads = tuple(t for t in (1, 2, 4, 8, 16) if t <= build.default_threads())
    knobs = (Knob("variant", ("tiled", "unrolled", "simd")), Knob("tile_m", (16, 32, 64, 128)),
             Knob("tile_n", (64, 128, 256, 512)), Knob("tile_k", (32, 64, 128, 256)),
             Knob("unroll", (2, 4, 8), when={"variant": ("unrolled",)}),
             Knob("isa", build.supported_isas(), when={"variant": ("simd",)}), Knob("threads", threads))
    return SearchSpace(kernel="cpu_matmul", problem=problem, knobs=knobs, violations=lambda p: [],
                       to_config=lambda p: Config(**{**heuristic_config(m, n, k).params(), **p}), fn=fn,
                       make_inputs=make_inputs,
                       default=heuristic_config(m, n, k).params())
