"""The independent LLaMA runtimes we check against (llama.cpp, transformers), each in a child process.

A peer is native code we do not control: llama.cpp's AMX matmul segfaults on Sapphire Rapids-class
CPUs (ggml-org/llama.cpp#20824). Running it in a child turns such a crash into one ``PeerError``
that names the peer and the call, instead of the death of the test session or benchmark using it.
"""
from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import pathlib
import signal
import sys
import time
from typing import Any, Self

import numpy as np


class PeerError(RuntimeError):
    """A peer runtime crashed, raised, or did not answer."""


def available(package: str) -> bool:
    """Whether a peer's Python package is installed (checked without importing its native code)."""
    return importlib.util.find_spec(package) is not None


class Peer:
    """An object built by ``factory`` ("module:attribute") inside a child process.

    ``peer.call("method", *args)`` runs the method there and returns its (picklable) result.
    A crash of the child, an exception or a call longer than ``timeout`` seconds raises
    ``PeerError`` naming ``name``; after a crash every later call raises it again.
    """

    def __init__(self, name: str, factory: str, *args, timeout: float = 900.0, **kwargs):
        self.name = name
        self.timeout = timeout
        ctx = multiprocessing.get_context("spawn")  # never fork a process that has started XLA threads
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child_conn, factory, args, kwargs), daemon=True,
                                 name=f"peer-{name}")
        self._proc.start()
        child_conn.close()
        self._failure: PeerError | None = None
        self._receive("start-up")

    def call(self, method: str, *args, **kwargs) -> Any:
        if self._failure is not None:
            raise self._failure
        try:
            self._conn.send((method, args, kwargs))
        except (BrokenPipeError, OSError):
            raise self._dead(method) from None
        return self._receive(method)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _receive(self, what: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while not self._conn.poll(0.1):
            if not self._proc.is_alive() and not self._conn.poll(0):
                raise self._dead(what)
            if time.monotonic() > deadline:
                self._proc.kill()
                self._failure = PeerError(f"{self.name} did not answer {what} within {self.timeout:.0f} s; "
                                          "it was stopped")
                raise self._failure
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._dead(what) from None
        if status == "ok":
            return value
        if what == "start-up":
            self._failure = PeerError(f"{self.name} could not start: {value}")
            raise self._failure
        raise PeerError(f"{self.name} raised in {what}: {value}")

    def _dead(self, what: str) -> PeerError:
        self._proc.join(5)
        code = self._proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        self._failure = PeerError(f"{self.name} {how} during {what} (a crash in the peer runtime, "
                                  "not in TinyPallas)")
        return self._failure


def _serve(conn, factory: str, args: tuple, kwargs: dict) -> None:
    """The child's loop: build the object, then answer ``(method, args, kwargs)`` until ``None``."""
    try:
        module, _, attr = factory.partition(":")
        obj = getattr(importlib.import_module(module), attr)(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 -- reported to the parent as the peer's own failure
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        method, a, kw = request
        try:
            conn.send(("ok", getattr(obj, method)(*a, **kw)))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))


# ---------------------------------------------------------------------------------------------
# The peers. Each class runs in the child; callers use ``llama_cpp(...)`` / ``transformers(...)``.
# ---------------------------------------------------------------------------------------------

class LlamaCpp:
    """llama.cpp through llama-cpp-python, with the AMX extra buffer types off at run time too."""

    def __init__(self, model_path: str, **kwargs):
        import llama_cpp
        import llama_cpp.llama_cpp as lib

        # ``Llama()`` takes no ``use_extra_bufts`` argument: it builds its model parameters from
        # ``llama_model_default_params``, so the default itself is changed, in this child only.
        defaults = lib.llama_model_default_params

        def without_extra_buffer_types():
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_extra_buffer_types
        self.version = llama_cpp.__version__
        kwargs.setdefault("verbose", False)
        self.llm = llama_cpp.Llama(model_path=str(model_path), **kwargs)

    def info(self) -> dict:
        import llama_cpp

        return {"package": "llama-cpp-python", "version": self.version, "module": llama_cpp.__file__,
                "use_extra_bufts": bool(self.llm.model_params.use_extra_bufts),
                "system_info": llama_cpp.llama_print_system_info().decode().strip()}  # the ISA it was built for

    def tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=add_bos, special=special))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits of every position of ``ids`` (needs ``logits_all=True``)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)])

    def decode_steps(self, prompt_ids: list[int], n: int) -> None:
        """Evaluate one token ``n`` times, each at position ``len(prompt_ids)`` after ``prompt_ids``
        (evaluated once, then kept): every step reads the same cache, as the benchmark's decode step
        of ours does. Untimed here: the caller times the call (``autotune.measure``)."""
        if list(self.llm.input_ids[:len(prompt_ids)]) != list(prompt_ids) or self.llm.n_tokens < len(prompt_ids):
            self.llm.reset()
            self.llm.eval(prompt_ids)
        for _ in range(n):
            self.llm.n_tokens = len(prompt_ids)  # eval drops the cache from here on, then appends
            self.llm.eval([1])

    def prefill(self, prompt_ids: list[int]) -> None:
        """Evaluate ``prompt_ids`` from an empty cache (untimed here, as ``decode_steps``)."""
        self.llm.reset()
        self.llm.eval(prompt_ids)

    def chat(self, prompt: str, max_tokens: int) -> str:
        """A reply to one user turn, through the GGUF's chat template (as ``python -m models.llama generate``)."""
        reply = self.llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens)
        return reply["choices"][0]["message"]["content"]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = []
        for tok in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if len(out) == n:
                break
            out.append(int(tok))
        return out


class Transformers:
    """A GGUF model dequantized to f32 by transformers and run in torch f32."""

    def __init__(self, gguf_path: str):
        import torch
        import transformers

        path = pathlib.Path(gguf_path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                       torch_dtype=torch.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp(model_path: str | pathlib.Path, **kwargs) -> Peer:
    """llama.cpp on ``model_path`` in a child process; ``kwargs`` go to ``llama_cpp.Llama``."""
    return Peer("llama.cpp (llama-cpp-python)", "models.llama.peers:LlamaCpp", str(model_path), **kwargs)


def transformers(gguf_path: str | pathlib.Path) -> Peer:
    return Peer("transformers (torch f32)", "models.llama.peers:Transformers", str(gguf_path))


def llama_cpp_command(model_path: str | pathlib.Path, prompt: str, max_tokens: int) -> list[str]:
    """A whole llama.cpp generate as its own process (``LlamaCpp`` there, nothing of ours imported):
    the peer of ``python -m models.llama generate`` when start-up time and peak memory are measured."""
    return [sys.executable, str(pathlib.Path(__file__)), "chat", str(model_path), prompt, str(max_tokens)]


if __name__ == "__main__":  # run by path (``llama_cpp_command``): imports numpy and llama_cpp only
    _, what, model, text, tokens = sys.argv
    if what != "chat":
        raise SystemExit(f"error: unknown command {what!r}; the only one is chat")
    print(LlamaCpp(model, n_ctx=256).chat(text, int(tokens)))
