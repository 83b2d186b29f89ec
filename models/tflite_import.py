"""Read a ``.tflite`` flatbuffer into the graph IR (``models.ir.Graph``).

Uses the ``tflite`` package (flatbuffer accessors generated from TFLite's schema). A file that is
not a TFLite model, is truncated, or is corrupted raises ``ValueError`` naming the byte offset or
the tensor/operator being read; an operator outside ``models.schema.SCHEMA`` raises ``ValueError``
naming it and its index. Each op's options are read as its schema entry describes them, and the
imported graph is validated against the schema (shapes, dtypes, quantization) before it is
returned, so what is refused is refused here, in one line naming the op and the reason.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from models import schema
from models.ir import Graph, Op, Quantization, Tensor

try:
    import tflite
except ImportError as e:  # pragma: no cover
    raise ImportError("models.tflite_import needs the `tflite` package: pip install 'tflite>=2.18,<3'") from e

_TENSOR_TYPES = {0: "float32", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}
_TENSOR_TYPE_NAMES = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
_OP_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
_ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}
_PADDINGS = {0: "SAME", 1: "VALID"}


def load(path: str | os.PathLike) -> Graph:
    """Import a ``.tflite`` file (first subgraph) as a validated ``Graph``."""
    with open(path, "rb") as f:
        buf = f.read()
    return from_bytes(buf, name=os.path.basename(os.fspath(path)))


def from_bytes(buf: bytes, name: str = "model") -> Graph:
    """Import a TFLite flatbuffer held in memory."""
    buf = bytes(buf)
    _check_header(buf, name)
    reader = _Reader(buf, name)
    try:
        graph = reader.graph()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001  (flatbuffer accessors raise IndexError, struct.error, ... on bad offsets)
        raise ValueError(
            f"{name}: malformed .tflite flatbuffer while reading {reader.where} "
            f"(byte offset {reader.offset}): {type(e).__name__}: {e}; the file is truncated or corrupted"
        ) from None
    try:
        return graph.validate()
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _check_header(buf: bytes, name: str) -> None:
    if len(buf) < 8:
        raise ValueError(f"{name}: {len(buf)} bytes is too short for a .tflite flatbuffer (needs >= 8)")
    if buf[4:8] != b"TFL3":
        raise ValueError(
            f"{name}: bytes 4..8 are {buf[4:8]!r}, not the TFLite file identifier b'TFL3'; "
            "not a .tflite model (or a corrupted header)"
        )
    root = struct.unpack_from("<I", buf, 0)[0]
    if not 8 <= root < len(buf) - 4:
        raise ValueError(f"{name}: root table offset {root} at byte 0 points outside the {len(buf)}-byte file")


class _Reader:
    """Walks the flatbuffer; ``where``/``offset`` say what it was reading when something broke."""

    def __init__(self, buf: bytes, name: str):
        self.buf = buf
        self.name = name
        self.where = "the model table"
        self.offset = 0

    def _at(self, what: str, table) -> None:
        self.where = what
        self.offset = getattr(getattr(table, "_tab", None), "Pos", self.offset)

    def _vector(self, table, accessor: str, what: str) -> np.ndarray:
        n = getattr(table, accessor + "Length")()
        if n * 4 > len(self.buf):
            raise ValueError(f"{self.name}: {what} claims {n} entries, more than the file can hold (corrupted file)")
        return getattr(table, accessor + "AsNumpy")() if n else np.zeros(0, np.int32)

    def graph(self) -> Graph:
        model = tflite.Model.GetRootAsModel(self.buf, 0)
        self._at("the model table", model)
        if model.SubgraphsLength() < 1:
            raise ValueError(f"{self.name}: the model has no subgraph")
        if model.SubgraphsLength() > 1:
            raise ValueError(
                f"{self.name}: {model.SubgraphsLength()} subgraphs; only single-subgraph models "
                "(no control flow) are supported"
            )
        opcodes = []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            self._at(f"operator code {i}", code)
            opcodes.append(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
        sg = model.Subgraphs(0)
        self._at("subgraph 0", sg)

        tensors: list[Tensor] = []
        seen: set[str] = set()
        for i in range(sg.TensorsLength()):
            t = sg.Tensors(i)
            self._at(f"tensor {i}", t)
            tensors.append(self._tensor(model, t, i, seen))
        names = [t.name for t in tensors]

        def tensor_name(index: int, what: str) -> str | None:
            if index == -1:
                return None
            if not 0 <= index < len(names):
                raise ValueError(f"{self.name}: {what} refers to tensor {index}, but there are {len(names)} tensors")
            return names[index]

        ops = []
        for i in range(sg.OperatorsLength()):
            raw = sg.Operators(i)
            self._at(f"operator {i}", raw)
            idx = raw.OpcodeIndex()
            if not 0 <= idx < len(opcodes):
                raise ValueError(f"{self.name}: operator {i} has opcode index {idx}, but there are {len(opcodes)} operator codes")
            kind = _OP_NAMES.get(opcodes[idx], f"builtin code {opcodes[idx]}")
            self._at(f"operator {i} ({kind})", raw)
            inputs = [tensor_name(int(j), f"operator {i} ({kind}) input") for j in self._vector(raw, "Inputs", f"operator {i} inputs")]
            outputs = [tensor_name(int(j), f"operator {i} ({kind}) output") for j in self._vector(raw, "Outputs", f"operator {i} outputs")]
            by_name = {t.name: t for t in tensors}
            ops.append(_convert_op(self.name, i, kind, raw, inputs, outputs, by_name))

        graph_inputs = [tensor_name(int(j), "subgraph input") for j in self._vector(sg, "Inputs", "subgraph inputs")]
        graph_outputs = [tensor_name(int(j), "subgraph output") for j in self._vector(sg, "Outputs", "subgraph outputs")]
        used = set(graph_inputs) | set(graph_outputs)
        for op in ops:
            used.update(n for n in op.inputs + op.outputs if n is not None)
        graph_name = os.path.splitext(self.name)[0]
        return Graph(
            tensors={t.name: t for t in tensors if t.name in used},
            ops=ops,
            inputs=graph_inputs,
            outputs=graph_outputs,
            name=graph_name,
            metadata={"source": self.name, "tflite_tensor_index": {t.name: i for i, t in enumerate(tensors)}},
        )

    def _tensor(self, model, t, index: int, seen: set[str]) -> Tensor:
        type_code = t.Type()
        if type_code not in _TENSOR_TYPES:
            raise ValueError(
                f"{self.name}: tensor {index} has type {_TENSOR_TYPE_NAMES.get(type_code, type_code)}, "
                f"not one of {sorted(_TENSOR_TYPES.values())}"
            )
        dtype = _TENSOR_TYPES[type_code]
        name = (t.Name() or b"").decode("utf-8", "replace") or f"tensor_{index}"
        if name in seen:
            name = f"{name}#{index}"
        seen.add(name)
        shape = tuple(int(d) for d in self._vector(t, "Shape", f"tensor {index} shape"))
        if any(d < 0 for d in shape):
            raise ValueError(f"{self.name}: tensor {index} ({name!r}) has dynamic shape {shape}; only static shapes are supported")

        quant = None
        q = t.Quantization()
        if q is not None and q.ScaleLength() > 0:
            scale = self._vector(q, "Scale", f"tensor {index} scales").astype(np.float32)
            zero_point = self._vector(q, "ZeroPoint", f"tensor {index} zero points").astype(np.int64)
            if zero_point.size == 0:
                zero_point = np.zeros_like(scale, dtype=np.int64)
            if zero_point.size != scale.size:
                raise ValueError(f"{self.name}: tensor {index} ({name!r}) has {scale.size} scales but {zero_point.size} zero points")
            quant = Quantization(scale, zero_point, int(q.QuantizedDimension()))

        data = None
        b = t.Buffer()
        if not 0 <= b < model.BuffersLength():
            raise ValueError(f"{self.name}: tensor {index} ({name!r}) refers to buffer {b}, but there are {model.BuffersLength()} buffers")
        if b != 0:
            buffer = model.Buffers(b)
            self._at(f"buffer {b} of tensor {index} ({name!r})", buffer)
            if buffer.Offset() > 1:  # large models keep buffers after the flatbuffer
                start, size = int(buffer.Offset()), int(buffer.Size())
                if start + size > len(self.buf):
                    raise ValueError(f"{self.name}: buffer {b} at offset {start} (+{size} B) is past the end of the file")
                raw = np.frombuffer(self.buf, np.uint8, size, start)
            else:
                n = buffer.DataLength()
                start = buffer._tab.Vector(buffer._tab.Offset(4)) if n else 0
                if start + n > len(self.buf):
                    raise ValueError(f"{self.name}: buffer {b} at offset {start} (+{n} B) is past the end of the "
                                     f"{len(self.buf)}-byte file (truncated or corrupted file)")
                raw = buffer.DataAsNumpy() if n else None
            if raw is not None and len(raw):
                expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                if len(raw) != expected:
                    raise ValueError(
                        f"{self.name}: tensor {index} ({name!r}) is {dtype}{list(shape)} ({expected} B) but its "
                        f"buffer {b} holds {len(raw)} B"
                    )
                data = np.frombuffer(bytes(raw), dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
        return Tensor(name=name, shape=shape, dtype=dtype, quantization=quant, data=data)


def _activation(code: int, where: str) -> str:
    if code not in _ACTIVATIONS:
        name = {4: "TANH", 5: "SIGN_BIT"}.get(code, f"code {code}")
        raise ValueError(f"{where}: fused activation {name} is not supported (NONE, RELU, RELU_N1_TO_1, RELU6 are)")
    return _ACTIVATIONS[code]


def _padding(code: int, where: str) -> str:
    if code not in _PADDINGS:
        raise ValueError(f"{where}: padding code {code} is not SAME (0) or VALID (1)")
    return _PADDINGS[code]


_DEFAULTS = {"int": 0, "bool": False, "float": 0.0, "activation": "NONE", "padding": "SAME", "int_vector": ()}


def _decode(option: schema.Option, table, where: str):
    if table is None:
        return _DEFAULTS[option.codec]
    if option.codec == "int_vector":
        n = getattr(table, option.tflite + "Length")()
        return tuple(int(v) for v in getattr(table, option.tflite + "AsNumpy")()) if n else ()
    value = getattr(table, option.tflite)()
    if option.codec == "activation":
        return _activation(value, where)
    if option.codec == "padding":
        return _padding(value, where)
    return {"int": int, "bool": bool, "float": float}[option.codec](value)


def _constant(tensors: dict[str, Tensor], name: str | None, where: str) -> np.ndarray:
    if name is None or tensors[name].data is None:
        raise ValueError(f"{where}: operand {name!r} must be a constant tensor (dynamic shapes are not supported)")
    if tensors[name].dtype not in ("int32", "int64"):
        raise ValueError(f"{where}: operand {name!r} is {tensors[name].dtype}; expected int32")
    return tensors[name].data


def _rank(tensors: dict[str, Tensor], name: str | None, where: str) -> int:
    rank = len(tensors[name].shape) if name is not None else 0
    if rank == 0:
        raise ValueError(f"{where}: tensor {name!r} has no dimensions to index")
    return rank


def _operand_option(option: str, tensors, inputs, outputs, where: str):
    """The option TFLite stores as a constant second input (or, for RESHAPE, the output shape)."""
    if option == "new_shape":
        return tensors[outputs[0]].shape
    raw = _constant(tensors, inputs[1] if len(inputs) > 1 else None, where).reshape(-1)
    if option == "paddings":
        if raw.size % 2:
            raise ValueError(f"{where}: paddings operand has {raw.size} values, not (before, after) pairs")
        return tuple((int(a), int(b)) for a, b in raw.reshape(-1, 2))
    if option == "axes":
        rank = _rank(tensors, inputs[0], where)
        return tuple(sorted({int(a) % rank for a in raw}))
    if option == "axis":  # EXPAND_DIMS: one axis in [-rank - 1, rank]
        if raw.size != 1:
            raise ValueError(f"{where}: axis operand has {raw.size} values, expected 1")
        rank = len(tensors[inputs[0]].shape)
        return int(raw[0]) + rank + 1 if int(raw[0]) < 0 else int(raw[0])
    return tuple(int(v) for v in raw)


def _convert_op(model: str, index: int, kind: str, raw, inputs, outputs, tensors) -> Op:
    where = f"{model}: operator {index} ({kind})"
    if kind not in schema.SCHEMA:
        raise ValueError(f"{where}: unsupported operator {kind}; supported: {', '.join(schema.SCHEMA)}")
    spec = schema.SCHEMA[kind]
    if spec.tflite_options is not None and raw.BuiltinOptions() is not None:
        expected = getattr(tflite.BuiltinOptions, spec.tflite_options)
        if raw.BuiltinOptionsType() != expected:
            raise ValueError(f"{where}: options table type {raw.BuiltinOptionsType()} is not {spec.tflite_options} "
                             f"({expected})")
        table = getattr(tflite, spec.tflite_options)()
        table.Init(raw.BuiltinOptions().Bytes, raw.BuiltinOptions().Pos)
    else:
        table = None
    options = {o.name: _decode(o, table, where) for o in spec.options if o.tflite}
    if spec.tflite_operand is not None:
        options[spec.tflite_operand] = _operand_option(spec.tflite_operand, tensors, inputs, outputs, where)
        inputs = inputs[:1]
    if kind == "FULLY_CONNECTED" and table is not None and table.WeightsFormat() != 0:
        raise ValueError(f"{where}: shuffled weights format {table.WeightsFormat()} is not supported")
    if kind == "CONCATENATION":
        options["axis"] = options["axis"] % _rank(tensors, outputs[0] if outputs else None, where)
    if kind == "SQUEEZE" and inputs:
        rank = _rank(tensors, inputs[0], where)
        options["squeeze_dims"] = tuple(sorted({d % rank for d in options["squeeze_dims"]}))
    if schema.has(kind, schema.WEIGHTED):
        inputs = inputs[:3]
    return Op(kind, inputs, outputs, options)
