"""``python -m models.llama generate --prompt "..."``: stream a completion from a LLaMA model.
``python -m models.llama plan``: will a model fit on these devices (``--table``: the README's table).

Bad arguments and unreadable models end in one ``error: ...`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

import cli

PATH_CHOICES = ("auto", "xla", "pallas", "cpu")
CONFIGS = ("llama2-7b", "llama2-13b", "llama2-70b")  # published configs for ``plan --config``


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m models.llama")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    g = sub.add_parser("generate", help="generate text (defaults to the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True, action="append",
                   help="the prompt; repeat for a batch (the first is streamed, all are printed at the end)")
    g.add_argument("--model", default=None, help="path to a .gguf file or a safetensors checkpoint folder")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--path", choices=PATH_CHOICES, default="auto",
                   help="xla: jnp reference ops; pallas: fused Pallas kernels; cpu: compiled CPU kernels; "
                        "auto (default): cpu on a CPU where its kernels build, else xla")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, not a chat turn")
    _add_layout_arguments(g)
    cli.add_debug(g)
    p = sub.add_parser("plan", help="bytes per device of weights, KV cache and activations; does it fit?")
    p.add_argument("--model", default=None, help="a .gguf file or safetensors folder (default: the bundled model)")
    p.add_argument("--config", choices=CONFIGS, default=None, help="a published config instead of --model")
    p.add_argument("--format", choices=("f32", "bf16", "w8a16", "w4a16"), default="bf16", help="with --config")
    p.add_argument("--group", type=int, default=128, help="with --config: quantization group of w4a16/w8a16")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="activations and cache")
    p.add_argument("--path", choices=PATH_CHOICES[1:], default="pallas",
                   help="xla adds the attention scores it materializes")
    p.add_argument("--context", type=int, default=4096, help="positions per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences")
    p.add_argument("--table", action="store_true", help="print the README's table for LLaMA-2 7B/13B/70B")
    _add_layout_arguments(p)
    cli.add_debug(p)
    return parser


def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", default=None,
                        help="N: tensor parallel over N devices; DxM: D data-parallel replicas (the batch split "
                             "among them) of an M-way tensor-parallel model, e.g. 2x2 (default: one device, unsharded)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="memory of one device in GB (10^9 bytes) for the fit check (default: what the device "
                             "reports; on a CPU, physical memory shared by the devices)")


def _budget(args, layout) -> int | None:
    """One device's memory for the fit check: --memory-gb, else what the devices report."""
    import jax

    from models.llama import fit

    if args.memory_gb is not None:
        if not (math.isfinite(args.memory_gb) and args.memory_gb > 0):
            raise ValueError(f"--memory-gb {args.memory_gb} must be a positive number")
        return int(args.memory_gb * fit.GB)
    count = min(len(jax.devices()), 1 if layout is None else layout.devices)
    return fit.device_memory_bytes(jax.devices()[:count])


def _plan(args) -> int:
    import jax.numpy as jnp

    from models.llama import config as llama_config
    from models.llama import fit, sharding

    if args.table:
        print(fit.readme_table(context=args.context, batch=args.batch, group=args.group))
        return 0
    if args.context < 1 or args.batch < 1:
        raise ValueError(f"--context {args.context} and --batch {args.batch} must be >= 1")
    layout = sharding.parse_devices(args.devices) if args.devices else sharding.Layout()
    if args.config:
        cfg = getattr(llama_config, args.config.upper().replace("-", "_"))
        shapes = fit.abstract_params(cfg, args.format, group=args.group)
    else:
        checkpoint = fit.read_checkpoint(args.model, jnp.dtype(args.dtype))
        cfg, shapes = checkpoint.config, checkpoint.shapes
    plan = fit.plan(cfg, shapes, context=args.context, batch=args.batch, layout=layout,
                    dtype=jnp.dtype(args.dtype), path=args.path, budget_bytes=_budget(args, layout))
    print(plan.describe())
    plan.check()
    print("fits")
    return 0


def _check(args) -> None:
    """Argument values argparse cannot check by type alone."""
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens} must be >= 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature} must be a finite number >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k} must be >= 0 (0 = off)")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p {args.top_p} must be in (0, 1] (1 = off)")
    if args.model is not None and not pathlib.Path(args.model).exists():
        raise ValueError(f"--model {args.model} does not exist; pass a .gguf file or a safetensors checkpoint folder")
    if not all(args.prompt):
        raise ValueError("--prompt is empty")


def choose_path(requested: str, dtype: str, sharded: bool = False) -> tuple[str, str | None]:
    """(execution path, warning or None). ``auto``: the compiled kernels on a CPU where they build
    and the dtype is float32 and the run is not sharded, else xla; ``cpu`` where they cannot run
    falls back to xla, with a warning."""
    from tuning import platform

    if requested in ("xla", "pallas"):
        return requested, None
    if requested == "cpu" and sharded:
        from models.llama import sharding

        sharding.check_path("cpu")
    if requested == "auto" and (platform.backend() == "gpu" or dtype != "float32" or sharded):
        return "xla", None
    if requested == "cpu" and dtype != "float32":
        raise ValueError("--path cpu runs in float32; drop --dtype bfloat16 or choose --path xla")
    from kernels.cpu import build

    reason = build.availability()
    if reason is not None:
        return "xla", f"warning: the compiled CPU kernels are unavailable ({reason}); using the xla path"
    return "cpu", None


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a second run loads its programs instead of compiling."""
    import jax

    from kernels.cpu import build

    folder = pathlib.Path(os.environ.get("TINYPALLAS_JAX_CACHE", build.cache_dir().parent / "jax"))
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0; 2 with one ``error:`` line for a mistake in the arguments or the model."""
    return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    try:
        _check(args)
        import jax.numpy as jnp

        from models.llama import fit, load, sharding
        from models.llama.generate import cache_length, generate

        layout = sharding.parse_devices(args.devices) if args.devices else None
        path, warning = choose_path(args.path, args.dtype, sharded=layout is not None)
        if warning:
            print(warning, file=sys.stderr)
        enable_compilation_cache()
        dtype = jnp.dtype(args.dtype)
        checkpoint = fit.read_checkpoint(args.model, dtype)  # the header alone: the fit check comes first
        tok = checkpoint.tokenizer
        if args.no_chat or not tok.chat_template:
            prompts = [tok.encode(prompt) for prompt in args.prompt]
        else:
            prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), parse_special=True)
                       for prompt in args.prompt]
        longest = max(len(ids) for ids in prompts)
        cache_length(longest + args.max_tokens, checkpoint.config)  # too long for the model: refused first
        plan = fit.plan(checkpoint.config, checkpoint.shapes, context=longest + args.max_tokens, batch=len(prompts),
                        layout=layout, dtype=dtype, path=path, prompt=longest, budget_bytes=_budget(args, layout))
        print(plan.describe(), file=sys.stderr)
        plan.check()
        mesh = None if layout is None else sharding.make_mesh(layout)
        model = load(checkpoint.path, dtype=dtype, execution=path, mesh=mesh, tokenizer=tok)
        produced: list[int] = []
        shown = ""

        def stream(token_id: int):
            nonlocal shown
            produced.append(token_id)
            text = tok.decode(produced)
            if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text

        result = generate(model.params, model.config, prompts, max_tokens=args.max_tokens, stop_ids=tok.stop_ids,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          path=path, dtype=dtype, on_token=stream, mesh=mesh)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    print()
    for i, ids in enumerate(result.tokens[1:], start=2):
        print(f"--- prompt {i}:\n{tok.decode(ids)}")
    print(f"[{path}] prefill {result.prefill_tokens} tok at {result.prefill_tok_s:.1f} tok/s, "
          f"decode {result.decode_tokens} tok at {result.decode_tok_s:.1f} tok/s "
          f"(compile {result.compile_seconds:.1f} s, not counted)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
