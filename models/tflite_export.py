"""Write the graph IR back to a ``.tflite`` flatbuffer (the inverse of ``models.tflite_import``).

With it, any graph (post-training-quantized JAX models, hand-built test graphs) runs in TFLite
Micro, the oracle the int8 executor is checked against. Each op's options are written as its
schema entry (``models.schema``) describes them; shape-like options (PAD's paddings, RESHAPE's
shape, MEAN's axes, TRANSPOSE's permutation, RESIZE's size, EXPAND_DIMS's axis) become int32
constant inputs again, as TFLite expects.
"""
from __future__ import annotations

import flatbuffers
import numpy as np
import tflite

from models import schema
from models.ir import Graph, Op, Tensor

_TYPE_CODES = {"float32": 0, "int32": 2, "uint8": 3, "int64": 4, "bool": 6, "int16": 7, "int8": 9}
_ACTIVATION_CODES = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}
_PADDING_CODES = {"SAME": 0, "VALID": 1}


def _vector(b: flatbuffers.Builder, start_fn, values, prepend: str):
    start_fn(b, len(values))
    for v in reversed(values):
        getattr(b, prepend)(v)
    return b.EndVector()


def _int_vector(b, start_fn, values):
    return _vector(b, start_fn, [int(v) for v in values], "PrependInt32")


def _byte_vector(b: flatbuffers.Builder, data: bytes):
    b.StartVector(1, len(data), 16)  # 16-byte alignment: TFLite Micro reads weights in place
    b.head = b.head - len(data)
    b.Bytes[b.head:b.head + len(data)] = data
    return b.EndVector()


def _shape_operands(op: Op) -> list[np.ndarray]:
    """The int32 constant operand TFLite wants after the data input, from the IR's options."""
    option = schema.spec(op.kind).tflite_operand
    if option is None:
        return []
    value = np.array(op.options[option], np.int32)
    return [value.reshape(-1, 2) if option == "paddings" else value.reshape(-1)]


def _encode(option: schema.Option, value):
    if option.codec == "activation":
        return _ACTIVATION_CODES[value]
    if option.codec == "padding":
        return _PADDING_CODES[value]
    return {"int": int, "bool": bool, "float": float}[option.codec](value)


def _options(b: flatbuffers.Builder, op: Op):
    """(BuiltinOptions union type, table offset) for ``op``, as its schema entry describes it."""
    spec = schema.spec(op.kind)
    table = spec.tflite_options
    if table is None:
        return tflite.BuiltinOptions.NONE, 0
    fields = [o for o in spec.options if o.tflite]
    vectors = {o.name: _int_vector(b, getattr(tflite, f"{table}Start{o.tflite}Vector"), op.options[o.name])
               for o in fields if o.codec == "int_vector"}
    getattr(tflite, f"{table}Start")(b)
    for o in fields:
        value = vectors[o.name] if o.name in vectors else _encode(o, op.options[o.name])
        getattr(tflite, f"{table}Add{o.tflite}")(b, value)
    return getattr(tflite.BuiltinOptions, table), getattr(tflite, f"{table}End")(b)


def to_bytes(graph: Graph) -> bytes:
    """Serialize a validated graph as a single-subgraph TFLite model (schema version 3)."""
    graph.validate()
    tensors: list[Tensor] = list(graph.tensors.values())
    index = {t.name: i for i, t in enumerate(tensors)}
    op_inputs: list[list[int]] = []
    for op in graph.ops:
        ins = [-1 if n is None else index[n] for n in op.inputs]
        for k, value in enumerate(_shape_operands(op)):
            name = f"{op.name}/shape_operand_{k}"
            index[name] = len(tensors)
            tensors.append(Tensor(name, value.shape, "int32", None, value))
            ins.append(index[name])
        op_inputs.append(ins)

    b = flatbuffers.Builder(1 << 20)
    # Buffers: 0 is the empty sentinel; each constant gets its own.
    buffer_of: dict[int, int] = {}
    buffer_data: list[bytes] = [b""]
    for i, t in enumerate(tensors):
        if t.is_constant:
            buffer_of[i] = len(buffer_data)
            buffer_data.append(np.ascontiguousarray(t.data).astype(np.dtype(t.dtype).newbyteorder("<")).tobytes())
    buffer_offsets = []
    for data in buffer_data:
        data_vec = _byte_vector(b, data) if data else None
        tflite.BufferStart(b)
        if data_vec is not None:
            tflite.BufferAddData(b, data_vec)
        buffer_offsets.append(tflite.BufferEnd(b))

    tensor_offsets = []
    for i, t in enumerate(tensors):
        name = b.CreateString(t.name)
        shape = _int_vector(b, tflite.TensorStartShapeVector, t.shape)
        quant = None
        if t.quantization is not None:
            q = t.quantization
            scale = _vector(b, tflite.QuantizationParametersStartScaleVector, [float(s) for s in q.scale], "PrependFloat32")
            zp = _vector(b, tflite.QuantizationParametersStartZeroPointVector, [int(z) for z in q.zero_point], "PrependInt64")
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale)
            tflite.QuantizationParametersAddZeroPoint(b, zp)
            tflite.QuantizationParametersAddQuantizedDimension(b, q.quantized_dimension)
            quant = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, _TYPE_CODES[t.dtype])
        tflite.TensorAddBuffer(b, buffer_of.get(i, 0))
        tflite.TensorAddName(b, name)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        tensor_offsets.append(tflite.TensorEnd(b))

    kinds = sorted({op.kind for op in graph.ops})
    codes = {kind: getattr(tflite.BuiltinOperator, kind) for kind in kinds}
    operator_offsets = []
    for op, ins in zip(graph.ops, op_inputs):
        inputs = _int_vector(b, tflite.OperatorStartInputsVector, ins)
        outputs = _int_vector(b, tflite.OperatorStartOutputsVector, [index[n] for n in op.outputs])
        options_type, options = _options(b, op)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, kinds.index(op.kind))
        tflite.OperatorAddInputs(b, inputs)
        tflite.OperatorAddOutputs(b, outputs)
        tflite.OperatorAddBuiltinOptionsType(b, options_type)
        if options:
            tflite.OperatorAddBuiltinOptions(b, options)
        operator_offsets.append(tflite.OperatorEnd(b))

    def table_vector(start_fn, offsets):
        start_fn(b, len(offsets))
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    sg_tensors = table_vector(tflite.SubGraphStartTensorsVector, tensor_offsets)
    sg_ops = table_vector(tflite.SubGraphStartOperatorsVector, operator_offsets)
    sg_inputs = _int_vector(b, tflite.SubGraphStartInputsVector, [index[n] for n in graph.inputs])
    sg_outputs = _int_vector(b, tflite.SubGraphStartOutputsVector, [index[n] for n in graph.outputs])
    sg_name = b.CreateString(graph.name)
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, sg_tensors)
    tflite.SubGraphAddOperators(b, sg_ops)
    tflite.SubGraphAddInputs(b, sg_inputs)
    tflite.SubGraphAddOutputs(b, sg_outputs)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)

    code_offsets = []
    for kind in kinds:
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(codes[kind], 127))
        tflite.OperatorCodeAddBuiltinCode(b, codes[kind])
        tflite.OperatorCodeAddVersion(b, 1)
        code_offsets.append(tflite.OperatorCodeEnd(b))

    subgraphs = table_vector(tflite.ModelStartSubgraphsVector, [subgraph])
    opcodes = table_vector(tflite.ModelStartOperatorCodesVector, code_offsets)
    buffers = table_vector(tflite.ModelStartBuffersVector, buffer_offsets)
    description = b.CreateString("TinyPallas graph IR export")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, opcodes)
    tflite.ModelAddSubgraphs(b, subgraphs)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def save(graph: Graph, path) -> None:
    with open(path, "wb") as f:
        f.write(to_bytes(graph))
