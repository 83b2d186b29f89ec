"""``python -m mcu export MODEL.tflite --board stm32f746 --backend portable -o DIR``.

A mistake in the arguments or the model is one line, ``error: ...``, and exit status 2
(``--debug`` shows the traceback); a model that does not fit the board exits with status 1.
"""
from __future__ import annotations

import dataclasses
import sys

import cli
from mcu import boards, cmsis_nn, codegen, tune
from models import tflite_import


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m mcu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    ex = sub.add_parser("export", help="lower a .tflite model to C for a board")
    ex.add_argument("model", type=cli.input_file, help="int8 .tflite file")
    ex.add_argument("--board", default="stm32f746", choices=sorted(boards.BOARDS))
    ex.add_argument("--backend", default=None,
                    help=f"one of {codegen.BACKENDS} (default: the tuned schedule's, else portable); cmsis-nn needs "
                         "$CMSIS_NN_ROOT (a CMSIS-NN checkout)")
    ex.add_argument("--no-in-place", action="store_true", help="disable output/input overlap in the memory plan")
    ex.add_argument("--conv1x1", default=None, choices=codegen.CONV_VARIANTS, help="kernel for 1x1 convs")
    ex.add_argument("--depthwise", default=None, choices=codegen.DEPTHWISE_VARIANTS, help="in-place depthwise variant")
    ex.add_argument("--patch", metavar="SPLIT,GRID", help="run ops 0..SPLIT patch by patch on a GRIDxGRID grid")
    ex.add_argument("--min-sram", action="store_true", help="pick the patch schedule with the smallest peak SRAM")
    ex.add_argument("--untuned", action="store_true", help="ignore the schedule the autotuner chose")
    ex.add_argument("--prefix", default="", metavar="NAME",
                    help="namespace every global symbol (NAME_model_invoke, NAME_tp_*) to link several models into one image")
    ex.add_argument("-o", "--output", required=True, type=cli.output_dir,
                    help="output folder (created with its parents if missing)")
    cli.add_debug(ex)
    args = parser.parse_args(argv)

    # Everything that can be checked without the model is checked first.
    if args.backend is not None and args.backend not in codegen.BACKENDS:
        ex.error(f"--backend {args.backend!r} is not available; choose one of: {', '.join(codegen.BACKENDS)}")
    if args.backend == "cmsis-nn":
        cmsis_nn.root()  # names $CMSIS_NN_ROOT and what it must point at
    prefix = codegen.check_prefix(args.prefix)
    overrides = {}
    if args.patch:
        try:
            split, grid = (int(v) for v in args.patch.split(","))
        except ValueError:
            ex.error(f"--patch {args.patch!r}: expected SPLIT,GRID, e.g. --patch 7,4")
        overrides.update(patch_split=split, patch_grid=grid)
    if args.no_in_place:
        overrides["in_place"] = False
    if args.conv1x1:
        overrides.update(conv1x1=args.conv1x1, layer_variants=())
    if args.depthwise:
        overrides["depthwise"] = args.depthwise

    graph = tflite_import.load(args.model)
    board = boards.board(args.board)
    config = None if args.untuned else tune.tuned_config(str(args.model), board.name)
    backend = args.backend or (config.backend if config is not None else "portable")
    if backend == "cmsis-nn":
        cmsis_nn.root()  # a tuned cmsis-nn schedule needs the checkout too
    tuned = config is not None and backend == config.backend
    if not tuned:
        config = codegen.Config(backend=backend)
    config = dataclasses.replace(config, **overrides)
    if backend == "specialized" and not tuned:
        config = codegen.specialized_config(graph, config, board.flash_bytes)
    if args.min_sram:
        config = codegen.min_sram_config(graph, config)
    try:
        lowered = codegen.export(graph, args.output, config, prefix=prefix)
    except OSError as e:
        raise OSError(f"cannot write to {args.output}: {e.strerror or e}; choose another output folder (-o)") from e
    problems = board.check_fit(lowered.peak_sram_bytes, lowered.flash_bytes)
    print(f"{args.model}: {len(graph.ops)} ops -> {args.output}/model.c")
    print(f"  peak SRAM (arena) {lowered.peak_sram_bytes} B, const data {lowered.flash_bytes} B, board {board.name}")
    print(f"  schedule: {config}")
    for p in problems:
        print(f"  does not fit: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
