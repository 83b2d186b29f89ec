"""The shape of a LLaMA-architecture decoder: what a checkpoint's metadata tells us."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation: positions are divided by this
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Llama-3 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: tuple[float, float, float, float] | None = None
    # (n_heads, n_kv_heads) of the checkpoint when tensor parallelism padded the head counts with zero
    # heads (``models.llama.sharding.padded_config``); the head size stays the checkpoint's.
    unpadded_heads: tuple[int, int] | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // (self.n_heads if self.unpadded_heads is None else self.unpadded_heads[0])

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dim % (self.n_heads if self.unpadded_heads is None else self.unpadded_heads[0]):
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")


def tiny(**overrides) -> LlamaConfig:
    """A small config for tests (GQA 4/2 heads, Pallas-friendly power-of-2 sizes)."""
    base = {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
            "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 64, "tie_embeddings": False}
    return LlamaConfig(**{**base, **overrides})


LLAMA2_7B = LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
# Meta's published configs (params.json of Llama-2-13b and Llama-2-70b; 70B's ffn_dim follows from its
# ffn_dim_multiplier 1.3 and multiple_of 4096).
LLAMA2_13B = LlamaConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                         norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
LLAMA2_70B = LlamaConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                         norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
