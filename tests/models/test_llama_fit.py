"""The fit check and the layout rules of sharded LLaMA, on one device: shapes from headers equal what
the loaders build, the plan's arithmetic, the README's table, and the errors of impossible layouts.
(The sharded runs themselves are in test_llama_sharding.py, in a child process with 4 CPU devices.)"""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import pytest

from models.llama import __main__ as cli
from models.llama import config as llama_config
from models.llama import fit, forward, gguf_loader, sharding
from models.llama.params import init_params

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype).name), tree)


def test_checkpoint_shapes_from_the_gguf_header_equal_the_loaded_weights():
    checkpoint = fit.read_checkpoint(None)
    loaded = gguf_loader.load_gguf(gguf_loader.bundled_model_path())
    assert checkpoint.config == loaded.config
    assert _shapes(checkpoint.shapes) == _shapes(loaded.params)


def test_checkpoint_shapes_of_a_safetensors_folder_equal_the_loaded_weights(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models.llama.safetensors_loader import load_safetensors

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "tokenizer.json").write_text(
        '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}')
    for dtype in (jnp.float32, jnp.bfloat16):
        cfg, params = load_safetensors(tmp_path, dtype=dtype)
        checkpoint = fit.read_checkpoint(tmp_path, dtype)
        assert checkpoint.config == cfg
        assert _shapes(checkpoint.shapes) == _shapes(params)


@pytest.mark.parametrize("fmt, bits", [("bf16", None), ("w4a16", 4), ("w8a16", 8)])
def test_abstract_params_are_the_shapes_of_init_params(fmt, bits):
    cfg = llama_config.tiny(n_layers=2)
    real = init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16, bits=bits, group=32)
    assert _shapes(fit.abstract_params(cfg, fmt, group=32)) == _shapes(real)


def test_plan_counts_the_bytes_each_device_holds():
    cfg = llama_config.tiny(dim=128, n_heads=8, n_kv_heads=4, ffn_dim=256)
    shapes = fit.abstract_params(cfg, "w4a16", group=32)
    one = fit.plan(cfg, shapes, context=100, batch=3, dtype=jnp.float32)
    cache = jax.eval_shape(lambda: forward.init_cache(cfg, 3, 256, jnp.float32))
    assert one.context == 256 and one.kv_cache_bytes == sum(a.size * 4 for a in jax.tree.leaves(cache))
    assert one.weight_bytes == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))
    split = fit.plan(cfg, shapes, context=100, batch=3, layout=sharding.Layout(2, 4), dtype=jnp.float32)
    assert split.batch == 2  # 3 sequences over 2 replicas: the larger share
    assert split.kv_cache_bytes == one.kv_cache_bytes * 2 // 3 // 4
    replicated = sum(a.size * 4 for a in [shapes["norm"]] + [lp[n] for lp in shapes["layers"]
                                                             for n in ("attn_norm", "ffn_norm")])
    assert split.weight_bytes == (one.weight_bytes - replicated) // 4 + replicated


def test_plan_refuses_with_the_numbers():
    cfg = llama_config.LLAMA2_70B
    p = fit.plan(cfg, fit.abstract_params(cfg, "bf16"), context=4096, budget_bytes=int(80e9))
    assert not p.fits and p.weight_bytes > 137e9
    with pytest.raises(ValueError, match=r"does not fit: 140\.\d\d GB per device .* > 72\.00 GB usable of 80\.00 GB"):
        p.check()
    assert fit.plan(cfg, fit.abstract_params(cfg, "bf16"), context=4096, layout=sharding.Layout(1, 2),
                    budget_bytes=int(80e9)).fits


def test_readme_table_is_what_the_function_prints():
    """The README quotes ``python -m models.llama plan --table`` (batch 1 and 16): it must be its output."""
    text = README.read_text()
    for batch in (1, 16):
        assert fit.readme_table(context=4096, batch=batch) in text, f"README's batch-{batch} table is stale"


def test_heads_are_padded_and_other_sizes_must_divide_with_an_error_naming_them():
    cfg = fit.read_checkpoint(None).config  # SmolLM2-135M: 9 heads, 3 KV heads, MLP 1536, vocabulary 49152
    for m in (2, 4):
        padded = sharding.padded_config(cfg, m)
        assert (padded.n_heads, padded.n_kv_heads, padded.head_dim) == (12, 4, cfg.head_dim)
        assert sharding.padding_note(cfg, m) == (f"9/3 heads padded to 12/4 for {m}-way tensor parallelism "
                                                 "(attention does 1.33x the work)")
        sharding.check_layout(cfg, sharding.Layout(1, m), group=32)
    assert sharding.padded_config(cfg, 3) is cfg and sharding.padding_note(cfg, 3) is None
    with pytest.raises(ValueError, match=r"over 5 devices must divide MLP width \(1536\), vocabulary \(49152\), "
                                         r"groups of 32 in the MLP's K \(48\); "
                                         r"this model splits over 1, 2, 3, 4, 6, 8, 12, 16, 24, 48 devices"):
        sharding.check_layout(cfg, sharding.Layout(1, 5), group=32)
    with pytest.raises(ValueError, match=r"groups of 32 in the MLP's K \(2\)"):
        sharding.check_layout(llama_config.tiny(ffn_dim=64, n_heads=4, n_kv_heads=4), sharding.Layout(1, 4), group=32)
    # packed weights: a zero head must be whole quantization groups of wo's K
    with pytest.raises(ValueError, match=r"must divide KV heads \(2\) \(zero heads pad the KV heads only when "
                                         r"head_dim 16 is a multiple of the quantization group 32\)"):
        sharding.check_layout(llama_config.tiny(), sharding.Layout(1, 4), group=32)
    sharding.check_layout(llama_config.tiny(), sharding.Layout(1, 4))  # dense: any head size pads


def test_plan_counts_the_zero_heads_of_padding():
    """SmolLM2 over 2 devices: 12/4 heads stored and computed; the q/k/v and wo weights grow by 4/3."""
    checkpoint = fit.read_checkpoint(None)
    cfg, shapes = checkpoint.config, checkpoint.shapes
    one = fit.plan(cfg, shapes, context=256, dtype=jnp.float32)
    two = fit.plan(cfg, shapes, context=256, layout=sharding.Layout(1, 2), dtype=jnp.float32)
    assert one.padding is None and "padded" not in one.describe()
    assert two.describe().endswith("\n  9/3 heads padded to 12/4 for 2-way tensor parallelism "
                                   "(attention does 1.33x the work)")
    assert two.kv_cache_bytes == one.kv_cache_bytes * 4 // 3 // 2
    attention = sum(a.size * a.dtype.itemsize for lp in shapes["layers"] for a in jax.tree.leaves([lp["wqkv"], lp["wo"]]))
    replicated = sum(a.size * 4 for a in [shapes["norm"]] + [lp[n] for lp in shapes["layers"]
                                                             for n in ("attn_norm", "ffn_norm")])
    assert two.weight_bytes == (one.weight_bytes - replicated + attention // 3) // 2 + replicated


@pytest.mark.parametrize("text, layout", [("4", (1, 4)), ("2x2", (2, 2)), ("4X1", (4, 1)), ("1", (1, 1))])
def test_devices_syntax(text, layout):
    assert dataclasses.astuple(sharding.parse_devices(text)) == layout


@pytest.mark.parametrize("text", ["0", "2x", "x2", "two", "2x2x2", "-1", "2x0"])
def test_devices_syntax_errors_name_the_form(text):
    with pytest.raises(ValueError, match="is not N .tensor parallel. or DxM"):
        sharding.parse_devices(text)


def test_more_devices_than_the_machine_has_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs 8 devices, but this machine has 1 .*device_count=8"):
        sharding.make_mesh(sharding.Layout(2, 4), jax.devices()[:1])


def test_cli_refuses_a_split_that_padding_cannot_serve(capsys):
    assert cli.main(["generate", "--prompt", "x", "--devices", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tensor parallelism over 5 devices must divide MLP width (1536), vocabulary (49152)")
    assert len(err.strip().splitlines()) == 1


def test_cli_refuses_a_model_that_does_not_fit(capsys):
    assert cli.main(["generate", "--prompt", "x", "--memory-gb", "0.05", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "weights 0.097 GB" in err and "error: the model does not fit" in err


def test_cli_plan_prints_the_plan(capsys):
    assert cli.main(["plan", "--config", "llama2-70b", "--format", "w4a16", "--devices", "2x2", "--batch", "8",
                     "--memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "--devices 2x2 (data x model), 4 sequence(s) of 4096 positions per device" in out and "fits" in out
    assert cli.main(["plan", "--config", "llama2-70b", "--devices", "3"]) == 2
    assert "must divide MLP width (28672), vocabulary (32000); this model splits over 1, 2, 4, 8, 16, 32, 64" in (
        capsys.readouterr().err)
    assert cli.main(["plan", "--devices", "4", "--context", "512"]) == 0  # the bundled SmolLM2: 9/3 heads
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == ["  9/3 heads padded to 12/4 for 4-way tensor parallelism (attention does 1.33x the work)", "fits"]


def test_cpu_path_is_refused_on_a_mesh():
    cfg = llama_config.tiny()
    params = init_params(cfg, jax.random.key(0), bits=4)
    with pytest.raises(ValueError, match="cpu path's compiled kernels run unsharded"):
        sharding.prepare(params, cfg, "cpu", sharding.make_mesh(sharding.Layout(1, 1)))
