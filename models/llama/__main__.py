"""``python -m models.llama generate --prompt "..."``: stream a completion from a LLaMA model.

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


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m models.llama")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    g = sub.add_parser("generate", help="generate text (defaults to the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True)
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
    cli.add_debug(g)
    return parser


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
    if not args.prompt:
        raise ValueError("--prompt is empty")


def choose_path(requested: str, dtype: str) -> tuple[str, str | None]:
    """(execution path, warning or None). ``auto``: the compiled kernels on a CPU where they build
    and the dtype is float32, else xla; ``cpu`` where they cannot run falls back to xla, with a warning."""
    from tuning import platform

    if requested in ("xla", "pallas"):
        return requested, None
    if requested == "auto" and (platform.backend() == "gpu" or dtype != "float32"):
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
    try:
        _check(args)
        import jax.numpy as jnp

        from models.llama import load
        from models.llama.generate import generate

        path, warning = choose_path(args.path, args.dtype)
        if warning:
            print(warning, file=sys.stderr)
        enable_compilation_cache()
        model = load(args.model, dtype=jnp.dtype(args.dtype), execution=path)
        tok = model.tokenizer
        if args.no_chat or not tok.chat_template:
            ids = tok.encode(args.prompt)
        else:
            text = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
            ids = tok.encode(text, parse_special=True)
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

        result = generate(model.params, model.config, [ids], max_tokens=args.max_tokens, stop_ids=tok.stop_ids,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          path=path, dtype=jnp.dtype(args.dtype), on_token=stream)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    print()
    print(f"[{path}] prefill {result.prefill_tokens} tok at {result.prefill_tok_s:.1f} tok/s, "
          f"decode {result.decode_tokens} tok at {result.decode_tok_s:.1f} tok/s "
          f"(compile {result.compile_seconds:.1f} s, not counted)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
