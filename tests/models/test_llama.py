"""LLaMA model: xla vs pallas paths, KV cache, batching, GGUF loading of every supported tensor type.

All on tiny configs (the Pallas path runs interpreted on the CPU). The real model against
llama.cpp / transformers is in test_llama_peers.py.
"""
import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cpu import build as cpu_build
from kernels.llm import w4a16
from models.llama import config as llama_config
from models.llama import forward, generate, gguf_loader
from models.llama import params as llama_params


def _tiny(bits, tie=False):
    cfg = llama_config.tiny(tie_embeddings=tie)
    return cfg, llama_params.init_params(cfg, jax.random.key(0), bits=bits)


@pytest.mark.parametrize("bits, tie", [(4, True), (None, False)])
def test_pallas_path_matches_xla_path_prefill_and_decode(bits, tie):
    """Tolerance: 2e-4 absolute on logits of O(0.1) (f32, different summation orders)."""
    cfg, params = _tiny(bits, tie)
    tokens = jnp.array([[5, 17, 200, 3, 9, 44, 81, 100, 2, 7, 1, 0, 250, 33, 12, 90, 18, 6, 4]])
    out = {}
    for path in ("xla", "pallas"):
        cache = forward.init_cache(cfg, 1, 64)
        logits, cache = forward.prefill(params, tokens, cache, cfg=cfg, path=path)
        step, _ = forward.decode(params, jnp.array([11]), jnp.array([tokens.shape[1]]), cache, cfg=cfg, path=path)
        out[path] = (logits, step)
    np.testing.assert_allclose(out["pallas"][0], out["xla"][0], atol=2e-4)
    np.testing.assert_allclose(out["pallas"][1], out["xla"][1], atol=2e-4)


NEEDS_CPU_KERNELS = pytest.mark.skipif(cpu_build.availability() is not None,
                                       reason=f"the CPU kernels do not build here: {cpu_build.availability()}")


@NEEDS_CPU_KERNELS
@pytest.mark.parametrize("bits, tie", [(4, True), (8, False), (None, False)])
def test_cpu_path_matches_xla_path_prefill_and_decode(bits, tie):
    """The cpu path quantizes activations to 8 bits per block (as llama.cpp does), so its logits
    differ from the f32 xla path by about 1% of their range; dense weights run through XLA there."""
    cfg, params = _tiny(bits, tie)
    tokens = jnp.array([[5, 17, 200, 3, 9, 44, 81, 100, 2, 7, 1, 0, 250, 33, 12, 90, 18, 6, 4],
                        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
    out = {}
    for path in ("xla", "cpu"):
        p = forward.prepare(params, cfg, path)
        logits, cache = forward.prefill(p, tokens, forward.init_cache(cfg, 2, 64), cfg=cfg, path=path)
        step, _ = forward.decode(p, jnp.array([11, 3]), jnp.array([19, 19]), cache, cfg=cfg, path=path)
        out[path] = (logits, step)
    for a, b in zip(out["cpu"], out["xla"]):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, atol=(1e-5 if bits is None else 0.03) * scale, rtol=0)


@NEEDS_CPU_KERNELS
def test_cpu_path_decode_with_kv_cache_equals_full_prefill():
    """Each token's row is quantized on its own, so decode equals prefill up to f32 summation order."""
    cfg, params = _tiny(4)
    params = forward.prepare(params, cfg, "cpu")
    tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    full, _ = forward.prefill(params, tokens, forward.init_cache(cfg, 2, 64), cfg=cfg, path="cpu")
    _, cache = forward.prefill(params, tokens[:, :5], forward.init_cache(cfg, 2, 64), cfg=cfg, path="cpu")
    for t in range(5, 8):
        step, cache = forward.decode(params, tokens[:, t], jnp.array([t, t]), cache, cfg=cfg, path="cpu")
        np.testing.assert_allclose(step, full[:, t], atol=1e-4)


def test_weights_laid_out_for_the_cpu_path_are_refused_elsewhere():
    cfg, params = _tiny(4)
    if cpu_build.availability() is not None:
        pytest.skip("needs the CPU kernels")
    prepared = forward.prepare(params, cfg, "cpu")
    with pytest.raises(ValueError, match="laid out for the cpu path"):
        forward.prepare(prepared, cfg, "xla")


def test_decode_with_kv_cache_equals_full_prefill():
    cfg, params = _tiny(4)
    tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    full, _ = forward.prefill(params, tokens, forward.init_cache(cfg, 2, 64), cfg=cfg)
    _, cache = forward.prefill(params, tokens[:, :5], forward.init_cache(cfg, 2, 64), cfg=cfg)
    for t in range(5, 8):
        step, cache = forward.decode(params, tokens[:, t], jnp.array([t, t]), cache, cfg=cfg)
        np.testing.assert_allclose(step, full[:, t], atol=1e-5)


def test_batched_generation_with_ragged_prompts_equals_one_at_a_time():
    cfg, params = _tiny(4)
    prompts = [[5, 6, 7, 8, 9, 10], [100, 3], [42, 43, 44]]
    batched = generate.generate(params, cfg, prompts, max_tokens=5)
    for prompt, got in zip(prompts, batched.tokens):
        alone = generate.generate(params, cfg, [prompt], max_tokens=5)
        assert got == alone.tokens[0]


def _host_loop_greedy(params, cfg, prompt, max_tokens, stop):
    """Greedy decoding one jitted step at a time, the host checking every token: the oracle for the
    device-side loop."""
    cache = forward.init_cache(cfg, 1, generate.cache_length(len(prompt) + max_tokens, cfg))
    logits, cache = forward.prefill(params, jnp.array([prompt]), cache, cfg=cfg)
    tok, out = int(jnp.argmax(logits[0, -1])), []
    for step in range(max_tokens):
        if tok in stop:
            break
        out.append(tok)
        if step == max_tokens - 1:
            break
        logits, cache = forward.decode(params, jnp.array([tok]), jnp.array([len(prompt) + step]), cache, cfg=cfg)
        tok = int(jnp.argmax(logits[0]))
    return out


def test_device_loop_generates_what_a_per_token_host_loop_does():
    """Decode runs on the device in chunks of ``sync_every`` steps with the stop test inside; any chunk
    size gives the tokens of the token-by-token host loop, streams them in order, and a row that
    samples a stop token ends there while the others go on."""
    cfg, params = _tiny(4)
    prompts = [[5, 6, 7, 8, 9, 10], [100, 3]]
    free = _host_loop_greedy(params, cfg, prompts[0], 9, set())
    stop = {free[4]}  # row 0 stops at its 5th token
    want = [_host_loop_greedy(params, cfg, p, 9, stop) for p in prompts]
    assert len(want[0]) == 4 and want[0] == free[:4]
    for sync_every in (1, 3, 16):
        streamed = []
        got = generate.generate(params, cfg, prompts, max_tokens=9, stop_ids=stop, sync_every=sync_every,
                                on_token=streamed.append)
        assert got.tokens == want, sync_every
        assert streamed == want[0]
        longest = max(len(w) for w in want)  # decode steps: until every row stopped, at most 8 after prefill
        assert got.decode_tokens == (8 if longest == 9 else longest)


def test_sampling_respects_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    k1 = {int(generate.sample(logits, k, temperature=1.0, top_k=1, top_p=1.0)[0]) for k in keys}
    assert k1 == {0}
    p = {int(generate.sample(logits, k, temperature=1.0, top_k=0, top_p=0.7)[0]) for k in keys}
    assert p == {0, 1}
    assert int(generate.sample(logits, keys[0], temperature=0.0, top_k=0, top_p=1.0)[0]) == 0


# ----------------------------------------------------------------------------------------------
# GGUF files written with the gguf package, checked against its own dequantizer
# ----------------------------------------------------------------------------------------------

TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "F16", "ffn_gate": "Q4_1",
         "ffn_up": "Q4_0", "ffn_down": "BF16"}


def write_tiny_gguf(path, *, arch="llama", types=TYPES, embed_type="Q8_0", with_output=True):
    cfg = llama_config.tiny()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_merges([])
    hd = cfg.head_dim
    shapes = {"attn_q": (cfg.n_heads * hd, cfg.dim), "attn_k": (cfg.n_kv_heads * hd, cfg.dim),
              "attn_v": (cfg.n_kv_heads * hd, cfg.dim), "attn_output": (cfg.dim, cfg.dim),
              "ffn_gate": (cfg.ffn_dim, cfg.dim), "ffn_up": (cfg.ffn_dim, cfg.dim), "ffn_down": (cfg.dim, cfg.ffn_dim)}
    written = {}

    def add(name, array, kind):
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            data = array.astype(np.float32)
        elif kind == "F16":
            data = array.astype(np.float16)
        elif kind == "BF16":  # round to nearest even on the top 16 bits of the f32 pattern
            bits32 = array.astype(np.float32).view(np.uint32)
            data = ((bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            data = gguf.quants.quantize(array.astype(np.float32), qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        if kind == "BF16":
            written[name] = (data.astype(np.uint32) << 16).view(np.float32)
        elif kind in ("F32", "F16"):
            written[name] = data.astype(np.float32)
        else:
            written[name] = gguf.quants.dequantize(data, qtype)

    add("token_embd.weight", rng.normal(size=(cfg.vocab_size, cfg.dim)) * 0.5, embed_type)
    add("output_norm.weight", 1 + 0.1 * rng.normal(size=(cfg.dim,)), "F32")
    if with_output:
        add("output.weight", rng.normal(size=(cfg.vocab_size, cfg.dim)) * 0.1, "Q4_1")
    for i in range(cfg.n_layers):
        for name, shape in shapes.items():
            add(f"blk.{i}.{name}.weight", rng.normal(size=shape) * 0.1, types[name])
        add(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.normal(size=(cfg.dim,)), "F32")
        add(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.normal(size=(cfg.dim,)), "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _dense(weight):
    return np.asarray(w4a16.dequantize(weight) if isinstance(weight, w4a16.QuantizedWeight) else weight)


def _dense_matrices(layer, cfg):
    """A loaded layer's matrices as dense arrays under the file's names (wqkv split into wq, wk, wv)."""
    out = {name: _dense(w) for name, w in layer.items() if name != "wqkv"}
    out["wq"], out["wk"], out["wv"] = llama_params.split_qkv(_dense(layer["wqkv"]), cfg)
    return out


def test_gguf_tensors_load_packed_and_match_gguf_dequantizer(tmp_path):
    path = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(path)
    m = gguf_loader.load_gguf(path)
    cfg = m.config
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.dim, cfg.tie_embeddings) == (4, 2, 64, False)
    layers = m.params["layers"]
    assert isinstance(layers[0]["w_gate"], w4a16.QuantizedWeight) and layers[0]["w_gate"].packed.dtype == jnp.uint8
    assert layers[0]["wo"].dtype == jnp.float32
    # q (Q4_0), k (Q4_1) and v (Q8_0) differ in form, so their fused projection is dense
    assert layers[0]["wqkv"].dtype == jnp.float32
    q_perm = gguf_loader.rope_unpermute(cfg.n_heads, cfg.head_dim)
    k_perm = gguf_loader.rope_unpermute(cfg.n_kv_heads, cfg.head_dim)
    for i in range(cfg.n_layers):
        for ours, theirs in gguf_loader._LAYER_TENSORS.items():
            want = written[f"blk.{i}.{theirs}.weight"]
            if want.ndim == 2:
                want = want[q_perm] if ours == "wq" else want[k_perm] if ours == "wk" else want
                want = want.T
            got = _dense_matrices(layers[i], cfg)[ours]
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"layer {i} {ours}")
    np.testing.assert_allclose(_dense(m.params["embed"]), written["token_embd.weight"].T, atol=1e-6)
    np.testing.assert_allclose(_dense(m.params["output"]), written["output.weight"].T, atol=1e-6)


def test_gguf_rope_unpermute_matches_pairwise_rope_on_file_weights(tmp_path):
    """llama.cpp rotates adjacent pairs of the file's Q rows; we rotate halves of un-permuted rows."""
    path = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(path)
    m = gguf_loader.load_gguf(path)
    cfg = m.config
    x = np.random.default_rng(1).normal(size=(cfg.dim,))
    q_file = (written["blk.0.attn_q.weight"] @ x).reshape(cfg.n_heads, cfg.head_dim // 2, 2)
    pos, d = 5.0, cfg.head_dim
    ang = pos * cfg.rope_theta ** (-2 * np.arange(d // 2) / d)
    pairwise = np.stack([q_file[..., 0] * np.cos(ang) - q_file[..., 1] * np.sin(ang),
                         q_file[..., 0] * np.sin(ang) + q_file[..., 1] * np.cos(ang)], -1)
    from kernels.llm import rope

    ours = _dense_matrices(m.params["layers"][0], cfg)["wq"].T @ x
    ours = rope.reference(jnp.asarray(ours, jnp.float32).reshape(1, 1, cfg.n_heads, d), jnp.array([[5]]),
                          theta=cfg.rope_theta)[0, 0]
    halves = np.asarray(ours).reshape(cfg.n_heads, 2, d // 2).transpose(0, 2, 1)
    np.testing.assert_allclose(halves, pairwise, atol=1e-4)


def test_gguf_errors_name_the_problem(tmp_path):
    good = tmp_path / "tiny.gguf"
    write_tiny_gguf(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        gguf_loader.load_gguf(truncated)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_loader.load_gguf(junk)
    with pytest.raises(ValueError, match="does not exist"):
        gguf_loader.load_gguf(tmp_path / "missing.gguf")
    other = tmp_path / "gpt2.gguf"
    write_tiny_gguf(other, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        gguf_loader.load_gguf(other)
    odd = tmp_path / "q5.gguf"
    write_tiny_gguf(odd, types={**TYPES, "ffn_up": "Q5_0"})
    with pytest.raises(ValueError, match="type Q5_0, which is not supported"):
        gguf_loader.load_gguf(odd)


def test_tied_embeddings_when_the_file_has_no_output_tensor(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, with_output=False)
    m = gguf_loader.load_gguf(path)
    assert m.config.tie_embeddings and m.params["output"] is None
    logits, _ = forward.prefill(m.params, jnp.array([[1, 2, 3]]), forward.init_cache(m.config, 1, 64), cfg=m.config)
    assert logits.shape == (1, 3, m.config.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def test_fused_qkv_stays_packed_and_equals_the_three_projections():
    cfg = llama_config.tiny()
    shapes = llama_params.matrix_shapes(cfg)
    ks = jax.random.split(jax.random.key(3), 4)
    layer = {name: w4a16.quantize(jax.random.normal(k, shapes[name]) * 0.1, bits=4, group=32, symmetric=sym)
             for name, k, sym in zip(("wq", "wk", "wv"), ks, (True, False, True))}
    fused = llama_params.fuse_qkv(layer)["wqkv"]
    assert isinstance(fused, w4a16.QuantizedWeight)
    assert fused.shape == (cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
    x = jax.random.normal(ks[3], (3, cfg.dim))
    for got, name in zip(llama_params.split_qkv(w4a16.quantized_matmul(x, fused), cfg), ("wq", "wk", "wv")):
        np.testing.assert_allclose(got, w4a16.reference(x, layer[name]), atol=1e-4, rtol=1e-4, err_msg=name)


def test_weight_bytes_counts_the_streamed_weights():
    cfg, params = _tiny(4, tie=True)
    expected = sum(x.nbytes if isinstance(x, w4a16.QuantizedWeight) else x.size * 4
                   for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, w4a16.QuantizedWeight)))
    assert llama_params.weight_bytes(params) == expected
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    p2 = llama_params.init_params(untied, jax.random.key(0), bits=4)
    assert llama_params.weight_bytes(p2) == llama_params.weight_bytes({**p2, "embed": p2["embed"]}) > 0


def test_bundled_model_pallas_path_matches_xla_path():
    """SmolLM2-135M (dim 576: the RMSNorm row is padded to 1024 inside the kernel; GQA 9/3 heads).
    Tolerance: 2e-3 absolute on logits of magnitude ~20 (f32, reordered sums over 30 layers)."""
    from models.llama import load

    model = load()
    ids = jnp.array([model.tokenizer.encode("The capital of France is")])
    out = {}
    for path in ("xla", "pallas"):
        logits, cache = forward.prefill(model.params, ids, forward.init_cache(model.config, 1, 256), cfg=model.config,
                                        path=path)
        step, _ = forward.decode(model.params, jnp.array([7]), jnp.array([ids.shape[1]]), cache, cfg=model.config,
                                 path=path)
        out[path] = (logits, step)
    for a, b in zip(out["pallas"], out["xla"]):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)
