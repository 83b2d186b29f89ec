"""Compiled C++ kernels for the CPU (LLaMA decode and prefill), called from jitted JAX through XLA's FFI.

Same module shape as every kernel here (Config, reference, body, public op, search_space); the
bodies live in ``csrc/`` and are built per ISA at first use by ``build``.
"""
from kernels.cpu import attention, build, matmul, qmatmul, rmsnorm

__all__ = ["attention", "build", "matmul", "qmatmul", "rmsnorm"]
