"""LLaMA sharded over 4 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``):
tensor- and data-parallel runs against one device, the weights' placement, the collectives of a
decode step.

The device count is fixed when JAX starts, and the rest of the suite runs on one device, so the
single test collected in the ordinary run starts this module again in a child process with 4
devices, where the other tests run (and that one is skipped).

SmolLM2-135M has 9 attention heads and 3 KV heads: tensor parallelism over 2 or 4 devices pads them
with zero heads to 12/4 (``sharding.padded_config``); it runs here over 2 and 4 devices (padded) and
over 3 (slow; no padding), and with data parallelism over 2 and 4. Random-weight configs cover the
packed formats: one whose heads divide (8/4) and one padded (6/3 to 8/4).
Tolerance (f32): the sharded logits equal one device's to 1e-5 of their largest magnitude (the
all-reduces add partial sums in another order); greedy tokens are equal.
"""
import functools
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import config as llama_config
from models.llama import fit, forward, generate, sharding
from models.llama import params as llama_params
from tests.models.test_llama_decode_kernels import (
    KERNEL_NAMES,
    STRUCTURAL,
    _cache_shaped_ops,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
DEVICES = 4
IN_CHILD = os.environ.get("TINYPALLAS_SHARDED_CHILD") == "1"
child_only = pytest.mark.skipif(not IN_CHILD or len(jax.devices()) < DEVICES,
                                reason="runs in the 4-device child of test_sharded_llama_on_four_cpu_devices")
RTOL = 1e-5  # of the largest |logit|


def _run_child(markers: str):
    if IN_CHILD:
        pytest.skip("this is the child process")  # (deselected there; for a direct run with the variable set)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "TINYPALLAS_SHARDED_CHILD": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                          "-m", markers, "-k", "not on_four_cpu_devices", str(pathlib.Path(__file__))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    report = run.stdout[-8000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert re.search(r"\d+ passed", run.stdout) and not re.search(r"\d+ skipped", run.stdout), report


def test_sharded_llama_on_four_cpu_devices():
    _run_child("not slow")


@pytest.mark.slow
def test_sharded_llama_on_four_cpu_devices_slow_cases():
    _run_child("slow")


def _tiny(bits, *, padded=False):
    """A config whose heads (8), KV heads (4), MLP width and quantization groups split 2 and 4 ways;
    ``padded``: 6 heads and 3 KV heads of 32 (one quantization group), padded to 8/4."""
    cfg = llama_config.tiny(dim=192 if padded else 128, n_heads=6 if padded else 8, n_kv_heads=3 if padded else 4,
                            ffn_dim=256)
    return cfg, llama_params.init_params(cfg, jax.random.key(0), bits=bits)


def _mesh(text):
    return sharding.make_mesh(sharding.parse_devices(text))


def _logits(params, cfg, path, tokens, next_tokens, mesh=None):
    """Prefill logits and two decode steps' logits."""
    b, t = tokens.shape
    if mesh is None:
        params, cache = forward.prepare(params, cfg, path), forward.init_cache(cfg, b, 256)
        prefill, decode = forward.prefill, forward.decode
    else:
        params, cache = sharding.prepare(params, cfg, path, mesh), sharding.init_cache(cfg, b, 256, mesh)
        prefill, decode = functools.partial(sharding.prefill, mesh=mesh), functools.partial(sharding.decode, mesh=mesh)
    out, cache = prefill(params, tokens, cache, cfg=cfg, path=path)
    outs = [out]
    for i, nxt in enumerate(next_tokens):
        step, cache = decode(params, nxt, jnp.full((b,), t + i), cache, cfg=cfg, path=path)
        outs.append(step)
    return [np.asarray(o) for o in outs]


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        scale = float(np.max(np.abs(w)))
        np.testing.assert_allclose(g, w, atol=RTOL * scale, rtol=0)
        np.testing.assert_array_equal(g.argmax(-1), w.argmax(-1))


@pytest.fixture(scope="module")
def smollm2():
    from models.llama import load

    model = load()
    prompts = [model.tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):",
                                                   "Once upon a time, in a land far away,")]
    return model, prompts


@child_only
@pytest.mark.parametrize("path, layouts", [("xla", ("2", "4")), ("pallas", ("4",)),
                                           pytest.param("xla", ("3",), marks=pytest.mark.slow),
                                           pytest.param("pallas", ("2", "3"), marks=pytest.mark.slow)])
def test_smollm2_tensor_parallel_gives_the_logits_and_tokens_of_one_device(smollm2, path, layouts):
    """Prefill and two decode steps: logits within the tolerance, the same greedy token at every position.
    Over 2 and 4 devices the 9/3 heads are padded to 12/4; zero heads must add exactly nothing."""
    model, prompts = smollm2
    tokens = jnp.array([prompts[0]])
    nxt = [jnp.array([7]), jnp.array([1042])]
    want = _logits(model.params, model.config, path, tokens, nxt)
    for layout in layouts:
        _assert_same(_logits(model.params, model.config, path, tokens, nxt, _mesh(layout)), want)


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2):
    model, prompts = smollm2
    return generate.generate(model.params, model.config, prompts, max_tokens=6).tokens


@child_only
@pytest.mark.parametrize("layout", ["4x1", "1x4", pytest.param("2x1", marks=pytest.mark.slow),
                                    pytest.param("1x3", marks=pytest.mark.slow)])
def test_smollm2_data_parallel_generates_the_tokens_of_one_device(smollm2, smollm2_greedy, layout):
    """Greedy generation of 3 ragged prompts split over the data axis (4x1: padded to 4 rows, the extra
    one dropped), and over tensor parallelism; the on-device decode loop in chunks of 2 steps here
    (the reference ran the default chunk), so the host syncs between chunks on the mesh too."""
    model, prompts = smollm2
    result = generate.generate(model.params, model.config, prompts, max_tokens=6, mesh=_mesh(layout), sync_every=2)
    assert result.tokens == smollm2_greedy
    assert result.prefill_tokens == sum(len(p) for p in prompts)


@child_only
@pytest.mark.parametrize("path, bits, layouts", [
    ("xla", 8, ("1x2", "1x4")), ("pallas", 4, ("1x2", "1x4")),
    pytest.param("xla", None, ("2x2",), marks=pytest.mark.slow),
    pytest.param("pallas", 4, ("2x2",), marks=pytest.mark.slow)])
def test_tensor_parallel_2_and_4_give_the_logits_of_one_device(path, bits, layouts):
    """Prefill and two decode steps. The residual stream joins the split-K products of wo and w_down
    inside the fused unit (the pallas GEMV's epilogue) before their all-reduce: were it passed in on
    every device, the sum would hold it N times and these logits would differ everywhere."""
    cfg, params = _tiny(bits)
    tokens = jnp.array([[5, 17, 200, 3, 9, 44, 81, 100], [9, 8, 7, 6, 5, 4, 3, 2]])
    nxt = [jnp.array([11, 3]), jnp.array([250, 0])]
    want = _logits(params, cfg, path, tokens, nxt)
    for layout in layouts:
        _assert_same(_logits(params, cfg, path, tokens, nxt, _mesh(layout)), want)


@child_only
@pytest.mark.parametrize("bits, padded", [(4, False), (None, False), (4, True), (None, True)])
def test_weights_and_cache_are_split_not_copied(bits, padded):
    """Each device holds 1/N of every split weight (per-device bytes = total / N + the replicated
    norms, the total with the zero heads where the heads are padded), exactly what the fit plan
    counts; the wqkv block of a device is its own heads' q, k, v."""
    cfg, params = _tiny(bits, padded=padded)
    attention = sum(x.nbytes for lp in params["layers"] for x in jax.tree.leaves([lp["wqkv"], lp["wo"]]))
    # padded 6/3 -> 8/4: q, k, v and wo all grow by 8/6 (groups and blocks stay whole)
    total = sum(x.nbytes for x in jax.tree.leaves(params)) + (attention // 3 if padded else 0)
    for layout in ("1x2", "1x4", "2x2"):
        mesh = _mesh(layout)
        placed = sharding.prepare(params, cfg, "xla", mesh)
        m = sharding.layout_of(mesh).model
        mine = sharding.per_device_bytes(placed)
        norms = sum(a.nbytes for a in [placed["norm"], placed["layers"]["attn_norm"], placed["layers"]["ffn_norm"]])
        assert mine == (total - norms) // m + norms, layout
        assert mine < total / m * 1.05
        assert mine == fit.weight_bytes_per_device(params, cfg, sharding.layout_of(mesh))
        cache = sharding.init_cache(cfg, 4, 256, mesh)
        assert cache["k"].shape[2] == sharding.padded_config(cfg, m).n_kv_heads == (4 if padded else cfg.n_kv_heads)
        plan = fit.plan(cfg, params, context=256, batch=4, layout=sharding.layout_of(mesh), dtype=jnp.float32)
        assert sharding.per_device_bytes(cache) == plan.kv_cache_bytes
    placed = sharding.prepare(params, cfg, "xla", _mesh("4"))["layers"]
    for field in jax.tree.leaves(placed["wqkv"]):  # every field of a packed weight split along N, groups whole
        assert field.addressable_shards[1].data.shape[-1] * 4 == field.shape[-1]
        assert field.addressable_shards[1].data.shape[:-1] == field.shape[:-1]
    if padded:  # 8/4 heads over 4 devices: device 3 holds the zero heads 6, 7 and KV head 3 only
        for name in ("wqkv", "wo"):
            for field in jax.tree.leaves(placed[name]):
                assert not np.asarray(field.addressable_shards[3].data).any(), name
                assert np.asarray(field.addressable_shards[2].data).any(), name
    if bits is None:  # device 1 of 4: q heads 2 and 3, k head 1, v head 1 (the same with 6/3 padded to 8/4)
        hd, dense = cfg.head_dim, np.asarray(params["layers"][0]["wqkv"])
        nq, nkv = cfg.n_heads * hd, cfg.n_kv_heads * hd
        want = np.concatenate([dense[:, 2 * hd:4 * hd], dense[:, nq + hd:nq + 2 * hd],
                               dense[:, nq + nkv + hd:nq + nkv + 2 * hd]], axis=1)
        np.testing.assert_array_equal(np.asarray(placed["wqkv"].addressable_shards[1].data)[0], want)


def _collectives(hlo: str) -> dict[str, list[str]]:
    found = {}
    for kind in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
        found[kind] = [line.strip() for line in hlo.splitlines() if re.search(rf"= \S+ {kind}(-start)?\(", line)]
    return found


@functools.cache
def _decode_step_on_2x2(path):
    """(cfg, placed weights, cache, optimized HLO) of one decode step of the tiny 4-bit model on a 2x2 mesh,
    its 6/3 heads padded to 8/4 (zero heads change no collective)."""
    cfg, params = _tiny(4, padded=True)
    mesh = _mesh("2x2")
    placed = sharding.prepare(params, cfg, path, mesh)
    cache = sharding.init_cache(cfg, 2, 256, mesh)
    hlo = sharding.decode.lower(placed, jnp.array([1, 2]), jnp.array([3, 3]), cache, cfg=cfg, path=path,
                                mesh=mesh).compile().as_text()
    return cfg, placed, cache, hlo


@child_only
@pytest.mark.parametrize("path", ["xla", "pallas"])
def test_decode_step_all_reduces_activations_and_gathers_no_weight(path):
    """Optimized HLO of one decode step on a 2x2 mesh: per layer, one all-reduce after the attention
    block and one after the MLP, plus one for the vocabulary-split embedding; each over the model axis
    ({0,1},{2,3}), each of the residual stream's (batch/2, 1, dim) shape; nothing gathered."""
    cfg, placed, _, hlo = _decode_step_on_2x2(path)
    found = _collectives(hlo)
    per_layer = 2 if isinstance(placed["layers"], dict) else 2 * cfg.n_layers  # a scanned body appears once
    assert len(found["all-reduce"]) == per_layer + 1, found["all-reduce"]
    for line in found["all-reduce"]:
        assert f"f32[1,1,{cfg.dim}]" in line and "replica_groups={{0,1},{2,3}}" in line, line
    assert not any(found[k] for k in ("all-gather", "reduce-scatter", "all-to-all", "collective-permute")), found


@child_only
@pytest.mark.parametrize("path", ["pallas", "xla"])
def test_sharded_decode_writes_each_devices_cache_only_inside_the_kernels(path):
    """Under shard_map each device's cache block (layers, batch/2, kv_heads/2, S, D on a 2x2 mesh) is
    written in place by the fused q/k/v kernel and read by attention: in the optimized HLO of the
    pallas step every instruction of that shape that moves bytes belongs to a kernel. The xla path,
    which writes the cache with XLA's own updates, shows that the check finds such work."""
    cfg, _, cache, hlo = _decode_step_on_2x2(path)
    block = cache["k"].addressable_shards[0].data.shape
    assert block == (cfg.n_layers, 1, sharding.padded_config(cfg, 2).n_kv_heads // 2, 256, cfg.head_dim)
    moved = [(op, name) for op, name in _cache_shaped_ops(hlo, "f32[" + ",".join(map(str, block)) + "]")
             if op not in STRUCTURAL]
    assert moved, "no instruction of the cache block's shape: the pattern no longer matches the HLO"
    outside = [(op, name) for op, name in moved if not any(k in name for k in KERNEL_NAMES)]
    assert (outside == []) == (path == "pallas"), outside[:5]


@child_only
def test_cli_generate_with_devices_prints_the_tokens_of_one_device(smollm2, smollm2_greedy, capsys):
    from models.llama import __main__ as cli

    model, _ = smollm2
    args = ["generate", "--no-chat", "--max-tokens", "6", "--devices", "2", "--prompt", "The capital of France is",
            "--prompt", "def fibonacci(n):"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    want = [model.tokenizer.decode(ids) for ids in smollm2_greedy[:2]]
    assert out.out == f"{want[0]}\n--- prompt 2:\n{want[1]}\n"
    assert "--devices 1x2 (data x model), 2 sequence(s)" in out.err
    note = "9/3 heads padded to 12/4 for 2-way tensor parallelism (attention does 1.33x the work)"
    assert out.err.count(note) == 1, out.err


@child_only
def test_benchmark_times_the_sharded_step_and_the_one_device_mesh():
    """benchmarks/llama.py --devices: the sharded decode step timed, and the 1-device mesh against the
    unsharded step through autotune.measure.compare (a speed goal for GPUs; here only its plumbing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_llama", REPO / "benchmarks" / "llama.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg, params = _tiny(4)
    row = bench.sharded_decode(params, cfg, "xla", sharding.Layout(2, 2), context=8, dtype=jnp.float32)
    assert row["devices"] == "2x2" and row["tok_s"] > 0
    low, high = row["sharded_1_device_over_unsharded_interval"]
    assert 0 < low <= row["sharded_1_device_over_unsharded"] <= high
    assert set(row["comparison"]["timings"]) == {"unsharded", "sharded_1_device"}
