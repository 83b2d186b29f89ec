"""Hugging Face LlamaForCausalLM safetensors checkpoints: our logits vs transformers' on the same file."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.llm import w4a16
from models.llama import forward
from models.llama.safetensors_loader import load_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      rope_theta=5000.0, max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_safetensors_logits_match_transformers(checkpoint):
    folder, model = checkpoint
    cfg, params = load_safetensors(folder)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.rope_theta) == (4, 2, 160, 5000.0)
    ids = [[5, 77, 2, 250, 13, 99, 1, 42, 8]]
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits[0].numpy()
    ours, _ = forward.prefill(params, jnp.array(ids), forward.init_cache(cfg, 1, 64), cfg=cfg)
    np.testing.assert_allclose(np.asarray(ours[0]), theirs, atol=1e-4)


def test_safetensors_quantized_on_load_stays_close(checkpoint):
    folder, _ = checkpoint
    cfg, dense = load_safetensors(folder)
    _, packed = load_safetensors(folder, bits=8, group=32)
    assert isinstance(packed["layers"][0]["wqkv"], w4a16.QuantizedWeight)
    ids = jnp.array([[3, 1, 4, 1, 5]])
    a, _ = forward.prefill(dense, ids, forward.init_cache(cfg, 1, 64), cfg=cfg)
    b, _ = forward.prefill(packed, ids, forward.init_cache(cfg, 1, 64), cfg=cfg)
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())


def test_safetensors_errors_name_the_problem(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="no config.json"):
        load_safetensors(tmp_path)
    folder, _ = checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    conf = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**conf, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_safetensors(bad)
    (bad / "config.json").write_text(json.dumps(conf))
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_safetensors(bad)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama-3.1-style RoPE (frequency-dependent scaling): every band of it (kept, smoothed, divided)
    is reached with head_dim 16, theta 5000 and an original context of 64."""
    torch.manual_seed(1)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 5000.0}
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      rope_theta=5000.0, rope_scaling=rope, max_position_embeddings=512,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_safetensors(tmp_path)
    assert cfg.rope_llama3 == (8.0, 1.0, 4.0, 64.0)
    ids = [[(7 * i) % 300 for i in range(40)]]
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits[0].numpy()
    ours, _ = forward.prefill(params, jnp.array(ids), forward.init_cache(cfg, 1, 64), cfg=cfg)
    np.testing.assert_allclose(np.asarray(ours[0]), theirs, atol=1e-4)
    plain = dataclasses.replace(cfg, rope_llama3=None)  # the scaling does change the logits
    other, _ = forward.prefill(params, jnp.array(ids), forward.init_cache(plain, 1, 64), cfg=plain)
    assert float(jnp.abs(other[0] - ours[0]).max()) > 1e-3


def test_safetensors_tensor_shapes_are_checked_against_the_config(tmp_path, checkpoint):
    folder, _ = checkpoint
    conf = json.loads((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**conf, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[160, 64\]"):
        load_safetensors(tmp_path)


def test_chat_template_saved_beside_the_tokenizer_is_used(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from models.llama import tokenizer

    vocab = {"<s>": 0, "</s>": 1, "hi": 2, "there": 3, "[UNK]": 4}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ eos_token }}"
    (tmp_path / "chat_template.jinja").write_text(template)
    t = tokenizer.from_hf_folder(tmp_path)
    assert t.chat_template == template
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi</s>"
