"""Batch-1 LLaMA decode speed: the Pallas path vs the XLA path vs the memory roofline (GPU), and the
bundled SmolLM2 through the compiled CPU kernels vs llama.cpp on the same CPU.

GPU: LLaMA-2-7B shapes, random weights, bf16 and W4A16 (4-bit, group 128 by default). Roofline =
HBM bandwidth / bytes streamed per token (weights + the KV cache read at that context).
CPU: SmolLM2-135M-Instruct Q4_1 decode and 256-token prefill tok/s, ours (``--path cpu`` by default)
against llama.cpp (run in a child process through models/llama/peers.py), same threads, interleaved
rounds, medians with bootstrap intervals of the per-round ratios.

    python benchmarks/llama.py            # whatever this machine has
    python benchmarks/llama.py --quick    # < 2 min on a CPU: fewer tokens and rounds
    python benchmarks/llama.py --devices 4   # also sharded: tensor parallel 4 (or DxM, see models.llama.sharding)
With ``--devices``, the decode step is also timed sharded on that mesh, and on a 1-device mesh against
the unsharded step (interleaved, ``autotune.measure.compare``): the sharding's own overhead.
Writes JSON (``--out``) with the environment, shapes and every ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from autotune import measure, results
from autotune.measure import time_callable
from kernels import platform
from models.llama import config as llama_config
from models.llama import forward, sharding
from models.llama import params as llama_params

GPU_PATHS = ("xla", "pallas")
# Peak HBM bandwidth by device (vendor datasheets), bytes/s.
NOMINAL_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}


def decode_tokens_per_second(params, cfg, path: str, *, context: int, steps: int, dtype) -> float:
    """Time ``steps`` jitted decode steps (batch 1) starting at position ``context``."""
    cache_len = -(-(context + steps + 1) // 256) * 256
    cache = forward.init_cache(cfg, 1, cache_len, dtype)
    tok, pos = jnp.array([1], jnp.int32), jnp.array([context], jnp.int32)
    step = forward.decode.lower(params, tok, pos, cache, cfg=cfg, path=path).compile()
    for _ in range(2):  # warm-up
        logits, cache = step(params, tok, pos, cache)
    logits.block_until_ready()
    positions = [jnp.array([context + i], jnp.int32) for i in range(steps)]
    t0 = time.perf_counter()
    for p in positions:
        logits, cache = step(params, tok, p, cache)
    logits.block_until_ready()
    return steps / (time.perf_counter() - t0)


def _decode_stepper(params, cfg, path: str, *, context: int, dtype, mesh=None, batch: int = 1):
    """A zero-argument callable running one decode step at position ``context`` (the cache carried
    from call to call), unsharded or on ``mesh`` with the weights placed there."""
    cache_len = -(-(context + 1) // 256) * 256
    tok, pos = jnp.ones((batch,), jnp.int32), jnp.full((batch,), context, jnp.int32)
    if mesh is None:
        params, cache = forward.prepare(params, cfg, path), forward.init_cache(cfg, batch, cache_len, dtype)
        step = forward.decode.lower(params, tok, pos, cache, cfg=cfg, path=path).compile()
    else:
        params = sharding.prepare(params, cfg, path, mesh)
        cache = sharding.init_cache(cfg, batch, cache_len, mesh, dtype)
        step = sharding.decode.lower(params, tok, pos, cache, cfg=cfg, path=path, mesh=mesh).compile()
    state = {"cache": cache}

    def run():
        logits, state["cache"] = step(params, tok, pos, state["cache"])
        return logits
    return run


def sharded_decode(params, cfg, path: str, layout: sharding.Layout, *, context: int, dtype) -> dict:
    """Decode tok/s on ``layout``'s mesh (one sequence per data-parallel replica), and the 1-device mesh
    against the unsharded step at batch 1 (interleaved rounds; ratio = unsharded time / sharded time,
    so 1.0 is parity)."""
    run = _decode_stepper(params, cfg, path, context=context, dtype=dtype, mesh=sharding.make_mesh(layout),
                          batch=layout.data)
    timing = time_callable(run, device=platform.backend() == "gpu")
    comparison = measure.compare(
        {"unsharded": _decode_stepper(params, cfg, path, context=context, dtype=dtype),
         "sharded_1_device": _decode_stepper(params, cfg, path, context=context, dtype=dtype,
                                             mesh=sharding.make_mesh(sharding.Layout(1, 1)))},
        baseline="unsharded", device=platform.backend() == "gpu")
    ratio = comparison.ratio("sharded_1_device")
    return {"devices": str(layout), "path": path, "batch": layout.data, "tok_s": layout.data / timing.median_seconds,
            "timing": timing.as_dict(),
            "sharded_1_device_over_unsharded": ratio["ratio"],
            "sharded_1_device_over_unsharded_interval": [ratio["ratio_ci_low"], ratio["ratio_ci_high"]],
            "sharded_1_device_verdict": ratio["verdict"], "comparison": comparison.as_dict()}


def measured_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (best of 5)."""
    x = jnp.ones((2**29,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.size * 4 / best


def gpu_benchmark(args) -> dict:
    cfg = dataclasses.replace(llama_config.LLAMA2_7B, n_layers=args.layers or llama_config.LLAMA2_7B.n_layers)
    nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in platform.device_kind()), None)
    measured = measured_bandwidth()
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * args.context * 2  # bf16 K and V read per token
    rows = []
    for fmt, bits in (("bf16", None), ("w4a16", 4)):
        params = llama_params.init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16, bits=bits, group=args.group)
        weight_bytes = llama_params.weight_bytes(params)
        streamed = weight_bytes + kv_bytes
        result = {"format": fmt, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}
        for path in GPU_PATHS:
            try:
                result[f"{path}_tok_s"] = decode_tokens_per_second(params, cfg, path, context=args.context,
                                                                   steps=args.tokens, dtype=jnp.bfloat16)
            except Exception as e:  # noqa: BLE001  (report, do not hide: the JSON carries the error)
                result[f"{path}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                result[f"{path}_tok_s"] = None
        for name, bw in (("nominal", nominal), ("measured", measured)):
            if bw:
                roof = bw / streamed
                result[f"roofline_{name}_tok_s"] = roof
                for path in GPU_PATHS:
                    if result[f"{path}_tok_s"]:
                        result[f"{path}_fraction_of_{name}_roofline"] = result[f"{path}_tok_s"] / roof
        if result["pallas_tok_s"] and result["xla_tok_s"]:
            result["pallas_over_xla"] = result["pallas_tok_s"] / result["xla_tok_s"]
        if args.layout is not None:
            result["sharded"] = sharded_decode(params, cfg, "pallas", args.layout, context=args.context,
                                               dtype=jnp.bfloat16)
        rows.append(result)
        del params
    return {"kind": "gpu", "model": "LLaMA-2-7B shapes, random weights", "config": dataclasses.asdict(cfg),
            "group": args.group, "context": args.context, "tokens": args.tokens,
            "bandwidth_nominal": nominal, "bandwidth_measured": measured, "results": rows}


def seconds_per_call(fn) -> float:
    """Median seconds per call, the autotuner's method (compile and warm-up kept apart)."""
    return time_callable(fn, warmup=2, repeats=10).median_seconds


def gemv_sweep(args) -> list[dict]:
    """Batch-1 GEMV configs of the 7B decode shapes: achieved bandwidth of each (a quick look at the
    tuning space; ``autotune`` does this properly)."""
    from kernels.llm import w4a16

    rows = []
    for n, k in ((12288, 4096), (4096, 4096), (4096, 11008)):  # fused qkv, o, down
        x = jax.random.normal(jax.random.key(0), (1, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * 0.02
        for fmt, weight in (("bf16", w.astype(jnp.bfloat16)), ("w4a16", w4a16.quantize(w, bits=4, group=args.group))):
            nbytes = weight.nbytes if isinstance(weight, w4a16.QuantizedWeight) else weight.size * 2
            xla = jax.jit(w4a16.xla_matmul)
            row = {"n": n, "k": k, "format": fmt,
                   "xla_us": seconds_per_call(functools.partial(xla, x, weight)) * 1e6}
            _, group, _, _ = w4a16.as_grouped(weight)
            groups = k // group
            best = None
            for bn in (64, 128):
                for split in (1, 4, 16):
                    for bg in (1, 4):
                        for warps in (4,):
                            cfg = w4a16.Config(block_m=1, block_n=bn, block_groups=bg, split_k=split, num_warps=warps,
                                               num_stages=2)
                            if w4a16.config_violations(cfg, 1, n, k, group, on_gpu=True) or n % bn:
                                continue
                            if groups // split // bg > 64 or bg * group > 1024:
                                continue
                            try:
                                t = seconds_per_call(functools.partial(w4a16.quantized_matmul, x, weight, config=cfg))
                            except Exception as e:  # noqa: BLE001  (a config Triton rejects is skipped)
                                print(f"  skip {cfg}: {type(e).__name__}")
                                continue
                            if best is None or t < best[0]:
                                best = (t, cfg.params())
            heur = seconds_per_call(functools.partial(w4a16.quantized_matmul, x, weight))
            row.update(heuristic_us=heur * 1e6, best_us=best[0] * 1e6 if best else None,
                       best_config=best[1] if best else None, bytes=nbytes,
                       best_gb_s=nbytes / best[0] / 1e9 if best else None)
            print(row)
            rows.append(row)
    return rows


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
                                           dtype=jnp.float32)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few tokens, short context (CPU smoke run)")
    parser.add_argument("--tokens", type=int, default=None, help="decode steps timed")
    parser.add_argument("--context", type=int, default=512, help="GPU: KV positions already in the cache")
    parser.add_argument("--group", type=int, default=128, help="GPU: W4A16 group size (32, 64 or 128)")
    parser.add_argument("--layers", type=int, default=None, help="GPU: fewer layers than 32 (quick look)")
    parser.add_argument("--sweep", action="store_true", help="GPU: also sweep GEMV configs of the 7B shapes")
    parser.add_argument("--devices", default=None, help="also time decode sharded: N (tensor parallel) or DxM; "
                        "on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices")
    parser.add_argument("--path", choices=("cpu", "xla"), default=None,
                        help="CPU: our execution path (default: cpu where its kernels build, else xla)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: threads for ours and llama.cpp (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds (ours, llama.cpp)")
    parser.add_argument("--prefill-tokens", type=int, default=256, help="CPU: prompt length of the prefill timing")
    parser.add_argument("--out", default="results/benchmark_llama.json")
    args = parser.parse_args(argv)
    try:
        args.layout = None if args.devices is None else sharding.parse_devices(args.devices)
        if args.layout is not None:
            sharding.make_mesh(args.layout)  # enough devices?
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.tokens is None:
        args.tokens = 8 if args.quick else 64
    if args.path is None:
        from models.llama.__main__ import choose_path

        args.path, warning = choose_path("auto", "float32")
        if warning:
            print(warning, file=sys.stderr)
    if args.quick:
        args.context = min(args.context, 128)

    report = {"env": results.environment()}
    if args.sweep and platform.backend() == "gpu":
        report["gemv_sweep"] = gemv_sweep(args)
    report.update(gpu_benchmark(args) if platform.backend() == "gpu" else cpu_benchmark(args))
    if report["kind"] == "gpu":
        print(f"{'format':8} {'xla tok/s':>10} {'pallas tok/s':>13} {'roofline':>9} {'pallas/roof':>11} {'pallas/xla':>10}")
        for r in report["results"]:
            def f(v, spec=".1f"):
                return "-" if v is None else format(v, spec)
            print(f"{r['format']:8} {f(r['xla_tok_s']):>10} {f(r['pallas_tok_s']):>13} "
                  f"{f(r.get('roofline_nominal_tok_s') or r.get('roofline_measured_tok_s')):>9} "
                  f"{f(r.get('pallas_fraction_of_nominal_roofline') or r.get('pallas_fraction_of_measured_roofline'), '.2f'):>11} "
                  f"{f(r.get('pallas_over_xla'), '.2f'):>10}")
            for path in GPU_PATHS:
                if r.get(f"{path}_error"):
                    print(f"  {path} failed: {r[f'{path}_error']}")
    else:
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
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
