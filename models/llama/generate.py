"""Text generation: prefill the prompt, then decode steps into a preallocated cache, on the device.

Sampling (greedy, temperature, top-k, top-p) and the stop test run inside the jitted step, and
decode runs as a ``lax.while_loop`` of up to ``sync_every`` steps: the host looks at the tokens once
per chunk (to stream them and to stop), not once per token, so the device never waits for it in
between. Both functions are compiled ahead of time so the reported tok/s exclude compilation.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from autotune.measure import Stopwatch
from models.llama import forward, sharding
from models.llama.config import LlamaConfig

CACHE_MULTIPLE = 256  # cache length granularity: the decode kernel splits the cache in blocks


def sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0.0 < top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _steps(mesh: Mesh | None):
    """(prefill, decode) of ``forward``, or of ``sharding`` on a mesh."""
    if mesh is None:
        return forward.prefill, forward.decode
    return functools.partial(sharding.prefill, mesh=mesh), functools.partial(sharding.decode, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "path", "mesh", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _prefill_and_sample(params, tokens, lengths, cache, seed, *, cfg, path, mesh, temperature, top_k, top_p):
    """The prompt's forward pass and its first token (key: ``fold_in(key(seed), 0)``). Keys are made
    inside the compiled functions, from an int32 seed: made eagerly they would each be one more small
    executable, and every executable loaded costs resident memory (a second ``generate`` starts on the
    compilation cache)."""
    logits, cache = _steps(mesh)[0](params, tokens, cache, cfg=cfg, path=path, lengths=lengths)
    last = logits[:, 0]
    key = jax.random.fold_in(jax.random.key(seed), 0)
    return sample(last, key, temperature=temperature, top_k=top_k, top_p=top_p), last, cache


SYNC_EVERY = 16  # decode steps the device runs between two looks from the host (streamed as one chunk)


@functools.partial(jax.jit, static_argnames=("cfg", "path", "mesh", "temperature", "top_k", "top_p", "chunk"),
                   donate_argnames=("cache",))
def _decode_chunk(params, tokens, positions, cache, seed, first_step, limit, done, stop_ids, *, cfg, path,
                  mesh, temperature, top_k, top_p, chunk):
    """Up to ``min(chunk, limit)`` decode steps as one ``lax.while_loop``, which ends early once every
    row has sampled a stop token. Step i feeds each row's last token at its position, samples the
    next (key: ``fold_in(key(seed), first_step + i + 1)``) and records it in column i of ``produced``, or -1
    where the row had stopped or stops now. Returns (produced (B, chunk), steps run, last tokens,
    positions, cache, done). On a mesh, the rows are split over its data axis and each step
    is ``sharding.decode``; the loop and the stop test stay on the devices all the same."""
    b = tokens.shape[0]
    key = jax.random.key(seed)

    def running(state):
        i, *_, done = state
        return (i < limit) & ~jnp.all(done)

    def step(state):
        i, tok, pos, cache, produced, done = state
        logits, cache = _steps(mesh)[1](params, tok, pos, cache, cfg=cfg, path=path)
        nxt = sample(logits, jax.random.fold_in(key, first_step + i + 1), temperature=temperature, top_k=top_k,
                     top_p=top_p)
        stop = jnp.any(nxt[:, None] == stop_ids[None, :], axis=1)
        produced = produced.at[:, i].set(jnp.where(done | stop, -1, nxt))
        return i + 1, nxt, pos + 1, cache, produced, done | stop

    state = (jnp.int32(0), tokens, positions, cache, jnp.full((b, chunk), -1, jnp.int32), done)
    steps, tokens, positions, cache, produced, done = jax.lax.while_loop(running, step, state)
    return produced, steps, tokens, positions, cache, done


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (stop token excluded)
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    compile_seconds: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / max(self.decode_seconds, 1e-9)


def cache_length(needed: int, cfg: LlamaConfig) -> int:
    length = -(-needed // CACHE_MULTIPLE) * CACHE_MULTIPLE
    if needed > cfg.max_seq_len:
        raise ValueError(f"prompt + max_tokens = {needed} exceeds the model's context of {cfg.max_seq_len} tokens; "
                         "shorten the prompt or lower --max-tokens")
    return length


def generate(params: dict, cfg: LlamaConfig, prompts: list[list[int]], *, max_tokens: int, stop_ids=(),
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, path: str = "xla",
             dtype=jnp.float32, on_token: Callable[[int], None] | None = None,
             sync_every: int = SYNC_EVERY, mesh: Mesh | None = None) -> Generation:
    """Generate up to ``max_tokens`` for each prompt (a batch; rows may differ in length).

    ``on_token(id)`` is called per token of the first prompt as it is produced (streaming), in chunks
    of up to ``sync_every`` tokens: the device decodes that many steps between two host syncs.
    ``mesh``: run sharded (``models.llama.sharding``): the batch split over its ``data`` axis (padded
    with copies of the last prompt to a multiple of it; their tokens are dropped), the model over
    its ``model`` axis.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if not -2**63 <= seed < 2**63:
        raise ValueError(f"seed={seed} does not fit in 64 bits; pass a smaller seed")
    if sync_every < 1:
        raise ValueError(f"sync_every={sync_every} must be >= 1")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling needs temperature >= 0 (0 = greedy), top_k >= 0 (0 = off) and 0 < top_p <= 1 "
                         f"(1 = off); got temperature={temperature}, top_k={top_k}, top_p={top_p}")
    n_prompts = len(prompts)
    if mesh is None:
        params = forward.prepare(params, cfg, path)  # a no-op for params loaded for this path
    else:
        params = sharding.prepare(params, cfg, path, mesh)  # a no-op for params placed on this mesh
        prompts = list(prompts) + [prompts[-1]] * (sharding.padded_batch(n_prompts, sharding.layout_of(mesh)) - n_prompts)
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    t = int(lengths.max())
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    if mesh is None:
        cache = forward.init_cache(cfg, b, cache_length(t + max_tokens, cfg), dtype)
    else:
        cache = sharding.init_cache(cfg, b, cache_length(t + max_tokens, cfg), mesh, dtype)
    knobs = {"cfg": cfg, "path": path, "mesh": mesh, "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)}
    # Host arrays go to the compiled functions as they are (no eager op, so no extra executable);
    # the seed as int32, wrapped as jax.random.key wraps a Python int
    seed32 = np.asarray(np.int64(seed)).astype(np.int32)
    stop = sorted({int(s) for s in stop_ids})
    stop_j = np.asarray(stop or [-1], np.int32)
    chunk = min(sync_every, max(1, max_tokens - 1))

    with Stopwatch() as w:
        prefill_fn = _prefill_and_sample.lower(params, tokens, lengths, cache, seed32, **knobs).compile()
    compile_seconds = w.seconds

    with Stopwatch() as w:
        next_tok, _, cache = prefill_fn(params, tokens, lengths, cache, seed32)
        first = np.asarray(next_tok)
    prefill_seconds = w.seconds

    out: list[list[int]] = [[] for _ in range(b)]

    def take(column: np.ndarray) -> None:  # one token per row, -1 where the row has stopped
        for i in range(b):
            if column[i] >= 0:
                out[i].append(int(column[i]))
                if i == 0 and on_token is not None:
                    on_token(int(column[i]))

    # Rows padded for the data axis count as stopped from the start: they never keep the on-device
    # loop running (sampled, a copy of a prompt may not stop when its original does).
    done = np.isin(first, stop) | (np.arange(b) >= n_prompts)
    take(np.where(done, -1, first))
    decoded = 0
    decode_seconds = 0.0
    if max_tokens > 1 and not done.all():
        with Stopwatch() as w:  # compiled only when a second token is wanted (a 1-token run starts faster)
            args = (params, next_tok, lengths, cache, seed32, np.int32(0), np.int32(chunk), done, stop_j)
            decode_fn = _decode_chunk.lower(*args, **knobs, chunk=chunk).compile()
        compile_seconds += w.seconds
        with Stopwatch() as w:
            positions, done_j = lengths, done
            while decoded < max_tokens - 1:
                limit = min(chunk, max_tokens - 1 - decoded)
                produced, steps, next_tok, positions, cache, done_j = decode_fn(
                    params, next_tok, positions, cache, seed32, np.int32(decoded), np.int32(limit), done_j, stop_j)
                produced, steps = np.asarray(produced), int(steps)  # the one host sync of the chunk
                for i in range(steps):
                    take(produced[:, i])
                decoded += steps
                if steps < limit:  # every row stopped
                    break
        decode_seconds = w.seconds
    return Generation(out[:n_prompts], int(lengths[:n_prompts].sum()), prefill_seconds, decoded, decode_seconds,
                      compile_seconds)
