"""C emitters: one per op family, with each backend's form of an op side by side.

An emitter (``Emitter``) serves the op kinds it lists; it has one method per backend form,
named after the backend (``portable``, ``cmsis_nn``; a new backend adds a method of its name to
the emitters that have a form for it, and nothing else changes): the method writes the op's
constants and call into a ``Layer`` and returns the kernel's name, or None when it has no form
for this instance (a broadcast the CMSIS-NN function cannot do), in which case the portable form
runs. ``emit`` is the whole dispatcher: the op's schema entry names what exists, the registry
finds the emitter.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from models import schema
from models.ir import Graph, Op, Tensor

C_TYPES = {"int8": "int8_t", "float32": "float", "int32": "int32_t"}


@dataclasses.dataclass
class Emission:
    """What the emitters write: const data (each name once), the calls of ``model_invoke`` in
    order, and structs shared by equal initialisers (patches of one geometry)."""

    consts: list[str] = dataclasses.field(default_factory=list)
    calls: list[str] = dataclasses.field(default_factory=list)
    structs: dict[str, str] = dataclasses.field(default_factory=dict)
    const_bytes: dict[int, int] = dataclasses.field(default_factory=dict)  # op index -> flash bytes
    _names: set[str] = dataclasses.field(default_factory=set)

    def array(self, owner: int, ctype: str, name: str, values) -> str:
        if name in self._names:
            return name
        self._names.add(name)
        flat = np.asarray(values).reshape(-1)
        if ctype == "float":
            items = [f"{float(v)!r}f" for v in flat.astype(np.float32)]
        else:
            items = [str(int(v)) for v in flat]
        lines = [",".join(items[i: i + 24]) for i in range(0, len(items), 24)]
        self.consts.append(f"static const {ctype} {name}[{max(len(items), 1)}] = {{\n" + ",\n".join(lines or ["0"])
                           + "\n};\n")
        self.const_bytes[owner] = self.const_bytes.get(owner, 0) + flat.size * {"int8_t": 1, "float": 4}.get(ctype, 4)
        return name

    def struct(self, ctype: str, prefix: str, init: str) -> str:
        key = f"{ctype} {init}"
        if key not in self.structs:
            taken = sum(1 for v in self.structs.values() if v.startswith(prefix + "_"))
            self.structs[key] = f"{prefix}_{taken}"
            self.consts.append(f"static const {ctype} {self.structs[key]} = {init};\n")
        return self.structs[key]

    def call(self, text: str) -> None:
        self.calls.append(text)


@dataclasses.dataclass
class Layer:
    """One op as a call site: the whole tensors in the arena, or a patch of them (``shapes`` the
    regions this call sees, ``pads`` the patch-local (top, left) padding, ``ptr`` the pointers
    into the patch arena, possibly offset by a row loop variable ``r``). A form that cannot run
    on a region returns None where ``shapes`` differ from the tensors' shapes."""

    graph: Graph
    op: Op
    index: int
    params: dict
    out: Emission
    ptr: Callable[[str], str]  # C pointer expression of a computed tensor (cast to its C type)
    shapes: dict[str, tuple[int, ...]]
    pads: tuple[int, int] | None = None
    scratch: str = "0"  # C pointer to the op's scratch
    scratch_bytes: int = 0
    channel_in_place: bool = False  # the output shares the input's buffer (TinyEngine depthwise)
    conv1x1: str = "direct"  # kernel for 1x1 stride-1 unpadded convs (mcu.codegen.CONV_VARIANTS)
    options: dict = dataclasses.field(default_factory=dict)  # the specialized backend's per-layer knobs

    @property
    def whole(self) -> bool:
        """Whether the call sees whole tensors (not a patch region)."""
        return not self.shapes

    @property
    def prefix(self) -> str:
        return f"L{self.index}"

    def tensor(self, k: int) -> Tensor:
        return self.graph.tensors[self.op.inputs[k]]

    @property
    def output(self) -> Tensor:
        return self.graph.tensors[self.op.outputs[0]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes.get(name, self.graph.tensors[name].shape)

    def const(self, ctype: str, suffix: str, values) -> str:
        return self.out.array(self.index, ctype, f"{self.prefix}_{suffix}", values)

    def struct(self, ctype: str, init: str) -> str:
        return self.out.struct(ctype, self.prefix, init)

    def checked(self, call: str) -> str:
        """A kernel call that returns a status (CMSIS-NN's arm_cmsis_nn_status): model_invoke
        returns 1 + this op's index when it is not success (0)."""
        return f"TP_CHECK({self.index}, {call})"

    def operand(self, k: int) -> str:
        """C pointer to input ``k``: the arena for a computed tensor, a const array for a constant."""
        t = self.tensor(k)
        if t.is_constant:
            return self.const(C_TYPES[t.dtype], f"operand{k}", t.data)
        return self.ptr(self.op.inputs[k])

    def per_image(self, kernel: str, struct: str, extra: str = "") -> None:
        """``kernel(&struct, in, out extra)`` for each image of an NHWC batch."""
        x, y = self.op.inputs[0], self.op.outputs[0]
        xs, ys = self.shape(x), self.shape(y)
        if xs[0] == 1:
            self.out.call(f"{kernel}(&{struct}, {self.ptr(x)}, {self.ptr(y)}{extra});")
        else:
            step_x, step_y = int(np.prod(xs[1:])), int(np.prod(ys[1:]))
            self.out.call(f"for (int32_t b = 0; b < {xs[0]}; b++) {kernel}(&{struct}, {self.ptr(x)} + b * {step_x}, "
                          f"{self.ptr(y)} + b * {step_y}{extra});")


class Emitter:
    """The C forms of a family of op kinds. Subclasses list ``kinds`` and define ``portable``
    (every kind has one) and optionally other backends' forms."""

    kinds: tuple[str, ...] = ()

    def scratch_bytes(self, graph: Graph, op: Op, params: dict) -> int:
        """Scratch the portable form needs while the op runs."""
        return 0

    def cmsis_nn_buffer(self, graph: Graph, op: Op, params: dict, options: dict | None = None) -> str | None:
        """``host_expr;dsp_expr``: the C expressions of CMSIS-NN's scratch size for the op."""
        return None

    def specialized_scratch(self, graph: Graph, op: Op, params: dict, options: dict) -> int | None:
        """Scratch of the specialized form, None where it has no form for this op (the portable runs)."""
        return None

    def portable(self, layer: Layer) -> str:
        raise NotImplementedError


EMITTERS: dict[str, Emitter] = {}


def register(cls: type[Emitter]) -> type[Emitter]:
    instance = cls()
    for kind in cls.kinds:
        EMITTERS[kind] = instance
    return cls


def emitter(kind: str) -> Emitter:
    if kind not in EMITTERS or "portable" not in schema.spec(kind).runtimes:
        raise ValueError(f"op kind {kind} has no C emitter; the C backends lower {sorted(EMITTERS)}")
    return EMITTERS[kind]


def form(kind: str, backend: str) -> Callable[[Layer], str | None] | None:
    """The backend's form of an op kind, or None when the backend has none (the portable form runs)."""
    return getattr(emitter(kind), backend.replace("-", "_"), None)


def emit(layer: Layer, backend: str) -> str:
    """Write ``layer`` in ``backend``'s form where it has one, else the portable form; the kernel name."""
    kind = layer.op.kind
    own = form(kind, backend)
    kernel = own(layer) if own is not None else None
    return kernel if kernel is not None else emitter(kind).portable(layer)


def brace(values) -> str:
    return "{" + ", ".join(str(int(v)) for v in values) + "}"


def pad6(values, fill) -> list:
    values = list(values)
    return [fill] * (6 - len(values)) + values


def dims(n, h, w, c) -> str:
    return brace((n, h, w, c))


from mcu.emit import conv, elementwise, movement, pool, reduce  # noqa: F401  (register the emitters)
