"""Compare the JAX int8 executor with TFLite Micro, layer by layer.

TFLite Micro's Python interpreter (``models.tflm``: ``tflite-micro`` on PyPI, reference kernels) is
the oracle.
``first_difference`` runs one input through both, keeping every intermediate tensor (TFLM's
``kPreserveAllTensors``), and names the first op (in execution order) whose output differs and
the first differing element. Command line::

    python -m models.diff ../shared/tflite/mlperf_tiny_kws01_dscnn_int8.tflite --seed 0
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import cli
from models import execute, tflite_import, tflm
from models.ir import Graph


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
        inputs = tflm.random_inputs(graph, 1, seed)
    n = graph.tensors[graph.inputs[0]].shape[0] if graph.inputs else 1
    inputs = [np.asarray(x)[:n] for x in inputs]
    _, ours = execute.compile_graph(graph, pallas=pallas, intermediates=True)(*(jnp.asarray(x) for x in inputs))
    interp = tflm.interpreter(model, preserve_all_tensors=True)
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
