"""``python -m models.llama generate --prompt "..."``: stream a completion from a LLaMA GGUF model."""
from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from models.llama import load
from models.llama.forward import PATHS
from models.llama.generate import generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.llama")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text (defaults to the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--model", default=None, help="path to a .gguf file or a safetensors checkpoint folder")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--path", choices=PATHS, default="xla", help="xla: jnp reference ops; pallas: fused kernels")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, not a chat turn")
    args = parser.parse_args(argv)

    try:
        model = load(args.model, dtype=jnp.dtype(args.dtype))
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
                          path=args.path, dtype=jnp.dtype(args.dtype), on_token=stream)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"[{args.path}] prefill {result.prefill_tokens} tok at {result.prefill_tok_s:.1f} tok/s, "
          f"decode {result.decode_tokens} tok at {result.decode_tok_s:.1f} tok/s "
          f"(compile {result.compile_seconds:.1f} s, not counted)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
