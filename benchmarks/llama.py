"""LLaMA decode and prefill speed: the Pallas path vs the XLA path vs the memory roofline (GPU), and the
bundled SmolLM2 through the compiled CPU kernels vs llama.cpp on the same CPU.

GPU (``--gpu-path``, the default on a GPU): LLaMA-2-7B shapes, random weights, bf16 and W4A16 (4-bit,
group 128 by default). Decode at batch 1, 4 and 16 and prefill, each the pallas and xla paths timed
interleaved by ``autotune.measure`` (device time from CUPTI), with 95% intervals and verdicts.
Roofline = bandwidth / bytes streamed per step (weights + the KV cache read at that context), against
both the nominal (datasheet) and the measured read bandwidth. Prefill attention alone is also
compared with ``jax.nn.dot_product_attention`` (cuDNN where available). ``--profile`` adds the
per-kernel table of one batch-1 decode step (kernel, us, bytes, GB/s) and the gap between the step's
wall time and its summed kernel time. ``--sweep`` times GEMV configs of the 7B shapes (the portable
body and the Mosaic GPU one).
On a CPU, ``--gpu-path --quick`` runs the same code on a tiny config with interpreted kernels: it
checks that every stage runs; its speeds mean nothing.
CPU (default off a GPU): SmolLM2-135M-Instruct Q4_1 decode and 256-token prefill tok/s, ours
(``--path cpu`` by default) against llama.cpp (run in a child process through models/llama/peers.py),
same threads, interleaved rounds, medians with bootstrap intervals of the per-round ratios.

    python benchmarks/llama.py                      # whatever this machine has
    python benchmarks/llama.py --quick              # < 2 min on a CPU: fewer tokens, tiny context
    python benchmarks/llama.py --gpu-path --quick --profile   # the GPU code path, anywhere
    python benchmarks/llama.py --devices 4          # also sharded: tensor parallel 4 (or DxM, see models.llama.sharding)
With ``--devices``, the decode step is also timed sharded on that mesh (the pallas path in the GPU
benchmark, xla in the CPU one), and on a 1-device mesh against the unsharded step (interleaved,
``autotune.measure.compare``): the sharding's own overhead. On a CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` gives N devices.
Writes JSON (``--out``) with the environment, shapes and every ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from autotune import measure, results
from autotune.measure import time_callable
from models.llama import config as llama_config
from models.llama import forward, sharding
from models.llama import params as llama_params
from tuning import platform

GPU_PATHS = ("xla", "pallas")


class DecodeStep:
    """One compiled decode step with its cache carried from call to call (the cache is donated, as in
    generate): a zero-argument callable for ``autotune.measure``. Positions stay at ``context``, so
    every call reads the same number of cached keys. With ``mesh``, the step of ``models.llama.sharding``
    (``params`` placed there by ``sharding.prepare``), the cache split across the mesh."""

    def __init__(self, params, cfg, path: str, *, batch: int, context: int, dtype, mesh=None):
        cache_len = -(-(context + 1) // 256) * 256
        if mesh is None:
            self.cache, step, on = forward.init_cache(cfg, batch, cache_len, dtype), forward.decode, {}
        else:
            self.cache, step, on = sharding.init_cache(cfg, batch, cache_len, mesh, dtype), sharding.decode, {"mesh": mesh}
        self.args = (params, jnp.ones((batch,), jnp.int32), jnp.full((batch,), context, jnp.int32))
        traced = step.trace(*self.args[:3], self.cache, cfg=cfg, path=path, **on)
        self.kernels = measure.pallas_calls(traced.jaxpr)
        self.compiled = traced.lower().compile()

    def __call__(self):
        logits, self.cache = self.compiled(*self.args, self.cache)
        return logits


class PrefillStep:
    def __init__(self, params, cfg, path: str, *, batch: int, tokens: int, dtype):
        cache = forward.init_cache(cfg, batch, -(-tokens // 256) * 256, dtype)
        self.tokens = jnp.ones((batch, tokens), jnp.int32)
        self.params = params
        self.compiled = forward.prefill.lower(params, self.tokens, cache, cfg=cfg, path=path).compile()
        self.make_cache = lambda: forward.init_cache(cfg, batch, -(-tokens // 256) * 256, dtype)
        self.cache = self.make_cache()

    def __call__(self):
        logits, cache = self.compiled(self.params, self.tokens, self.cache)
        self.cache = cache  # prefill overwrites positions 0..T-1: the same work every call
        return logits


def _compare(contenders: dict, rounds: int) -> dict:
    comparison = measure.compare(contenders, baseline="xla", rounds=rounds, device=True)
    out = comparison.as_dict()
    for name, timing in comparison.timings.items():
        out["timings"][name].pop("kernels", None)  # the per-kernel table lives in the profile
        out[f"{name}_seconds"] = timing.median_seconds
    return out


def profile_table(step: DecodeStep, *, repeats: int) -> dict:
    """Per-kernel device time of one decode step (CUPTI), joined with the Pallas kernels' own byte
    counts; off a GPU, the kernel inventory without times (device-side timing needs a GPU)."""
    timing = measure.time_callable(step, repeats=repeats, device=True)
    inventory: dict[str, dict] = {}
    for call in step.kernels:
        entry = inventory.setdefault(call["name"], {"launches": 0, "bytes": 0})
        entry["launches"] += call["calls"]
        entry["bytes"] += (call["bytes_accessed"] or 0) * call["calls"]
    rows = []
    if timing.timer == "cupti":
        for name, seconds in timing.kernels:
            ours = next((k for k in inventory if k in name), None)
            nbytes = inventory[ours]["bytes"] if ours else None
            rows.append({"kernel": name, "pallas_call": ours, "us": seconds * 1e6, "bytes": nbytes,
                         "gb_s": nbytes / seconds / 1e9 if nbytes and seconds > 0 else None})
    else:
        rows = [{"kernel": name, "pallas_call": name, "launches": v["launches"], "us": None, "bytes": v["bytes"],
                 "gb_s": None} for name, v in inventory.items()]
    kernel_seconds = timing.median_seconds if timing.timer == "cupti" else None
    xla = measure.xla_kernels(step.compiled.as_text())
    return {"timer": timing.timer, "timer_note": timing.timer_note, "wall_us": timing.wall_median_seconds * 1e6,
            "xla_fusions": len(xla["fusions"]), "xla_custom_calls": xla["custom_calls"],
            "kernel_us": None if kernel_seconds is None else kernel_seconds * 1e6,
            "gap_us": None if kernel_seconds is None else (timing.wall_median_seconds - kernel_seconds) * 1e6,
            "pallas_calls_per_step": sum(v["launches"] for v in inventory.values()), "kernels": rows}


def print_profile(title: str, prof: dict) -> None:
    print(f"\n{title}: one decode step, {prof['pallas_calls_per_step']} Pallas calls")
    if prof["timer"] != "cupti":
        print(f"  (device-side timing needs a GPU: {prof['timer_note'] or 'wall time only'}; "
              "the Pallas kernels of the step and their bytes:)")
    print(f"  {'kernel':48} {'us':>9} {'bytes':>13} {'GB/s':>8}")
    for r in prof["kernels"]:
        def f(v, spec):
            return "-" if v is None else format(v, spec)
        print(f"  {r['kernel'][:48]:48} {f(r['us'], '.1f'):>9} {f(r['bytes'], ','):>13} {f(r['gb_s'], '.0f'):>8}")
    print(f"  optimized HLO: {prof['xla_fusions']} fusions, custom calls {prof['xla_custom_calls'] or 'none'}")
    gap = "-" if prof["gap_us"] is None else f"{prof['gap_us']:.1f}"
    kernel = "-" if prof["kernel_us"] is None else f"{prof['kernel_us']:.1f}"
    print(f"  wall {prof['wall_us']:.1f} us, kernels {kernel} us, gap {gap} us")


def attention_comparison(cfg, *, batch: int, tokens: int, dtype, rounds: int) -> dict:
    """Prefill attention alone: the Pallas flash kernel vs jax.nn.dot_product_attention (cuDNN where
    the platform has it, else XLA's), causal, GQA, no RoPE on either side."""
    from kernels.llm import flash_attention

    hd = cfg.head_dim
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (batch, tokens, cfg.n_heads, hd), dtype)
    k = jax.random.normal(ks[1], (batch, tokens, cfg.n_kv_heads, hd), dtype)
    v = jax.random.normal(ks[2], (batch, tokens, cfg.n_kv_heads, hd), dtype)

    def make_inputs(seed):
        return q, k, v

    implementation = "cudnn" if platform.backend() == "gpu" else "xla"
    try:
        xla = measure.workload(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                         implementation=implementation),
                               make_inputs, name="dot_product_attention")
    except Exception as e:  # noqa: BLE001 -- cuDNN may refuse a shape: fall back to XLA's, and say so
        implementation = f"xla (cudnn refused: {type(e).__name__}: {str(e)[:120]})"
        xla = measure.workload(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                               make_inputs, name="dot_product_attention")
    pallas = measure.workload(lambda q, k, v: flash_attention.flash_attention(q, k, v, causal=True), make_inputs,
                              name="flash_attention")
    out = _compare({"xla": xla, "pallas": pallas}, rounds)
    out.update(batch=batch, tokens=tokens, baseline="jax.nn.dot_product_attention", implementation=implementation,
               xla_kernels=xla.xla_kernels())
    return out


def sharded_decode(params, cfg, path: str, layout: sharding.Layout, *, context: int, dtype,
                   rounds: int | None = None) -> dict:
    """Decode tok/s on ``layout``'s mesh (one sequence per data-parallel replica), and the 1-device mesh
    against the unsharded step at batch 1 (interleaved rounds; ratio = unsharded time / sharded time,
    so 1.0 is parity). ``params``: as loaded (each contender lays them out and places them itself)."""
    def step(mesh=None, batch=1):
        placed = forward.prepare(params, cfg, path) if mesh is None else sharding.prepare(params, cfg, path, mesh)
        return DecodeStep(placed, cfg, path, batch=batch, context=context, dtype=dtype, mesh=mesh)

    timing = time_callable(step(sharding.make_mesh(layout), layout.data), device=True)
    comparison = measure.compare({"unsharded": step(), "sharded_1_device": step(sharding.make_mesh(sharding.Layout()))},
                                 baseline="unsharded", rounds=rounds, device=True)
    ratio = comparison.ratio("sharded_1_device")
    return {"devices": str(layout), "path": path, "batch": layout.data, "tok_s": layout.data / timing.median_seconds,
            "timing": timing.as_dict(),
            "sharded_1_device_over_unsharded": ratio["ratio"],
            "sharded_1_device_over_unsharded_interval": [ratio["ratio_ci_low"], ratio["ratio_ci_high"]],
            "sharded_1_device_verdict": ratio["verdict"], "comparison": comparison.as_dict()}


def gpu_config(args) -> tuple[llama_config.LlamaConfig, bool]:
    """The GPU benchmark's model: LLaMA-2-7B shapes on a GPU; elsewhere a tiny config (the code path,
    interpreted), with the context and group it allows. -> (config, tiny)."""
    tiny = platform.backend() != "gpu"
    if tiny:
        args.context, args.group = min(args.context, 40), 32
        return llama_config.tiny(n_layers=2, max_seq_len=512), True
    return dataclasses.replace(llama_config.LLAMA2_7B, n_layers=args.layers or llama_config.LLAMA2_7B.n_layers), False


def gpu_benchmark(args) -> dict:
    cfg, tiny = gpu_config(args)
    dtype = jnp.bfloat16 if not tiny else jnp.float32
    rounds = args.rounds
    bandwidth = measure.read_bandwidth(repeats=5 if tiny else None)
    nominal, measured = bandwidth["nominal_bytes_per_second"], bandwidth["measured_bytes_per_second"]
    report = {"kind": "gpu-path", "model": "tiny config, interpreted (code path only)" if tiny
              else "LLaMA-2-7B shapes, random weights", "config": dataclasses.asdict(cfg), "group": args.group,
              "context": args.context, "prefill_tokens": args.prefill_tokens, "rounds": rounds,
              "read_bandwidth": bandwidth, "measured_on_gpu": not tiny, "results": []}
    for fmt, bits in (("bf16", None), ("w4a16", 4)):
        if args.format not in ("both", fmt):
            continue
        raw = llama_params.init_params(cfg, jax.random.key(0), dtype=dtype, bits=bits, group=args.group)
        weights = llama_params.weight_bytes(raw)
        params = {path: forward.prepare(raw, cfg, path) for path in GPU_PATHS}
        row = {"format": fmt, "dtype": jnp.dtype(dtype).name, "weight_bytes": weights, "decode": [], "prefill": None}
        for batch in args.batches:
            kv_bytes = 2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_dim * args.context * jnp.dtype(dtype).itemsize
            entry = {"batch": batch, "kv_bytes": kv_bytes}
            try:
                steps = {path: DecodeStep(params[path], cfg, path, batch=batch, context=args.context, dtype=dtype)
                         for path in GPU_PATHS}
                entry.update(_compare(steps, rounds))
                entry["pallas_calls_per_step"] = len(steps["pallas"].kernels) and sum(
                    c["calls"] for c in steps["pallas"].kernels)
                for path in GPU_PATHS:
                    entry[f"{path}_tok_s"] = batch / entry[f"{path}_seconds"]
                for name, bw in (("nominal", nominal), ("measured", measured)):
                    if bw:
                        entry[f"roofline_{name}_tok_s"] = batch * bw / (weights + kv_bytes)
                        for path in GPU_PATHS:
                            entry[f"{path}_fraction_of_{name}_roofline"] = (entry[f"{path}_tok_s"]
                                                                           / entry[f"roofline_{name}_tok_s"])
                if args.profile and batch == 1:
                    row["profile"] = profile_table(steps["pallas"], repeats=5 if tiny else 20)
                    row["profile_xla"] = profile_table(steps["xla"], repeats=5 if tiny else 20)
                del steps
            except Exception as e:  # noqa: BLE001  (reported in the JSON, not hidden)
                entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            row["decode"].append(entry)
            write(report, args.out)
        try:
            steps = {path: PrefillStep(params[path], cfg, path, batch=1, tokens=args.prefill_tokens, dtype=dtype)
                     for path in GPU_PATHS}
            row["prefill"] = _compare(steps, rounds)
            for path in GPU_PATHS:
                row["prefill"][f"{path}_tok_s"] = args.prefill_tokens / row["prefill"][f"{path}_seconds"]
            del steps
            row["prefill_attention"] = attention_comparison(cfg, batch=1, tokens=args.prefill_tokens, dtype=dtype,
                                                            rounds=rounds)
        except Exception as e:  # noqa: BLE001
            row["prefill_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        report["results"].append(row)
        write(report, args.out)
        if args.layout is not None:
            try:
                row["sharded"] = sharded_decode(raw, cfg, "pallas", args.layout, context=args.context, dtype=dtype,
                                                rounds=rounds)
            except Exception as e:  # noqa: BLE001
                row["sharded_error"] = f"{type(e).__name__}: {str(e)[:400]}"
            write(report, args.out)
        del params, raw
    return report


def gemv_sweep(args) -> list[dict]:
    """The batch-1 GEMVs of the 7B decode step with their residual epilogue: the heuristic portable
    config, a few others, and the Mosaic GPU body's configs, each timed by the measurement protocol
    (device time on a GPU, input sets rotated past the L2) and as bandwidth. A config that fails to
    compile or run is recorded with its error, not hidden."""
    from kernels.llm import gemv_mgpu, w4a16

    tiny = platform.backend() != "gpu"
    shapes = ((64, 128),) if tiny else ((12288, 4096), (4096, 4096), (4096, 11008))
    rows = []
    for n, k in shapes:
        for bits in (4, 16):
            group = (64 if tiny else args.group) if bits == 4 else 64

            def make_inputs(seed, n=n, k=k, bits=bits, group=group):
                kx, kw, kr = jax.random.split(jax.random.key(seed), 3)
                w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
                weight = w4a16.quantize(w, bits=4, group=group) if bits == 4 else w.astype(jnp.bfloat16)
                return (jax.random.normal(kx, (1, k), jnp.bfloat16), weight, jax.random.normal(kr, (1, n)))

            def make_mosaic_inputs(seed, make_inputs=make_inputs):
                x, weight, residual = make_inputs(seed)
                return x, gemv_mgpu.relayout(weight), residual

            nbytes = (n * k // 2 + 2 * (k // group) * n * 2) if bits == 4 else n * k * 2
            row = {"n": n, "k": k, "bits": bits, "group": group, "bytes": nbytes, "configs": []}
            heuristic = w4a16.heuristic_config(1, n, k, bits, group, on_gpu=True, residual=True)
            configs = [heuristic] + [dataclasses.replace(heuristic, block_n=bn, split_k=sk)
                                     for bn in (32, 64) for sk in (1, 2, 4)
                                     if (bn, sk) != (heuristic.block_n, heuristic.split_k)][:4]
            for cfg in configs:
                bad = w4a16.config_violations(cfg, 1, n, k, group, on_gpu=True)
                row["configs"].append({"body": "portable", "config": cfg.params(), "error": "; ".join(bad)} if bad else
                                      _time_gemv(lambda x, w, r, cfg=cfg: w4a16.quantized_matmul(x, w, residual=r,
                                                                                               config=cfg),
                                                 make_inputs, nbytes, "portable", cfg.params()))
            for cfg in gemv_mgpu.sweep_configs()[: 1 if tiny else None]:
                bad = gemv_mgpu.violations(cfg, 1, n, k, bits, group)
                row["configs"].append({"body": "mosaic", "config": cfg.params(), "error": "; ".join(bad)} if bad else
                                      _time_gemv(lambda x, w, r, cfg=cfg: gemv_mgpu.gemv(x, w, r, config=cfg),
                                                 make_mosaic_inputs, nbytes, "mosaic", cfg.params()))
            rows.append(row)
            print(f"  gemv {n}x{k} {bits}-bit: " + ", ".join(
                f"{c['body']} {c['us']:.1f} us" if c.get("us") else f"{c['body']} failed" for c in row["configs"]))
    return rows


def _time_gemv(fn, make_inputs, nbytes: int, body: str, params: dict) -> dict:
    try:
        timing = measure.time_callable(measure.workload(fn, make_inputs, name=body), repeats=10)
        return {"body": body, "config": params, "us": timing.median_seconds * 1e6, "timer": timing.timer,
                "ci_us": [v * 1e6 for v in timing.interval_seconds], "gb_s": nbytes / timing.median_seconds / 1e9,
                "cold_cache": timing.cold_cache}
    except Exception as e:  # noqa: BLE001  (a config the compiler rejects, or the untested Mosaic body)
        return {"body": body, "config": params, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def write(report: dict, out: str) -> None:
    """The JSON after every row: a run cut short keeps what it measured."""
    results.save_json(out, report)


def print_gpu(report: dict) -> None:
    bw = report["read_bandwidth"]
    nominal = bw["nominal_bytes_per_second"]
    print(f"{report['model']}: context {report['context']}; read bandwidth measured "
          f"{bw['measured_bytes_per_second'] / 1e9:.0f} GB/s" + (f", nominal {nominal / 1e9:.0f} GB/s" if nominal else ""))
    if not report["measured_on_gpu"]:
        print("(not a GPU: these figures check the code path and mean nothing about speed)")
    print(f"{'format':7} {'batch':>5} {'xla tok/s':>10} {'pallas tok/s':>13} {'pallas/xla':>17} {'verdict':>8} "
          f"{'of nominal':>10} {'of measured':>11}")
    for r in report["results"]:
        for d in r["decode"]:
            if "error" in d:
                print(f"{r['format']:7} {d['batch']:>5}  failed: {d['error'][:100]}")
                continue
            ratio = d["ratios"]["pallas"]
            nom = d.get("pallas_fraction_of_nominal_roofline")
            print(f"{r['format']:7} {d['batch']:>5} {d['xla_tok_s']:>10.1f} {d['pallas_tok_s']:>13.1f} "
                  f"{ratio['ratio']:>5.2f} [{ratio['ratio_ci_low']:.2f}, {ratio['ratio_ci_high']:.2f}] "
                  f"{ratio['verdict']:>8} {'-' if nom is None else format(nom, '.0%'):>10} "
                  f"{d['pallas_fraction_of_measured_roofline']:>11.0%}")
        if r.get("prefill"):
            p = r["prefill"]
            print(f"{r['format']:7} prefill {report['prefill_tokens']} tok: xla {p['xla_tok_s']:.0f} tok/s, pallas "
                  f"{p['pallas_tok_s']:.0f} tok/s ({p['ratios']['pallas']['verdict']})")
            a = r["prefill_attention"]
            print(f"        attention alone vs jax.nn.dot_product_attention ({a['implementation']}): "
                  f"{a['ratios']['pallas']['ratio']:.2f}x ({a['ratios']['pallas']['verdict']})")
        elif r.get("prefill_error"):
            print(f"{r['format']:7} prefill failed: {r['prefill_error'][:100]}")
        if r.get("profile"):
            print_profile(f"{r['format']} pallas", r["profile"])
            print_profile(f"{r['format']} xla", r["profile_xla"])


def _summary(name: str, values) -> dict:
    low, high = measure.bootstrap_interval(values)
    return {name: float(np.median(values)), f"{name}_lo": low, f"{name}_hi": high,
            f"{name}_rounds": [float(v) for v in values]}


def _ratio(name: str, ours_seconds, theirs_seconds) -> dict:
    """Speed-up of ours over theirs: median(theirs) / median(ours), the rounds resampled in pairs."""
    low, high = measure.ratio_interval(theirs_seconds, ours_seconds)
    return {name: float(np.median(theirs_seconds) / np.median(ours_seconds)), f"{name}_lo": low,
            f"{name}_hi": high}


def cpu_benchmark(args) -> dict:
    """SmolLM2 Q4_1 decode and prefill, ours (``--path``, the compiled cpu kernels by default) against
    llama.cpp in a child process, same thread count, in interleaved rounds: each round times ours,
    then theirs, with the same protocol (``autotune.measure.time_callable``; llama.cpp is timed
    inside its child). The report gives medians over rounds with 95% bootstrap intervals, the ratio's
    interval resampling rounds in pairs (a shared CPU makes single rounds noisy)."""
    from kernels.cpu import build
    from models.llama import load, peers
    from models.llama.generate import CACHE_MULTIPLE
    from models.llama.gguf_loader import bundled_model_path

    threads = args.threads or build.default_threads()
    build.default_threads = lambda: threads  # the kernels' heuristic configs use this many threads
    path = args.path
    model = load(execution=path)
    cfg = model.config
    context = model.tokenizer.encode("The history of computing began with mechanical calculators and " * 2)
    prefill_ids = (model.tokenizer.encode("The history of computing began with mechanical calculators. " * 40)
                   )[:args.prefill_tokens]
    cache_len = -(-(max(len(context), len(prefill_ids)) + 2 * args.tokens + 8) // CACHE_MULTIPLE) * CACHE_MULTIPLE

    step = jax.jit(functools.partial(forward.decode, cfg=cfg, path=path), donate_argnames=("cache",))
    state = {"cache": forward.init_cache(cfg, 1, cache_len)}
    tok, pos = jnp.array([1], jnp.int32), jnp.array([len(context)], jnp.int32)

    def decode_once():
        logits, state["cache"] = step(model.params, tok, pos, state["cache"])
        return logits

    # As llama.cpp's eval: logits of the last position only.
    prefill = jax.jit(lambda p, t: forward.prefill(p, t, forward.init_cache(cfg, 1, cache_len), cfg=cfg, path=path,
                                                   lengths=jnp.array([t.shape[1]]))[0])
    prompt = jnp.array([prefill_ids], jnp.int32)
    rounds = 2 if args.quick else args.rounds
    result = {"kind": "cpu", "model": "SmolLM2-135M-Instruct Q4_1 (bundled)", "path": path, "threads": threads,
              "isa": build.best_isa() if path == "cpu" else None, "cpu": build.cpu_name(),
              "decode_context": len(context), "decode_tokens_per_round": args.tokens,
              "prefill_tokens": len(prefill_ids), "rounds": rounds}
    ours_dec, ours_pre, theirs_dec, theirs_pre = [], [], [], []
    llm = None
    try:
        if peers.available("llama_cpp"):
            llm = peers.llama_cpp(bundled_model_path(), n_ctx=cache_len + 512, n_batch=512, n_threads=threads,
                                  n_threads_batch=threads, seed=0)
            result["llama_cpp"] = llm.call("info")
        else:
            result["llama_cpp_error"] = "llama-cpp-python is not installed: pip install llama-cpp-python"
        for r in range(rounds):
            ours_dec.append(time_callable(decode_once, warmup=3, repeats=args.tokens).median_seconds)
            if llm:
                theirs_dec.append(llm.call("timed_decode", context, repeats=args.tokens)["median_seconds"])
            ours_pre.append(time_callable(lambda: prefill(model.params, prompt), warmup=1,
                                          repeats=3 if args.quick else 5).median_seconds)
            if llm:
                theirs_pre.append(llm.call("timed_prefill", prefill_ids, repeats=3 if args.quick else 5)
                                  ["median_seconds"])
            print(f"  round {r + 1}/{rounds}: ours {1 / ours_dec[-1]:.1f} tok/s decode, "
                  f"{len(prefill_ids) / ours_pre[-1]:.0f} tok/s prefill"
                  + (f"; llama.cpp {1 / theirs_dec[-1]:.1f}, {len(prefill_ids) / theirs_pre[-1]:.0f}" if llm else ""))
    except peers.PeerError as e:
        result["llama_cpp_error"] = str(e)
    finally:
        if llm:
            llm.close()
    result.update(_summary("decode_tok_s", [1 / t for t in ours_dec]))
    result.update(_summary("prefill_tok_s", [len(prefill_ids) / t for t in ours_pre]))
    if theirs_dec and len(theirs_dec) == len(ours_dec):
        result.update(_summary("llama_cpp_decode_tok_s", [1 / t for t in theirs_dec]))
        result.update(_summary("llama_cpp_prefill_tok_s", [len(prefill_ids) / t for t in theirs_pre]))
        result.update(_ratio("decode_ratio", ours_dec, theirs_dec))
        result.update(_ratio("prefill_ratio", ours_pre, theirs_pre))
    if args.layout is not None:  # the xla path (the cpu path runs unsharded); host devices share the cores
        xla_model = model if path == "xla" else load(execution="xla")
        result["sharded"] = sharded_decode(xla_model.params, cfg, "xla", args.layout, context=len(context),
                                           dtype=jnp.float32)  # (its own rounds: ours/llama.cpp take fewer)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few tokens, short context (CPU smoke run)")
    parser.add_argument("--gpu-path", action="store_true",
                        help="the GPU benchmark (default on a GPU); on a CPU: a tiny config, interpreted")
    parser.add_argument("--tokens", type=int, default=None, help="CPU: decode steps timed per round")
    parser.add_argument("--context", type=int, default=512, help="KV positions already in the cache")
    parser.add_argument("--group", type=int, default=128, help="GPU: W4A16 group size (32, 64 or 128)")
    parser.add_argument("--layers", type=int, default=None, help="GPU: fewer layers than 32 (quick look)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="GPU: decode batch sizes")
    parser.add_argument("--prefill-tokens", type=int, default=None,
                        help="prompt length of the prefill timing (GPU: 512, CPU: 256)")
    parser.add_argument("--format", choices=("both", "bf16", "w4a16", "none"), default="both",
                        help="GPU: weight formats of the decode/prefill benchmark (none: only --sweep)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (GPU: per comparison, >= 10, default 10; CPU: ours/llama.cpp, default 5)")
    parser.add_argument("--devices", default=None, help="also time decode sharded: N (tensor parallel) or DxM; "
                        "on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices")
    parser.add_argument("--path", choices=("cpu", "xla"), default=None,
                        help="CPU: our execution path (default: cpu where its kernels build, else xla)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: threads for ours and llama.cpp (default: all)")
    parser.add_argument("--profile", action="store_true", help="per-kernel table of one batch-1 decode step")
    parser.add_argument("--sweep", action="store_true", help="GPU: also time GEMV configs of the 7B shapes")
    parser.add_argument("--out", default="results/benchmark_llama.json")
    args = parser.parse_args(argv)
    gpu_path = args.gpu_path or args.profile or args.sweep or platform.backend() == "gpu"
    try:  # --devices is checked against the devices and the model before anything is timed
        args.layout = None if args.devices is None else sharding.parse_devices(args.devices)
        if args.layout is not None:
            sharding.make_mesh(args.layout)
            if gpu_path:
                cfg, group = gpu_config(args)[0], args.group if args.format in ("both", "w4a16") else None
            else:
                from models.llama import fit

                checkpoint = fit.read_checkpoint(None)  # the bundled model, from its header
                cfg, group = checkpoint.config, sharding.quantization_group(checkpoint.shapes)
            sharding.check_layout(cfg, args.layout, group=group)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.tokens is None:
        args.tokens = 8 if args.quick else 64
    if args.rounds is None:
        args.rounds = 10 if gpu_path else 5
    if args.prefill_tokens is None:
        args.prefill_tokens = 512 if gpu_path else 256
    if args.quick:
        args.context = min(args.context, 128)
        if gpu_path:
            args.prefill_tokens = min(args.prefill_tokens, 64)
        if platform.backend() != "gpu":
            args.batches = [b for b in args.batches if b <= 4]

    report = {"env": results.environment()}
    if gpu_path:
        if args.sweep:
            report["gemv_sweep"] = gemv_sweep(args)
        if args.format != "none":
            report.update(gpu_benchmark(args))
            print_gpu(report)
    else:
        if args.path is None:
            from models.llama.__main__ import choose_path

            args.path, warning = choose_path("auto", "float32")
            if warning:
                print(warning, file=sys.stderr)
        report.update(cpu_benchmark(args))

        def line(what, ours, theirs, ratio):
            text = (f"{what:8} ours [{report['path']}] {report[ours]:7.1f} tok/s "
                    f"[{report[ours + '_lo']:.1f}, {report[ours + '_hi']:.1f}]")
            if ratio in report:
                text += (f"   llama.cpp {report[theirs]:7.1f} tok/s   ratio {report[ratio]:.2f} "
                         f"[{report[ratio + '_lo']:.2f}, {report[ratio + '_hi']:.2f}]")
            print(text)

        print(f"SmolLM2-135M Q4_1 on {report['threads']} threads ({report['cpu']}), medians of {report['rounds']} "
              "interleaved rounds [95% bootstrap interval]:")
        line("decode", "decode_tok_s", "llama_cpp_decode_tok_s", "decode_ratio")
        line("prefill", "prefill_tok_s", "llama_cpp_prefill_tok_s", "prefill_ratio")
        if "llama_cpp_error" in report:
            print(f"  llama.cpp: {report['llama_cpp_error']}")
    for row in report.get("results", [report]):
        if "sharded" in row:
            sh = row["sharded"]
            low, high = sh["sharded_1_device_over_unsharded_interval"]
            print(f"sharded {sh['path']} --devices {sh['devices']}: {sh['tok_s']:.1f} tok/s; 1-device mesh vs "
                  f"unsharded {sh['sharded_1_device_over_unsharded']:.3f} [{low:.3f}, {high:.3f}] "
                  f"({sh['sharded_1_device_verdict']})")
        elif "sharded_error" in row:
            print(f"sharded failed: {row['sharded_error'][:200]}")
    write(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
