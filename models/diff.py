"""Compare the JAX int8 executor with TFLite Micro, layer by layer.

TFLite Micro's Python interpreter (``tflite-micro`` on PyPI, reference kernels) is the oracle.
``first_difference`` runs one input through both, keeping every intermediate tensor (TFLM's
``kPreserveAllTensors``), and names the first op (in execution order) whose output differs and
the first differing element. Command line::

    python -m models.diff ../shared/tflite/mlperf_tiny_kws01_dscnn_int8.tflite --seed 0
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from models import cli, execute, tflite_import
from models.ir import Graph


def _runtime():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as e:  # pragma: no cover
        raise ImportError("the TFLite Micro oracle needs `pip install tflite-micro`") from e
    return runtime


def tflm_interpreter(model: bytes, preserve_all_tensors: bool = False):
    """A TFLite Micro interpreter for the model bytes (arena 10x the model + 1 MiB)."""
    runtime = _runtime()
    config = runtime.InterpreterConfig.kPreserveAllTensors if preserve_all_tensors else runtime.InterpreterConfig.kAllocationRecording
    return runtime.Interpreter.from_bytes(model, arena_size=10 * len(model) + (1 << 20), intrepreter_config=config)


def tflm_run(model: bytes, *inputs: np.ndarray) -> list[np.ndarray]:
    """Run TFLite Micro on batched inputs (one invoke per example); batched outputs."""
    import tflite

    num_outputs = tflite.Model.GetRootAsModel(model, 0).Subgraphs(0).OutputsLength()
    interp = tflm_interpreter(model)
    outs = []
    for b in range(inputs[0].shape[0]):
        for i, x in enumerate(inputs):
            interp.set_input(np.ascontiguousarray(x[b:b + 1]), i)
        interp.invoke()
        outs.append([np.array(interp.get_output(i)) for i in range(num_outputs)])
    return [np.concatenate([o[i] for o in outs]) for i in range(num_outputs)]


def random_inputs(graph: Graph, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Random batched inputs: uniform int8 for int8 inputs; for float inputs, values spread over
    the range of the QUANTIZE that consumes them (off the quantization grid)."""
    rng = np.random.default_rng(seed)
    consumers = graph.consumers()
    out = []
    for name in graph.inputs:
        t = graph.tensors[name]
        shape = (batch,) + t.shape[1:]
        if t.dtype == "int8":
            out.append(rng.integers(-128, 128, shape, dtype=np.int8))
            continue
        if t.dtype != "float32":
            raise ValueError(f"input {name!r}: random inputs for dtype {t.dtype} are not supported")
        q = None
        for i in consumers[name]:
            op = graph.ops[i]
            if op.kind == "QUANTIZE":
                q = graph.tensors[op.outputs[0]].quantization
        if q is None:
            out.append(rng.normal(size=shape).astype(np.float32))
            continue
        scale, zp = float(q.scale[0]), int(q.zero_point[0])
        out.append(((rng.uniform(-128.5, 127.5, shape) - zp) * scale).astype(np.float32))
    return out


@dataclasses.dataclass
class Difference:
    """Where the executor and TFLite Micro first disagree."""

    op_index: int
    op_kind: str
    op_name: str
    tensor: str
    element: tuple[int, ...]
    ours: float
    tflm: float
    mismatches: int
    size: int

    def __str__(self) -> str:
        return (
            f"first difference at op {self.op_index} ({self.op_kind} {self.op_name!r}), tensor {self.tensor!r}: "
            f"element {self.element} is {self.ours} here vs {self.tflm} in TFLite Micro "
            f"({self.mismatches} of {self.size} elements differ)"
        )


def first_difference(graph: Graph, model: bytes, inputs: list[np.ndarray] | None = None, *,
                     pallas: bool = True, seed: int = 0) -> Difference | None:
    """Run one example through both runtimes; ``None`` when every intermediate tensor matches.

    ``graph`` is the IR to test (usually ``tflite_import.from_bytes(model)``, possibly modified);
    its tensors are matched to the file's by ``graph.metadata["tflite_tensor_index"]``.
    """
    index = graph.metadata.get("tflite_tensor_index")
    if index is None:
        raise ValueError("graph has no metadata['tflite_tensor_index']; import it with models.tflite_import")
    if inputs is None:
        inputs = random_inputs(graph, 1, seed)
    inputs = [np.asarray(x)[:1] for x in inputs]
    _, ours = execute.compile_graph(graph, pallas=pallas, intermediates=True)(*(jnp.asarray(x) for x in inputs))
    interp = tflm_interpreter(model, preserve_all_tensors=True)
    for i, x in enumerate(inputs):
        interp.set_input(np.ascontiguousarray(x), i)
    interp.invoke()
    for op_index, op in enumerate(graph.ops):
        for name in op.outputs:
            mine = np.asarray(ours[name])
            theirs = np.asarray(interp.GetTensor(index[name], 0)["tensor_data"]).reshape(mine.shape)
            bad = mine != theirs
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                return Difference(op_index, op.kind, op.name, name, first, mine[first].item(), theirs[first].item(),
                                  int(bad.sum()), int(bad.size))
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when bit-exact, 1 at the first difference, 2 for a mistake in the arguments
    or the model (one ``error:`` line; ``--debug`` shows the traceback)."""
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m models.diff", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=cli.input_file, help="path to a .tflite file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input")
    parser.add_argument("--xla", action="store_true", help="run conv/FC through XLA instead of the Pallas kernels")
    cli.add_debug(parser)
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed {args.seed} is negative; use a whole number >= 0")
    model = args.model.read_bytes()
    graph = tflite_import.from_bytes(model, name=args.model.name)
    diff = first_difference(graph, model, pallas=not args.xla, seed=args.seed)
    if diff is None:
        print(f"{graph.name}: all {len(graph.ops)} op outputs bit-exact with TFLite Micro (seed {args.seed})")
        return 0
    print(f"{graph.name}: {diff}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
