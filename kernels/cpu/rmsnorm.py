"""RMSNorm fused with the residual add on the CPU: h = x + residual; y = h / rms(h) * weight, one pass.

Same contract as ``kernels.llm.rmsnorm.reference`` (which is this op's reference): returns (y, h).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu import build
from kernels.llm import common
from kernels.llm.rmsnorm import reference
from tuning import tuned
from tuning.space import Knob, SearchSpace, parse_dims

__all__ = ["Config", "reference", "rmsnorm", "search_space"]


@dataclasses.dataclass(frozen=True)
class Config:
    """isa: the build the op runs in (the body is plain C++ the compiler vectorizes for it);
    threads: rows are split across threads when there are 16 or more."""

    isa: str = "scalar"
    threads: int = 1

    def __post_init__(self):
        if self.isa not in build.ISAS:
            raise ValueError(f"isa={self.isa!r} is not one of {build.ISAS}")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")

    def params(self) -> dict:
        return common.params_of(self)


def heuristic_config(rows: int, dim: int = 0) -> Config:
    # waking a second thread costs more than normalizing a few hundred rows of a small model
    return Config(isa=build.best_isa(), threads=build.default_threads() if rows * dim >= 2**20 else 1)


def problem_key(rows: int, dim: int) -> dict:
    return {"rows": rows, "dim": dim, "cpu": build.cpu_name()}


def rmsnorm(x: jax.Array, weight: jax.Array, *, eps: float, residual: jax.Array | None = None,
            config: Config | None = None):
    """(y, h) as ``reference``; float32 only."""
    dim = x.shape[-1]
    if x.dtype != jnp.float32:
        raise ValueError(f"the cpu rmsnorm takes float32; got {x.dtype}")
    if weight.shape != (dim,):
        raise ValueError(f"weight has shape {weight.shape}, expected ({dim},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {residual.shape} differs from x shape {x.shape}")
    x2 = x.reshape(-1, dim)
    r2 = jnp.zeros_like(x2) if residual is None else residual.reshape(-1, dim).astype(jnp.float32)
    cfg = tuned.resolve("cpu_rmsnorm", problem_key(x2.shape[0], dim), config, config_type=Config,
                       heuristic=lambda: heuristic_config(x2.shape[0], dim))
    out = jax.ShapeDtypeStruct(x2.shape, jnp.float32)
    y, h = jax.ffi.ffi_call(build.target("rmsnorm", cfg.isa), (out, out))(
        x2, r2, weight.astype(jnp.float32), eps=np.float32(eps), threads=np.int64(cfg.threads))
    return y.reshape(x.shape), h.reshape(x.shape)


DEFAULT_PROBLEMS = [problem_key(1, 576), problem_key(256, 576)]


def parse_shape(text: str) -> dict:
    """``ROWSxDIM``, e.g. ``1x576``."""
    return problem_key(*parse_dims(text, "ROWSxDIM", "1x576"))


def search_space(problem: dict) -> SearchSpace:
    rows, dim = problem["rows"], problem["dim"]

    def make_inputs(seed):
        kx, kr = jax.random.split(jax.random.key(seed))
        return (jax.random.normal(kx, (rows, dim), jnp.float32), jnp.ones((dim,), jnp.float32),
                jax.random.normal(kr, (rows, dim), jnp.float32))

    def fn(cfg: Config):
        return lambda x, weight, residual: rmsnorm(x, weight, eps=1e-5, residual=residual, config=cfg)

    threads = tuple(t for t in (1, 2, 4, 8, 16) if t <= build.default_threads())
    return SearchSpace(kernel="cpu_rmsnorm", problem=problem,
                       knobs=(Knob("isa", build.supported_isas()), Knob("threads", threads)),
                       violations=lambda p: [], to_config=lambda p: Config(**{**heuristic_config(rows, dim).params(), **p}),
                       fn=fn, make_inputs=make_inputs, default=heuristic_config(rows, dim).params())
