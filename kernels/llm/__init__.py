"""Fused Pallas kernels for LLaMA-style decoder inference: RMSNorm, RoPE, attention, W4A16 GEMV, SwiGLU.

Each module: a frozen ``Config``, a plain-``jnp`` ``reference``, the Pallas body, the public op and
``search_space`` for the autotuner. ``models.llama`` runs the references as its ``xla`` path.
"""
