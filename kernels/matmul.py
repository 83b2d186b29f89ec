"""Tiled matrix multiplication in Pallas: ``C = epilogue(act(A @ B + bias))``.

The lecture's loop-nest techniques as knobs of one kernel:
- tiling: each program computes a ``block_m x block_n`` output tile, walking K in ``block_k`` steps;
- loop reordering: the order in which output tiles are assigned to programs (``order``): M-major
  (row by row), N-major (column by column), or grouped (``group_m`` rows of tiles at a time, so
  neighbouring programs share A and B tiles in L2);
- unrolling: ``unroll_k`` K-steps per loop iteration, written out in the body.

One portable body runs in Pallas interpret mode on the CPU and through the Triton lowering on
NVIDIA GPUs. On Hopper (H100/H200) a Mosaic GPU body (wgmma, TMA pipelining) lives beside it in
``kernels/matmul_mgpu.py`` and takes the same ``Config`` (``backend="mosaic"``).

Numerics: f32/bf16/f16 inputs accumulate in f32 (f32 x f32 dots use full precision, not tf32);
int8 x int8 accumulates in int32 exactly. The ``epilogue`` hook runs on the accumulator tile inside
the kernel: the int8 requantizing epilogue of the quantized-graph runtime plugs in there.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tuning import platform, tuned
from tuning.space import Knob, SearchSpace, parse_dims

ORDERS = ("m_major", "n_major", "grouped")
ACTIVATIONS = (None, "relu", "relu6", "gelu", "silu")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tunable knobs of the tiled matmul.

    block_m, block_n, block_k: tile sizes (powers of 2, >= 16 for the Triton dot).
    order: how output tiles map to programs: ``"m_major"``, ``"n_major"`` or ``"grouped"``.
    group_m: rows of tiles per group when ``order == "grouped"``.
    unroll_k: K-steps per loop iteration (the body is written out ``unroll_k`` times).
    num_warps, num_stages: Triton launch knobs (warps per program, software-pipelining depth);
        for ``backend="mosaic"``, ``num_stages`` is the TMA pipeline depth.
    backend: ``"portable"`` (interpret / Triton) or ``"mosaic"`` (Mosaic GPU wgmma, Hopper only).
    warpgroups: ``backend="mosaic"`` only: 1 (one warpgroup per block) or 2 (warp-specialised:
        a TMA producer and two wgmma consumers sharing the B tile).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    order: str = "grouped"
    group_m: int = 8
    unroll_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    backend: str = "portable"
    warpgroups: int = 1

    def params(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _accumulator_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.int32) if jnp.dtype(dtype) == jnp.int8 else jnp.dtype(jnp.float32)


def apply_activation(x, activation: str | None):
    if activation is None:
        return x
    if activation == "relu":
        return jnp.maximum(x, 0)
    if activation == "relu6":
        return jnp.clip(x, 0, 6)
    if activation == "gelu":
        return jax.nn.gelu(x, approximate=True)
    if activation == "silu":
        return x * jax.nn.sigmoid(x)
    raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")


def reference(a, b, *, bias=None, activation=None, out_dtype=None, epilogue=None, epilogue_operands=()):
    """The same function in plain ``jnp`` (XLA), computed with the kernel's accumulator type."""
    acc_dtype = _accumulator_dtype(a.dtype)
    acc = jnp.dot(a, b, preferred_element_type=acc_dtype, precision=lax.Precision.HIGHEST)
    if bias is not None:
        acc = acc + bias.astype(acc_dtype)[None, :]
    acc = apply_activation(acc, activation)
    if epilogue is not None:
        acc = epilogue(acc, *(op[None, :] for op in epilogue_operands))
    return acc.astype(_out_dtype(a.dtype, out_dtype))


def _out_dtype(in_dtype, out_dtype):
    if out_dtype is not None:
        return jnp.dtype(out_dtype)
    return jnp.dtype(jnp.int32) if jnp.dtype(in_dtype) == jnp.int8 else jnp.dtype(in_dtype)


# ---------------------------------------------------------------------------------------------
# Kernel body (portable: Pallas interpreter and Triton)
# ---------------------------------------------------------------------------------------------


def tile_coordinates(pid, *, num_m: int, num_n: int, order: str, group_m: int):
    """Map a program id to the (row, column) of the output tile it computes (loop order)."""
    if order == "m_major":
        return pid // num_n, pid % num_n
    if order == "n_major":
        return pid % num_m, pid // num_m
    # grouped: walk group_m rows of tiles column by column, then the next group of rows.
    tiles_per_group = group_m * num_n
    group = pid // tiles_per_group
    first_m = group * group_m
    rows_in_group = jnp.minimum(num_m - first_m, group_m)
    local = pid % tiles_per_group
    return first_m + local % rows_in_group, local // rows_in_group


def _matmul_body(a_ref, b_ref, *rest, block_k: int, num_k: int, unroll_k: int, acc_dtype,
                 has_bias: bool, activation, epilogue, num_operands: int):
    """One program: a (block_m, K) strip of A times a (K, block_n) strip of B -> one C tile."""
    bias_ref = rest[0] if has_bias else None
    operand_refs = rest[int(has_bias):int(has_bias) + num_operands]
    o_ref = rest[-1]
    block_m, block_n = o_ref.shape
    precision = lax.Precision.HIGHEST if a_ref.dtype == jnp.float32 else None

    def k_step(k, acc):
        a = a_ref[:, pl.ds(k * block_k, block_k)]
        b = b_ref[pl.ds(k * block_k, block_k), :]
        return acc + jnp.dot(a, b, preferred_element_type=acc_dtype, precision=precision)

    def unrolled_steps(i, acc):
        for u in range(unroll_k):
            acc = k_step(i * unroll_k + u, acc)
        return acc

    acc = jnp.zeros((block_m, block_n), acc_dtype)
    acc = lax.fori_loop(0, num_k // unroll_k, unrolled_steps, acc)
    for k in range(num_k - num_k % unroll_k, num_k):  # remainder steps, written out
        acc = k_step(k, acc)
    if has_bias:
        acc = acc + bias_ref[...].astype(acc_dtype)
    acc = apply_activation(acc, activation)
    if epilogue is not None:
        acc = epilogue(acc, *(r[...] for r in operand_refs))
    o_ref[...] = acc.astype(o_ref.dtype)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.partial(
    jax.jit,
    static_argnames=("config", "activation", "out_dtype", "epilogue", "interpret"),
)
def _matmul_portable(a, b, bias, epilogue_operands, *, config: Config, activation, out_dtype,
                     epilogue, interpret: bool):
    m, k = a.shape
    n = b.shape[1]
    cfg = config
    mp, np_, kp = _round_up(m, cfg.block_m), _round_up(n, cfg.block_n), _round_up(k, cfg.block_k)
    # Zero padding keeps the K sum exact; padded rows/columns of C are sliced off below.
    a = jnp.pad(a, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else a
    b = jnp.pad(b, ((0, kp - k), (0, np_ - n))) if (kp, np_) != (k, n) else b
    num_m, num_n, num_k = mp // cfg.block_m, np_ // cfg.block_n, kp // cfg.block_k

    coords = functools.partial(tile_coordinates, num_m=num_m, num_n=num_n, order=cfg.order,
                               group_m=cfg.group_m)

    def a_map(pid):
        return coords(pid)[0], 0

    def b_map(pid):
        return 0, coords(pid)[1]

    def c_map(pid):
        return coords(pid)

    def row_vector_map(pid):
        return 0, coords(pid)[1]

    row_vectors = ([] if bias is None else [bias]) + list(epilogue_operands)
    row_vectors = [jnp.pad(v, (0, np_ - n)).reshape(1, np_) for v in row_vectors]
    in_specs = [
        pl.BlockSpec((cfg.block_m, kp), a_map),
        pl.BlockSpec((kp, cfg.block_n), b_map),
    ] + [pl.BlockSpec((1, cfg.block_n), row_vector_map) for _ in row_vectors]

    compiler_params = platform.compiler_params(cfg.num_warps, cfg.num_stages, interpret)

    body = functools.partial(
        _matmul_body, block_k=cfg.block_k, num_k=num_k, unroll_k=cfg.unroll_k,
        acc_dtype=_accumulator_dtype(a.dtype), has_bias=bias is not None, activation=activation,
        epilogue=epilogue, num_operands=len(epilogue_operands),
    )
    c = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(num_m * num_n,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((cfg.block_m, cfg.block_n), c_map),
        interpret=interpret,
        compiler_params=compiler_params,
        name="tinypallas_matmul",
    )(a, b, *row_vectors)
    return c[:m, :n] if (mp, np_) != (m, n) else c


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _legal_tiles(dim: int) -> list[int]:
    return [t for t in (16, 32, 64, 128, 256) if dim % t == 0]


def config_violations(cfg: Config, m: int, n: int, k: int, dtype, *, exact_tiles: bool = False,
                      backend: str | None = None) -> list[str]:
    """Why ``cfg`` cannot run on an (m, k) x (k, n) problem; empty when it can.

    Checked without compiling: knob ranges, power-of-2 blocks >= 16 (Triton), the shared-memory
    budget of the software pipeline, and (``exact_tiles``) that tiles divide the shape.
    """
    backend = backend or platform.backend()
    problems = []
    if cfg.order not in ORDERS:
        problems.append(f"order={cfg.order!r} is not one of {ORDERS}")
    if cfg.backend not in ("portable", "mosaic"):
        problems.append(f"backend={cfg.backend!r} is not 'portable' or 'mosaic'")
    if cfg.backend == "mosaic":
        from kernels import matmul_mgpu

        if not (backend == "gpu" and platform.is_hopper()):
            problems.append("backend='mosaic' needs a Hopper GPU (H100/H200); use backend='portable'")
        problems += matmul_mgpu.violations(cfg, dtype)
    elif cfg.warpgroups != 1:
        problems.append(f"warpgroups={cfg.warpgroups} applies to backend='mosaic' only; use warpgroups=1")
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if not (_is_pow2(v) and v >= 16):
            problems.append(f"{name}={v} must be a power of 2 >= 16 (Triton tl.dot needs it)")
    if cfg.unroll_k < 1 or cfg.group_m < 1:
        problems.append(f"unroll_k={cfg.unroll_k} and group_m={cfg.group_m} must be >= 1")
    if exact_tiles:
        for name, dim, dim_name in (("block_m", m, "M"), ("block_n", n, "N"), ("block_k", k, "K")):
            v = getattr(cfg, name)
            if dim % v:
                legal = _legal_tiles(dim) or ["none: pad the operand or call with pad=True"]
                problems.append(f"{name}={v} does not divide {dim_name}={dim}; legal {name}: {legal}")
    itemsize = jnp.dtype(dtype).itemsize
    # Triton keeps num_stages + 1 buffers of the A and B tiles in flight (measured on H100).
    smem = (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * itemsize * (max(cfg.num_stages, 1) + 1)
    if backend == "gpu" and smem > platform.SHARED_MEMORY_BYTES:
        problems.append(
            f"tiles need {smem} B of shared memory ({cfg.num_stages} + 1 stages of "
            f"{cfg.block_m}x{cfg.block_k} + {cfg.block_k}x{cfg.block_n} {jnp.dtype(dtype).name}), over the "
            f"{platform.SHARED_MEMORY_BYTES} B budget; lower num_stages or block_k"
        )
    return problems


def problem_key(m: int, n: int, k: int, dtype) -> dict:
    return {"m": int(m), "n": int(n), "k": int(k), "dtype": jnp.dtype(dtype).name}


def heuristic_config(m: int, n: int, k: int, dtype, backend: str | None = None) -> Config:
    """A reasonable config without tuning."""
    backend = backend or platform.backend()

    def fit(dim, cap):
        return max(16, min(cap, pl.next_power_of_2(dim)))

    if backend != "gpu":
        # Interpreted: every grid step costs Python-level overhead, so use few, large tiles.
        return Config(block_m=fit(m, 128), block_n=fit(n, 128), block_k=fit(k, 128),
                      order="m_major", unroll_k=1)
    if platform.is_hopper() and jnp.dtype(dtype).itemsize == 2 and m >= 256 and n >= 128 and k >= 64:
        # Warp-specialised wgmma body: ~1.0x cuBLAS at 4096^3 and 8192^3 bf16 on an H100.
        return Config(block_m=128, block_n=128, block_k=64, order="grouped", group_m=8, num_stages=3,
                      backend="mosaic", warpgroups=2)
    if m <= 64:  # skinny (decode-like): stream B with wide K tiles
        return Config(block_m=fit(m, 64), block_n=fit(n, 64), block_k=fit(k, 256), order="n_major",
                      num_warps=4, num_stages=4)
    return Config(block_m=fit(m, 128), block_n=fit(n, 128), block_k=fit(k, 64), order="grouped",
                  group_m=8, num_warps=8 if jnp.dtype(dtype).itemsize <= 2 else 4, num_stages=3)


def check_bias_dtype(bias, accumulator, op: str, name: str = "bias") -> None:
    """Refuse a bias that would not survive the cast to the accumulator: a float bias for an integer
    kernel (0.7 would silently become 0), an integer one for a float kernel, a too-wide integer."""
    acc = jnp.dtype(accumulator)
    dtype = jnp.dtype(bias.dtype)
    if jnp.issubdtype(acc, jnp.integer):
        fits = jnp.issubdtype(dtype, jnp.integer) and jnp.can_cast(dtype, acc, casting="safe")
        hint = "quantize it first (bias scale = input scale * weight scale, zero point 0)"
    else:
        fits = jnp.issubdtype(dtype, jnp.floating)
        hint = "cast it to a float dtype"
    if not fits:
        raise ValueError(f"{op}: {name} is {dtype} but the kernel accumulates in {acc}; pass {name} as {acc} ({hint})")


def matmul(a, b, *, bias=None, activation: str | None = None, out_dtype=None,
           epilogue: Callable | None = None, epilogue_operands: Sequence = (),
           config: Config | None = None, pad: bool = True, interpret: bool | None = None):
    """``epilogue(activation(a @ b + bias), *epilogue_operands)`` as one Pallas kernel.

    a: (M, K), b: (K, N), both f32, bf16, f16 (f32 accumulation) or both int8 (int32 accumulation).
    bias: (N,), added to the accumulator. activation: None, "relu", "relu6", "gelu", "silu".
    epilogue: a jnp function of the (block_m, block_n) accumulator tile and one (1, block_n) tile
        of each (N,) array in ``epilogue_operands``; it runs inside the kernel before the store.
    out_dtype: defaults to a's dtype (int32 for int8 inputs).
    config: explicit knobs; ``None`` takes the tuned cache, else a heuristic.
    pad: shapes the tiles do not divide are zero-padded (the default). ``pad=False`` forces the
        tiles: a tile that does not divide its dimension is an error naming legal tiles.
    interpret: run the Pallas interpreter; defaults to True everywhere but on GPU.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul expects 2-D operands, got a{a.shape} and b{b.shape}; reshape batches to (M, K)")
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: a is {a.shape}, b is {b.shape} (a.shape[1] must equal b.shape[0])")
    if a.dtype != b.dtype:
        raise ValueError(f"a is {a.dtype} but b is {b.dtype}; cast both to one of float32, bfloat16, float16, int8")
    if a.dtype not in [jnp.dtype(d) for d in FLOAT_DTYPES] + [jnp.dtype(jnp.int8)]:
        raise ValueError(f"dtype {a.dtype} is not supported; use float32, bfloat16, float16 or int8")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},) to match b{b.shape}, got {bias.shape}")
        check_bias_dtype(bias, _accumulator_dtype(a.dtype), "matmul")
    epilogue_operands = tuple(jnp.asarray(op) for op in epilogue_operands)
    for i, op in enumerate(epilogue_operands):
        if op.shape != (n,):
            raise ValueError(f"epilogue_operands[{i}] must have shape ({n},), got {op.shape}")
    if epilogue_operands and epilogue is None:
        raise ValueError("epilogue_operands were given without an epilogue function")
    if 0 in (m, n, k):  # no tile to run: jnp.dot's answer (empty, or for K = 0 the epilogue of zeros)
        return reference(a, b, bias=bias, activation=activation, out_dtype=out_dtype, epilogue=epilogue,
                         epilogue_operands=epilogue_operands)

    if interpret is None:
        interpret = platform.interpret_default()
    cfg = tuned.resolve("matmul", problem_key(m, n, k, a.dtype), config, config_type=Config,
                        heuristic=lambda: heuristic_config(m, n, k, a.dtype))
    problems = config_violations(cfg, m, n, k, a.dtype, exact_tiles=not pad,
                                 backend="cpu" if interpret else "gpu")
    if problems:
        raise ValueError(f"matmul config {cfg} cannot run on ({m}x{k}) @ ({k}x{n}) {a.dtype}: " + "; ".join(problems))
    out_dtype = _out_dtype(a.dtype, out_dtype)
    if cfg.backend == "mosaic":
        from kernels import matmul_mgpu

        return matmul_mgpu.matmul(a, b, bias=bias, activation=activation, out_dtype=out_dtype,
                                  epilogue=epilogue, epilogue_operands=epilogue_operands, config=cfg)
    return _matmul_portable(a, b, bias, epilogue_operands, config=cfg, activation=activation,
                            out_dtype=out_dtype, epilogue=epilogue, interpret=interpret)


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------

DEFAULT_PROBLEMS = [
    problem_key(256, 256, 256, "float32"),
    problem_key(128, 512, 256, "float32"),
    problem_key(16, 512, 512, "float32"),
]

# LLaMA-2-7B projections (M = tokens in flight) and square GEMMs: what the GPU sweep tunes.
GPU_PROBLEMS = [problem_key(s, s, s, "bfloat16") for s in (1024, 2048, 4096, 8192)] + [
    problem_key(m, n, k, "bfloat16")
    for m in (1, 16, 128, 2048)
    for (k, n) in ((4096, 4096), (4096, 11008), (11008, 4096))
]


def parse_shape(text: str) -> dict:
    """``"MxNxK"`` (or one number for a square problem) -> problem dict (dtype float32)."""
    square = "x" not in text and text.strip().isdigit()
    dims = parse_dims(f"{text}x{text}x{text}" if square else text, "MxNxK", "128x4096x4096")
    return problem_key(*dims, "float32")


def search_space(problem: dict) -> SearchSpace:
    """Tiles, loop order, unroll and Triton knobs for one (M, N, K, dtype) problem."""
    m, n, k, dtype = problem["m"], problem["n"], problem["k"], problem["dtype"]
    on_gpu = platform.backend() == "gpu"

    def tiles(dim, cap):
        top = max(16, min(cap, pl.next_power_of_2(dim)))
        return tuple(t for t in (16, 32, 64, 128, 256) if t <= top)

    portable = {"backend": ("portable",)}
    knobs = []
    if on_gpu and platform.is_hopper() and dtype in ("bfloat16", "float16"):
        knobs += [Knob("backend", ("portable", "mosaic")), Knob("warpgroups", (1, 2), when={"backend": ("mosaic",)})]
    knobs += [
        Knob("block_m", tiles(m, 256)),
        Knob("block_n", tiles(n, 256)),
        Knob("block_k", tiles(k, 256)),
        Knob("order", ORDERS),
        Knob("group_m", (1, 4, 8, 16), when={"order": ("grouped",)}),
        Knob("unroll_k", (1, 2, 4), when=portable),
    ]
    if on_gpu:
        knobs += [Knob("num_warps", (2, 4, 8), when=portable), Knob("num_stages", (2, 3, 4, 5))]

    def violations(params: dict) -> list[str]:
        return config_violations(Config(**params), m, n, k, dtype)

    def make_inputs(seed):
        ka, kb = jax.random.split(jax.random.key(seed))
        if dtype == "int8":
            return (jax.random.randint(ka, (m, k), -128, 128, jnp.int8),
                    jax.random.randint(kb, (k, n), -128, 128, jnp.int8))
        return jax.random.normal(ka, (m, k), dtype), jax.random.normal(kb, (k, n), dtype)

    return SearchSpace(
        kernel="matmul",
        problem=problem,
        knobs=tuple(knobs),
        violations=violations,
        to_config=lambda params: Config(**params),
        fn=lambda cfg: functools.partial(matmul, config=cfg),
        make_inputs=make_inputs,
        default=heuristic_config(m, n, k, dtype).params(),
        interpreted=platform.interpret_default(),
    )


def flops(problem: dict) -> float:
    return 2.0 * problem["m"] * problem["n"] * problem["k"]

