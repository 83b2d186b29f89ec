"""What every LLM kernel module does the same way: config resolution and Triton compiler params."""
from __future__ import annotations

import dataclasses

from kernels import tuned


def resolve_config(kernel: str, problem: dict, config, config_cls, heuristic):
    """Explicit config > tuned cache > heuristic (the project-wide rule)."""
    if config is not None:
        return config
    params = tuned.lookup(kernel, problem)
    if params is not None:
        return config_cls(**params)
    return heuristic()


def params_of(config) -> dict:
    return dataclasses.asdict(config)


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (1 when n is odd)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b
