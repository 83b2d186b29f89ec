"""Int8 graph throughput (Pallas int8 kernels) vs the same graph in float32 through XLA.

For each .tflite model: the int8 graph runs through ``models.execute.compile_graph`` (conv / FC
as the Pallas int8 GEMM with the requantizing epilogue, depthwise as the Pallas tap kernel); the
float baseline is ``dequantized_graph`` (same ops, dequantized weights) through XLA; a third
column runs the int8 graph with XLA's integer dot instead of Pallas. Prints a table, writes JSON
with the device, versions, shapes and ratios.

    python benchmarks/int8.py                       # CPU: tiny batch, three small models
    python benchmarks/int8.py --batch 256 --all     # GPU: all nine models
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from autotune import results
from autotune.measure import time_callable
from kernels import platform
from models import execute, tflite_import, tflm

MODELS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tflite"
SMALL = ["mlperf_tiny_ad01_fc_autoencoder_int8", "mlperf_tiny_kws01_dscnn_int8", "mlperf_tiny_ic01_resnet8_cifar10_int8"]


def time_fn(fn, args, repeats: int) -> float:
    """Median seconds per call (compile and warm-up kept apart), the autotuner's method."""
    return time_callable(lambda: fn(*args), warmup=1, repeats=repeats).median_seconds


def bench_model(path: pathlib.Path, batch: int, repeats: int) -> dict:
    graph = tflite_import.load(path)
    inputs = tflm.random_inputs(graph, batch, seed=0)
    int8_args = [jnp.asarray(x) for x in inputs]
    float_graph = execute.dequantized_graph(graph)
    float_args = []
    for name, x in zip(graph.inputs, inputs):
        q = graph.tensors[name].quantization
        float_args.append(jnp.asarray(x if q is None else execute.quant.dequantize(x, q.scale[0], q.zero_point[0])))
    pallas_s = time_fn(execute.compile_graph(graph, pallas=True), int8_args, repeats)
    xla_int8_s = time_fn(execute.compile_graph(graph, pallas=False), int8_args, repeats)
    float_s = time_fn(execute.compile_float_graph(float_graph), float_args, repeats)
    return {
        "model": path.stem,
        "input_shapes": [list((batch,) + graph.tensors[n].shape[1:]) for n in graph.inputs],
        "ops": len(graph.ops),
        "int8_pallas_s": pallas_s,
        "int8_xla_s": xla_int8_s,
        "float32_xla_s": float_s,
        "int8_pallas_inferences_per_s": batch / pallas_s,
        "float32_xla_inferences_per_s": batch / float_s,
        "ratio_float_over_int8_pallas": float_s / pallas_s,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="inputs per call (default: 4 on CPU, 256 on GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per model (default 3 CPU, 20 GPU)")
    parser.add_argument("--all", action="store_true", help="all nine models (default on GPU)")
    parser.add_argument("--models", default=str(MODELS), help="folder of .tflite files")
    parser.add_argument("--out", default="results/benchmark_int8.json", help="JSON output path")
    args = parser.parse_args(argv)
    on_gpu = platform.backend() == "gpu"
    batch = args.batch or (256 if on_gpu else 4)
    repeats = args.repeats or (20 if on_gpu else 3)
    paths = sorted(pathlib.Path(args.models).glob("*.tflite"))
    if not (args.all or on_gpu):
        paths = [p for p in paths if p.stem in SMALL]
    if not paths:
        raise SystemExit(f"no .tflite models found in {args.models}")
    rows = []
    print(f"{'model':58s} {'int8 Pallas':>12s} {'int8 XLA':>10s} {'f32 XLA':>10s} {'f32/int8':>9s}")
    for path in paths:
        r = bench_model(path, batch, repeats)
        rows.append(r)
        print(f"{r['model']:58s} {r['int8_pallas_s'] * 1e3:10.2f}ms {r['int8_xla_s'] * 1e3:8.2f}ms "
              f"{r['float32_xla_s'] * 1e3:8.2f}ms {r['ratio_float_over_int8_pallas']:9.3f}")
    result = {
        "benchmark": "int8_graph_vs_float_xla",
        "env": results.environment(),
        "batch": batch,
        "repeats": repeats,
        "results": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
