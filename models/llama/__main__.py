"""``python -m models.llama generate --prompt "..."``: stream a completion from a LLaMA GGUF model.
``python -m models.llama plan``: will a model fit on these devices (``--table``: the README's table).
"""
from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from models.llama import config as llama_config
from models.llama import fit, load, sharding
from models.llama.forward import PATHS
from models.llama.generate import cache_length, generate

CONFIGS = {"llama2-7b": llama_config.LLAMA2_7B, "llama2-13b": llama_config.LLAMA2_13B,
           "llama2-70b": llama_config.LLAMA2_70B}


def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", default=None,
                        help="N: tensor parallel over N devices; DxM: D data-parallel replicas (the batch split "
                             "among them) of an M-way tensor-parallel model, e.g. 2x2 (default: one device, unsharded)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="memory of one device in GB (10^9 bytes) for the fit check (default: what the device "
                             "reports; on a CPU, physical memory shared by the devices)")


def _budget(args, layout: sharding.Layout | None) -> int | None:
    if args.memory_gb is not None:
        if not args.memory_gb > 0:
            raise ValueError(f"--memory-gb {args.memory_gb} must be positive")
        return int(args.memory_gb * fit.GB)
    import jax

    count = min(len(jax.devices()), 1 if layout is None else layout.devices)
    return fit.device_memory_bytes(jax.devices()[:count])


def _plan(args) -> int:
    try:
        if args.table:
            print(fit.readme_table(context=args.context, batch=args.batch, group=args.group))
            return 0
        if args.context < 1 or args.batch < 1:
            raise ValueError(f"--context {args.context} and --batch {args.batch} must be >= 1")
        layout = sharding.parse_devices(args.devices) if args.devices else sharding.Layout()
        if args.config:
            cfg, shapes = CONFIGS[args.config], fit.abstract_params(CONFIGS[args.config], args.format, group=args.group)
        else:
            checkpoint = fit.read_checkpoint(args.model, jnp.dtype(args.dtype))
            cfg, shapes = checkpoint.config, checkpoint.shapes
        plan = fit.plan(cfg, shapes, context=args.context, batch=args.batch, layout=layout,
                        dtype=jnp.dtype(args.dtype), path=args.path, budget_bytes=_budget(args, None))
        print(plan.describe())
        plan.check()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("fits")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.llama")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text (defaults to the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True, action="append",
                   help="the prompt; repeat for a batch (the first is streamed, all are printed at the end)")
    g.add_argument("--model", default=None, help="path to a .gguf file or a safetensors checkpoint folder")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--path", choices=PATHS, default="xla", help="xla: jnp reference ops; pallas: fused kernels")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, not a chat turn")
    _add_layout_arguments(g)
    p = sub.add_parser("plan", help="bytes per device of weights, KV cache and activations; does it fit?")
    p.add_argument("--model", default=None, help="a .gguf file or safetensors folder (default: the bundled model)")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, help="a published config instead of --model")
    p.add_argument("--format", default="bf16", help="with --config: f32, bf16, w8a16 or w4a16")
    p.add_argument("--group", type=int, default=128, help="with --config: quantization group of w4a16/w8a16")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--path", choices=PATHS, default="pallas", help="xla adds its materialized attention scores")
    p.add_argument("--context", type=int, default=4096, help="positions per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences")
    p.add_argument("--table", action="store_true", help="print the README's table for LLaMA-2 7B/13B/70B")
    _add_layout_arguments(p)
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)

    try:
        dtype = jnp.dtype(args.dtype)
        layout = sharding.parse_devices(args.devices) if args.devices else None
        checkpoint = fit.read_checkpoint(args.model, dtype)  # header only: the fit check comes first
        tok = checkpoint.tokenizer
        if args.no_chat or not tok.chat_template:
            prompts = [tok.encode(prompt) for prompt in args.prompt]
        else:
            prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), parse_special=True)
                       for prompt in args.prompt]
        context = max(len(ids) for ids in prompts) + args.max_tokens
        cache_length(context, checkpoint.config)  # a context longer than the model's is refused first
        plan = fit.plan(checkpoint.config, checkpoint.shapes, context=context, batch=len(prompts),
                        layout=layout or sharding.Layout(), dtype=dtype, path=args.path,
                        prompt=max(len(ids) for ids in prompts), budget_bytes=_budget(args, layout))
        print(plan.describe(), file=sys.stderr)
        plan.check()
        mesh = None if layout is None else sharding.make_mesh(layout)
        model = load(checkpoint.path, dtype=dtype, execution=args.path, mesh=mesh, tokenizer=tok)
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
                          path=args.path, dtype=dtype, on_token=stream, mesh=mesh)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    for i, ids in enumerate(result.tokens[1:], start=2):
        print(f"--- prompt {i}:\n{tok.decode(ids)}")
    print(f"[{args.path}] prefill {result.prefill_tokens} tok at {result.prefill_tok_s:.1f} tok/s, "
          f"decode {result.decode_tokens} tok at {result.decode_tok_s:.1f} tok/s "
          f"(compile {result.compile_seconds:.1f} s, not counted)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
