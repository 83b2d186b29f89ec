"""Load a Hugging Face ``LlamaForCausalLM`` checkpoint folder (config.json + *.safetensors).

Weights load as dense arrays in ``dtype``, or group-quantized to 4/8 bits on the way in
(``bits=4``) one tensor at a time, so the full-precision model is never resident at once.
"""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np

from kernels.llm.w4a16 import quantize
from models.llama.config import LlamaConfig
from models.llama.params import fuse_qkv, matrix_shapes

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}


def config_from_hf(hf: dict) -> LlamaConfig:
    archs = hf.get("architectures") or [hf.get("model_type")]
    if not any(a in ("LlamaForCausalLM", "llama") for a in archs):
        raise ValueError(f"unsupported architecture {archs}; this loader reads LlamaForCausalLM checkpoints")
    # transformers < 5 writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"RoPE scaling {kind!r} is not supported (default, linear and llama3 are)")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    llama3 = None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(not isinstance(rope.get(k), (int, float)) for k in keys):
            raise ValueError(f"llama3 RoPE scaling needs numeric {', '.join(keys)}; config.json has {rope}")
        llama3 = tuple(float(rope[k]) for k in keys)
        if llama3[2] <= llama3[1] or min(llama3) <= 0:
            raise ValueError(f"llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor; got {rope}")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // n_heads) != hf["hidden_size"] // n_heads:
        raise ValueError("head_dim != hidden_size / num_attention_heads is not supported")
    return LlamaConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads), ffn_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=float(rope.get("factor", 1.0)) if kind == "linear" else 1.0,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_llama3=llama3)


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> its shape in the checkpoint (Hugging Face stores matrices as (out, in))."""
    out = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim), "model.norm.weight": (cfg.dim,),
           "lm_head.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_TENSORS.items():
            k, n = matrix_shapes(cfg)[ours] if not ours.endswith("norm") else (cfg.dim, None)
            out[f"model.layers.{i}.{theirs}.weight"] = (cfg.dim,) if n is None else (n, k)
    return out


def _open_tensors(folder: pathlib.Path) -> dict:
    """name -> a function returning the tensor as float32 numpy (lazy, file by file)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    where = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as h:
                for name in h.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                    where[name] = f
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is corrupt or truncated ({e}); re-download the checkpoint") from None

    def getter(name):
        def get():
            try:
                with safe_open(str(where[name]), framework="numpy") as h:
                    return np.asarray(h.get_tensor(name), np.float32)
            except TypeError:  # bf16 tensors need ml_dtypes-aware numpy: go through the flax path
                import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
                with safe_open(str(where[name]), framework="flax") as h:
                    return np.asarray(h.get_tensor(name).astype(jnp.float32))
        return get

    return {name: getter(name) for name in where}


def load_safetensors(folder: str | pathlib.Path, *, dtype=jnp.float32, bits: int | None = None, group: int = 32):
    """(config, params) of a LlamaForCausalLM folder; ``bits`` 4 or 8 quantizes the matrices on load."""
    folder = pathlib.Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{folder} has no config.json; expected a Hugging Face LlamaForCausalLM folder")
    try:
        hf = json.loads(cfg_path.read_text())
        cfg = config_from_hf(hf)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path} lacks or mistypes a field a LlamaForCausalLM config needs ({e})") from None
    tensors = _open_tensors(folder)
    shapes = expected_shapes(cfg)

    def get(name):
        if name not in tensors:
            raise ValueError(f"checkpoint {folder} lacks tensor {name!r}")
        w = tensors[name]()
        want = shapes.get(name)
        if want is not None and tuple(w.shape) != want:
            raise ValueError(f"tensor {name!r} has shape {list(w.shape)}, but config.json needs {list(want)}; "
                             "the checkpoint and its config do not match")
        return w

    def matrix(name):  # HF stores (out, in); we use (in, out)
        w = get(name).T
        return jnp.asarray(w, dtype) if bits is None else quantize(jnp.asarray(w), bits=bits, group=group)

    layers = []
    for i in range(cfg.n_layers):
        layer = {}
        for ours, theirs in _LAYER_TENSORS.items():
            name = f"model.layers.{i}.{theirs}.weight"
            layer[ours] = jnp.asarray(get(name)) if ours.endswith("norm") else matrix(name)
        layers.append(fuse_qkv(layer, dtype))
    embed = get("model.embed_tokens.weight").T  # (dim, vocab)
    tied = cfg.tie_embeddings or "lm_head.weight" not in tensors
    if tied != cfg.tie_embeddings:
        import dataclasses

        cfg = dataclasses.replace(cfg, tie_embeddings=True)
    params = {
        "embed": jnp.asarray(embed, dtype) if bits is None else quantize(jnp.asarray(embed), bits=8, group=group),
        "output": None if tied else matrix("lm_head.weight"),
        "norm": jnp.asarray(get("model.norm.weight")),
        "layers": layers,
    }
    return cfg, params
