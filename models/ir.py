"""The quantized graph IR: tensors with TFLite-style quantization, ops in topological order.

One graph feeds every runtime: the int8 Pallas executor (``models.execute``) and the MCU C
generator (``mcu/``). Importers (``models.tflite_import``) and post-training quantization
(``models.ptq``) produce it. Numerics follow TFLite (see ``models.quantization``).

Conventions (the same as TFLite's, so a .tflite file maps one to one):

* Activations are NHWC; the leading dimension is the batch (1 in an imported file; the
  executor runs any batch size).
* CONV_2D filters are ``(out_channels, kh, kw, in_channels)`` (OHWI); DEPTHWISE_CONV_2D
  filters are ``(1, kh, kw, in_channels * depth_multiplier)``; FULLY_CONNECTED weights are
  ``(out_features, in_features)``. Biases are int32 with scale ``input_scale * weight_scale``
  and zero point 0.
* Real value = ``scale * (q - zero_point)``. Per-channel quantization (filters) has one
  scale/zero point per index of ``quantized_dimension``.
* Shape-like operands of an op (PAD's paddings, RESHAPE's new shape, MEAN's axes,
  TRANSPOSE's permutation, RESIZE_NEAREST_NEIGHBOR's size) are static: they are stored,
  resolved, in ``Op.options`` and are NOT in ``Op.inputs``. ``Op.inputs`` holds only the
  tensors whose values the op reads (activations, weights, biases).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DTYPES = ("int8", "uint8", "int16", "int32", "int64", "float32", "bool")

ACTIVATIONS = ("NONE", "RELU", "RELU6", "RELU_N1_TO_1")
PADDINGS = ("SAME", "VALID")

@dataclasses.dataclass
class Quantization:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``.

    scale:               float32 array, shape ``(1,)`` (per-tensor) or ``(C,)`` (per-channel).
    zero_point:          int64 array of the same shape as ``scale``.
    quantized_dimension: the axis that ``C`` indexes when per-channel (TFLite: 0 for CONV_2D
                         filters, 3 for DEPTHWISE_CONV_2D filters); ignored when per-tensor.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    quantized_dimension: int = 0

    def __post_init__(self):
        self.scale = np.atleast_1d(np.asarray(self.scale, dtype=np.float32))
        self.zero_point = np.atleast_1d(np.asarray(self.zero_point, dtype=np.int64))
        if self.scale.shape != self.zero_point.shape or self.scale.ndim != 1 or self.scale.size == 0:
            raise ValueError(
                f"Quantization needs 1-D scale and zero_point of the same non-zero length, got "
                f"scale {self.scale.shape} and zero_point {self.zero_point.shape}"
            )

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    @property
    def scalar_scale(self) -> float:
        """The per-tensor scale (a Python float); raises for per-channel quantization."""
        if self.per_channel:
            raise ValueError(f"per-channel quantization ({self.scale.size} scales) has no single scale")
        return float(self.scale[0])

    @property
    def scalar_zero_point(self) -> int:
        if self.per_channel:
            raise ValueError(f"per-channel quantization ({self.zero_point.size} zero points) has no single zero point")
        return int(self.zero_point[0])


@dataclasses.dataclass
class Tensor:
    """A value in the graph.

    name:         unique within the graph; ops refer to tensors by name.
    shape:        static shape (tuple of ints); activations have the batch first.
    dtype:        one of ``DTYPES`` (numpy dtype name).
    quantization: ``None`` for float tensors (and unquantized int32 shape tensors).
    data:         numpy array (of ``dtype`` and ``shape``) for constants (weights, biases);
                  ``None`` for activations.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: Quantization | None = None
    data: np.ndarray | None = None

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


@dataclasses.dataclass
class Op:
    """One operator.

    kind:    TFLite builtin name, a key of ``models.schema.SCHEMA`` (``"CONV_2D"``, ``"ADD"``, ...).
    inputs:  tensor names, in TFLite's order (e.g. input, filter, bias); ``None`` marks an
             absent optional input (a conv without bias).
    outputs: tensor names.
    options: the op's static attributes, as listed in the kind's schema entry:
             stride_h/stride_w/dilation_h/dilation_w/filter_h/filter_w/depth_multiplier (int),
             padding ("SAME" | "VALID"), activation (one of ``ACTIVATIONS``, the fused
             activation), keep_num_dims/keep_dims/align_corners/half_pixel_centers (bool),
             axes/new_shape/perm/size/squeeze_dims (tuple of int), paddings (tuple of
             (before, after) per dim), axis (int), beta/alpha (float).
    name:    a readable label (the output tensor's name by default), used in error messages
             and the per-layer diff.
    """

    kind: str
    inputs: list[str | None]
    outputs: list[str]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        if not self.name and self.outputs:
            self.name = self.outputs[0]


@dataclasses.dataclass
class Graph:
    """A whole model: ``tensors`` by name, ``ops`` in topological order, graph inputs/outputs.

    metadata: free-form provenance; the .tflite importer sets ``"tflite_tensor_index"``
    ({tensor name: index in the file's subgraph}) and ``"source"`` (the file name).
    """

    tensors: dict[str, Tensor]
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]
    name: str = "graph"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"graph {self.name!r} has no tensor named {name!r}") from None

    def producer(self) -> dict[str, int]:
        """Map tensor name -> index of the op that writes it."""
        return {out: i for i, op in enumerate(self.ops) for out in op.outputs}

    def consumers(self) -> dict[str, list[int]]:
        """Map tensor name -> indices of the ops that read it (in order)."""
        users: dict[str, list[int]] = {name: [] for name in self.tensors}
        for i, op in enumerate(self.ops):
            for name in op.inputs:
                if name is not None:
                    users[name].append(i)
        return users

    def op_kinds(self) -> dict[str, int]:
        """How many ops of each kind, e.g. ``{"CONV_2D": 14, ...}``."""
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.kind] = counts.get(op.kind, 0) + 1
        return counts

    def validate(self) -> Graph:
        """Check the graph is well formed; raise ``ValueError`` naming the op/tensor if not.

        Checks: every tensor's name, dtype, shape (rank and size limits of ``models.schema``),
        constant data and per-channel quantization; every name refers to a tensor; each
        tensor is written once, constants and graph inputs never; ops are topologically
        ordered (inputs produced before use); and every op against its schema entry
        (``models.schema.check_op``: operands, options, output shape, dtypes, quantization).
        Returns the graph so ``Graph(...).validate()`` chains.
        """
        from models import schema

        for name, t in self.tensors.items():
            where = f"tensor {name!r}"
            if t.name != name:
                raise ValueError(f"{where} is stored under a different name ({t.name!r})")
            if t.dtype not in DTYPES:
                raise ValueError(f"{where} has dtype {t.dtype!r}; expected one of {DTYPES}")
            schema.check_tensor(t)
            if t.data is not None and (tuple(t.data.shape) != t.shape or str(t.data.dtype) != t.dtype):
                raise ValueError(
                    f"{where}: constant data is {t.data.dtype}{list(t.data.shape)} but the tensor "
                    f"declares {t.dtype}{list(t.shape)}"
                )
            q = t.quantization
            if q is not None and q.per_channel:
                if not 0 <= q.quantized_dimension < len(t.shape):
                    raise ValueError(f"{where}: quantized_dimension {q.quantized_dimension} out of range for shape {t.shape}")
                if t.shape[q.quantized_dimension] != q.scale.size:
                    raise ValueError(
                        f"{where}: {q.scale.size} per-channel scales but dimension {q.quantized_dimension} "
                        f"has size {t.shape[q.quantized_dimension]}"
                    )
        for name in self.inputs + self.outputs:
            if name not in self.tensors:
                raise ValueError(f"graph input/output {name!r} is not a tensor of the graph")
        if not self.inputs:
            raise ValueError(f"graph {self.name!r} has no inputs")
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"graph inputs {self.inputs} name a tensor twice")
        for name in self.inputs + self.outputs:
            if self.tensors[name].is_constant:
                side = "input" if name in self.inputs else "output"
                raise ValueError(f"graph {side} {name!r} is a constant; graph inputs and outputs are computed tensors")
        available = {n for n, t in self.tensors.items() if t.is_constant} | set(self.inputs)
        for i, op in enumerate(self.ops):
            where = f"op {i} ({op.kind} {op.name!r})"
            for name in op.inputs:
                if name is None:
                    continue
                if name not in self.tensors:
                    raise ValueError(f"{where}: input {name!r} is not a tensor of the graph")
                if name not in available:
                    raise ValueError(f"{where}: input {name!r} is used before it is produced (ops out of order?)")
            for name in op.outputs:
                if name not in self.tensors:
                    raise ValueError(f"{where}: output {name!r} is not a tensor of the graph")
                if name in available:
                    raise ValueError(f"{where}: output {name!r} is already a constant, graph input or another op's output")
                available.add(name)
            schema.check_op(self, i, op)
        for name in self.outputs:
            if name not in available:
                raise ValueError(f"graph output {name!r} is never produced")
        return self

    def summary(self) -> str:
        """A one-line-per-op table: index, kind, output shape/dtype, quantization."""
        lines = [f"graph {self.name!r}: {len(self.ops)} ops, inputs {self.inputs}, outputs {self.outputs}"]
        for i, op in enumerate(self.ops):
            t = self.tensors[op.outputs[0]]
            q = t.quantization
            qs = "" if q is None else f" s={q.scale[0]:.6g} zp={int(q.zero_point[0])}"
            lines.append(f"{i:3d} {op.kind:24s} -> {t.dtype}{list(t.shape)}{qs}")
        return "\n".join(lines)
