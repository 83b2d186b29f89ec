"""SwiGLU's input on the CPU: silu(x @ W_gate) * (x @ W_up), both packed weights in one call.

The body is the quantized matmul's (``kernels.cpu.qmatmul``), run over both weights tile by tile with
the gate applied before anything is written, so the (M, ffn) gate and up products never reach memory.
"""
from __future__ import annotations

from kernels.cpu.qmatmul import Config, parse_shape, problem_key, swiglu
from kernels.cpu.qmatmul import search_space as _qmatmul_space
from kernels.cpu.qmatmul import swiglu_reference as reference
from tuning.space import SearchSpace

__all__ = ["DEFAULT_PROBLEMS", "Config", "parse_shape", "reference", "search_space", "swiglu"]

# SmolLM2-135M: decode and a 256-token prefill of the MLP's gate/up projections.
DEFAULT_PROBLEMS = [problem_key(1, 1536, 576, "q4_1"), problem_key(256, 1536, 576, "q4_1")]


def search_space(problem: dict) -> SearchSpace:
    return _qmatmul_space(problem, kernel="cpu_swiglu")
