"""Every tunable thing the autotuner can sweep, by name: one entry each, the same for all.

An entry names a module (imported only when used) that offers, for the autotuner:
  ``search_space(problem: dict) -> tuning.space.SearchSpace``: knobs, constraints and what to
      time or measure (the space also says whether its timings are of the Pallas interpreter);
  ``DEFAULT_PROBLEMS: list[dict]`` (what a sweep naming no problem tunes; ``GPU_PROBLEMS`` on a GPU
      where the module has them);
and the ways a command line names its problems, each optional:
  ``parse_shape(text) -> dict``              ``--shape TEXT`` (repeatable; the docstring's first
                                             line is the syntax ``--help`` shows);
  ``PRESETS: dict[str, list[dict]]``         ``--layer NAME``: named lists of problems;
  ``parse_model(model, target) -> dict``     ``--model PATH_OR_NAME [--target BOARD]``.
A problem dict holds shapes and dtypes; ``--dtype`` sets its ``"dtype"`` to one of the entry's
``dtypes``. The command line knows no entry by name: it asks the entry for its problems.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from types import ModuleType

FLOATS = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    module: str
    dtypes: tuple[str, ...] = ()  # the values --dtype may take

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def problems(self, *, shapes: Sequence[str] = (), layer: str | None = None, model: str | None = None,
                 target: str | None = None, dtype: str | None = None, gpu: bool = False) -> list[dict]:
        """The problems a command line names: each ``--shape``, the ``--layer`` preset, or the
        ``--model`` (on ``--target``); none of them: the default problems (the GPU ones on a GPU).
        A ValueError names the flag and what this entry takes instead."""
        module = self.load()
        named = [flag for flag, given in (("--shape", shapes), ("--layer", layer), ("--model", model)) if given]
        if len(named) > 1:
            raise ValueError(f"{' and '.join(named)} each name the problems; give one of them")
        if target and not model:
            raise ValueError("--target names the board a --model runs on; add --model")
        if dtype is not None and dtype not in self.dtypes:
            valid = f"choose one of: {', '.join(self.dtypes)}" if self.dtypes else "it takes none"
            raise ValueError(f"--dtype {dtype!r} is not a dtype of --kernel {self.name}; {valid}")
        if model:
            if not hasattr(module, "parse_model"):
                raise ValueError(f"--kernel {self.name} takes no --model; {_takers('parse_model', '--model')}")
            problems = [module.parse_model(model, target)]
        elif layer:
            presets = getattr(module, "PRESETS", {})
            if layer not in presets:
                raise ValueError(f"--layer {layer!r} is not offered by --kernel {self.name}; "
                                 f"choose one of: {', '.join(sorted(presets)) or 'none (use --shape)'}")
            problems = list(presets[layer])
        elif shapes:
            if not hasattr(module, "parse_shape"):
                raise ValueError(f"--kernel {self.name} takes no --shape; {_takers('parse_shape', '--shape')}")
            problems = [module.parse_shape(text) for text in shapes]
        else:
            gpu_problems = getattr(module, "GPU_PROBLEMS", None)
            problems = list(gpu_problems if gpu and gpu_problems else module.DEFAULT_PROBLEMS)
        return [{**p, "dtype": dtype} for p in problems] if dtype else problems

    def flags(self) -> dict[str, str]:
        """How a command line names this entry's problems, for ``--help`` and ``list kernels``:
        ``--shape`` / ``--model`` with the first docstring line of their parser, ``--layer`` with
        the presets."""
        module = self.load()
        out = {}
        for flag, attribute in (("--shape", "parse_shape"), ("--model", "parse_model")):
            parse = getattr(module, attribute, None)
            if parse is not None:
                out[flag] = ((parse.__doc__ or "").strip().splitlines() or [""])[0].replace("``", "")
        presets = getattr(module, "PRESETS", {})
        if presets:
            out["--layer"] = ", ".join(f"{name} ({len(problems)} problems)" for name, problems in presets.items())
        return out


KERNELS = {k.name: k for k in (
    Kernel("matmul", "kernels.matmul", FLOATS + ("int8",)),
    Kernel("int8", "kernels.int8", ("int8",)),
    Kernel("conv2d", "kernels.conv", FLOATS),
    Kernel("inverted_residual", "kernels.conv.inverted_residual", FLOATS),
    Kernel("mcu", "mcu.tune"),
    Kernel("w4a16", "kernels.llm.w4a16", FLOATS),
    Kernel("swiglu", "kernels.llm.swiglu", FLOATS),
    Kernel("rmsnorm", "kernels.llm.rmsnorm", FLOATS),
    Kernel("rope", "kernels.llm.rope", FLOATS),
    Kernel("flash_attention", "kernels.llm.flash_attention", FLOATS),
    Kernel("decode_attention", "kernels.llm.decode_attention", FLOATS),
    # The compiled CPU kernels: float32 activations, packed weights.
    Kernel("cpu", "kernels.cpu.sweep"),  # every compiled CPU kernel below: the main job without a GPU
    Kernel("cpu_q4_gemv", "kernels.cpu.qmatmul"),
    Kernel("cpu_swiglu", "kernels.cpu.swiglu"),
    Kernel("cpu_attention", "kernels.cpu.attention"),
    Kernel("cpu_rmsnorm", "kernels.cpu.rmsnorm"),
    Kernel("cpu_matmul", "kernels.cpu.matmul"),
)}


def entry(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of: {', '.join(sorted(KERNELS))}")
    return KERNELS[name]


def kernel_module(name: str) -> ModuleType:
    return entry(name).load()


def _takers(attribute: str, flag: str) -> str:
    names = [name for name, k in KERNELS.items() if hasattr(k.load(), attribute)]
    return f"{flag} is taken by: {', '.join(names)}"


def targets() -> list[dict]:
    """What ``--target`` may name: the rows of ``targets()`` of the entries that take ``--model``
    (the MCU boards)."""
    return [row for k in KERNELS.values() for row in getattr(k.load(), "targets", list)()]


def default_kernel(*, gpu: bool, problems: bool = False, model: bool = False) -> str:
    """The entry a command line without ``--kernel`` means: the one whose problems ``--model``
    names when a model is given; matmul for ``--shape``/``--layer``; else the main job: matmul on a
    GPU, and on a CPU the compiled CPU kernels (real timings, not the Pallas interpreter's) where
    they build."""
    if model:
        takers = [name for name, k in KERNELS.items() if hasattr(k.load(), "parse_model")]
        if len(takers) != 1:
            raise ValueError(f"--model names the problems of {', '.join(takers) or 'no kernel'}; give --kernel")
        return takers[0]
    if gpu or problems:
        return "matmul"
    from kernels.cpu import build

    return "cpu" if build.availability() is None else "matmul"
