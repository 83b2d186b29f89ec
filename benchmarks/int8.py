"""Int8 graphs through the Pallas int8 kernels against the same graph in float32 through XLA.

For each .tflite model: the int8 graph runs through ``models.execute.compile_graph`` (conv / FC
as the Pallas int8 GEMM with the requantizing epilogue, depthwise as the Pallas tap kernel); the
baseline is the float graph a user would run, ``dequantized_graph`` (same ops, dequantized
weights) through XLA; a third contender runs the int8 graph with XLA's integer dot instead of
Pallas. All three are timed by ``autotune.measure`` (compiled once, input batches rotated past
the last-level cache, interleaved rounds, device-side kernel time on a GPU) and reported with
95% bootstrap intervals and verdicts. ``python -m autotune report OUT.json`` prints it again.

    python benchmarks/int8.py --quick               # CPU: batch 4, three small models
    python benchmarks/int8.py --batch 256 --all     # GPU: all nine models (the default there)
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cli
from autotune import measure, results
from models import execute, tflite_import, tflm, zoo
from tuning import platform

SMALL = ["mlperf_tiny_ad01_fc_autoencoder_int8", "mlperf_tiny_kws01_dscnn_int8", "mlperf_tiny_ic01_resnet8_cifar10_int8"]


def bench_model(path: pathlib.Path, batch: int, rounds: int | None) -> dict:
    graph = tflite_import.load(path)
    float_graph = execute.dequantized_graph(graph)

    def int8_inputs(seed):
        return tuple(jnp.asarray(x) for x in tflm.random_inputs(graph, batch, seed=seed))

    def float_inputs(seed):
        out = []
        for name, x in zip(graph.inputs, tflm.random_inputs(graph, batch, seed=seed)):
            q = graph.tensors[name].quantization
            out.append(jnp.asarray(x if q is None else execute.quant.dequantize(x, q.scale[0], q.zero_point[0])))
        return tuple(out)

    float_xla = measure.workload(execute.compile_float_graph(float_graph), float_inputs, name="float32_xla")
    contenders = {
        "float32_xla": float_xla,
        "int8_pallas": measure.workload(execute.compile_graph(graph, pallas=True), int8_inputs, name="int8_pallas"),
        "int8_xla": measure.workload(execute.compile_graph(graph, pallas=False), int8_inputs, name="int8_xla"),
    }
    described = {
        "float32_xla": {"what": "the dequantized float32 graph through XLA", "xla_kernels": float_xla.xla_kernels()},
        "int8_pallas": {"what": "the int8 graph through the Pallas int8 kernels"},
        "int8_xla": {"what": "the int8 graph with XLA's integer dot", "xla_kernels":
                     contenders["int8_xla"].xla_kernels()},
    }
    comparison = measure.compare(contenders, baseline="float32_xla", rounds=rounds)
    return results.comparison_row(
        f"batch {batch}", path.stem, {"model": path.stem, "batch": batch}, comparison, described,
        input_shapes=[list((batch,) + graph.tensors[n].shape[1:]) for n in graph.inputs], ops=len(graph.ops),
        inferences_per_second={name: batch / t.median_seconds for name, t in comparison.timings.items()})


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="benchmarks/int8.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three small models, batch 4 (the default on a CPU)")
    parser.add_argument("--batch", type=cli.whole_number(1), default=None,
                        help="inputs per call (default: 4 on CPU, 256 on GPU)")
    parser.add_argument("--rounds", type=cli.whole_number(measure.MIN_ROUNDS), default=None,
                        help="interleaved rounds (default 10 CPU, 30 GPU)")
    parser.add_argument("--all", action="store_true", help="all nine models (default on GPU)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N models")
    parser.add_argument("--models", default=None,
                        help="folder of .tflite files (default: the reference models found through models.zoo: "
                             "$TINYPALLAS_MODELS, else ../shared/tflite)")
    parser.add_argument("--out", default="results/benchmark_int8.json", help="JSON output path")
    cli.add_debug(parser)
    args = parser.parse_args(argv)
    on_gpu = platform.backend() == "gpu"
    quick = args.quick or not on_gpu
    batch = args.batch or (4 if quick else 256)
    rounds = args.rounds or (30 if on_gpu else measure.MIN_ROUNDS)
    paths = (sorted(pathlib.Path(args.models).glob("*.tflite")) if args.models
             else [zoo.reference(name) for name in zoo.references()])
    if quick and not args.all:
        paths = [p for p in paths if p.stem in SMALL]
    paths = paths[:args.limit]
    if not paths:
        where = args.models or ", ".join(map(str, zoo.search_path()))
        raise ValueError(f"no .tflite models found in {where}; pass --models DIR, or {zoo.HOW_TO_GET}")
    out = pathlib.Path(args.out)
    doc = results.benchmark_document("int8", {"batch": batch, "rounds": rounds, "models": [p.stem for p in paths]})
    print(f"device: {doc['env']['device_kind']} | jax {doc['env']['jax']} | {doc['env']['timing_note']}", flush=True)
    for path in paths:
        try:
            row = bench_model(path, batch, rounds)
        except Exception as e:  # noqa: BLE001 -- one model failing is reported, not fatal
            row = results.failed_row(f"batch {batch}", path.stem, {"model": path.stem, "batch": batch}, e)
        results.add_row(doc, out, row)
    results.print_tables(doc, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
