"""The specialized backend's export-time arithmetic (kernels: mcu/c/tp_specialized.h): weights
rearranged into the order the DSP inner loops read them, per-channel requantization records
with the offsets and rounding folded in, and the bounds that prove the fast requantization exact.

Lane order: a word of four int8 values widened by SXTB16 / SXTB16 ROR #8 gives the int16 lane
pairs (v0, v2) and (v1, v3); activations are widened that way at run time, so int16 weights are
stored in that order (``REORDER``), and int8 weights stay in natural order (widened the same way).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from kernels import quant

RQ_FAST, RQ_RIGHT0, RQ_EXACT = 0, 1, 2  # tp_sp_requantize modes
DIRECT_POINTWISE, DIRECT_TAPS, DIRECT_COLUMN = 0, 1, 2  # tp_sp_conv_direct modes
MAX_TAPS = 64  # TP_SP_MAX_TAPS
REORDER = np.array([0, 2, 1, 3])  # int16 lanes of a widened group of four
WEIGHT_FORMATS = ("s16", "s8")  # int16 (doubled, no widening in the loop) or int8 (half the flash)
ACC_LIMIT = 1 << 30  # |acc| below this: 2 * acc fits int32 (the rounding high multiply's operand)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class Requantization:
    """Per output channel ``{bias, multiplier, rounding, shift}`` (int32, shape (C, 4)), the
    tp_sp_requantize mode and whether the accumulator is doubled (int16 weights stored as 2 w)."""

    records: np.ndarray
    mode: int
    doubled: bool


def requantization(bias: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, output_offset: int,
                   acc_bound: np.ndarray, want_doubled: bool) -> Requantization:
    """The records of one layer. ``acc_bound[c]`` bounds |accumulator| of channel c (bias included),
    ``want_doubled``: the kernel can accumulate 2 * acc (int16 weights stored doubled).

    TP_SP_RQ_FAST computes TFLite's MultiplyByQuantizedMultiplier(acc, M, -right) + offset as
    (SMMLAR(2 acc, M, 2^(right-1) + (offset << right) - [acc < 0])) >> right, which needs every
    channel to shift right (right >= 1), |2 acc| < 2^31 and the rounding term small enough that
    adding it cannot overflow; otherwise the reference arithmetic (TP_SP_RQ_EXACT) runs.
    """
    bias = np.asarray(bias, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    fits = bool(np.all(np.asarray(acc_bound) < ACC_LIMIT)) and bool(np.all(multiplier >= 0))
    right = -shift
    mode = RQ_EXACT
    if fits and np.all(right >= 1) and np.all(right <= 30):
        rounding = (np.int64(1) << (right - 1)) + (np.int64(output_offset) << right)
        if np.all(np.abs(rounding) < ACC_LIMIT):
            mode = RQ_FAST
    elif fits and np.all(shift == 0):
        mode, rounding = RQ_RIGHT0, np.full_like(shift, output_offset)
    if mode == RQ_EXACT:
        rounding, field, doubled = np.full_like(shift, output_offset), shift, False
    else:
        field, doubled = np.where(mode == RQ_FAST, right, 0), want_doubled
    records = np.stack([bias * (2 if doubled else 1), multiplier, rounding, field], axis=1).astype(np.int32)
    return Requantization(records, mode, doubled)


def input_magnitude(input_offset: int) -> int:
    """max |x + input_offset| over int8 x."""
    return max(abs(-128 + input_offset), abs(127 + input_offset))


def group_weights(rows: np.ndarray, fmt: str, doubled: bool) -> np.ndarray:
    """Rows of K (a multiple of 4) weights -> [group][row][4] in the kernel's lane order, flat."""
    n, k = rows.shape
    groups = rows.reshape(n, k // 4, 4)
    if fmt == "s16":
        groups = groups[:, :, REORDER].astype(np.int16) * (2 if doubled else 1)
    return np.ascontiguousarray(groups.transpose(1, 0, 2)).reshape(-1)


def block_rows(rows: np.ndarray, block: int, fmt: str, doubled: bool) -> np.ndarray:
    """Row blocks of ``block`` rows (the remainder as 1-row blocks), each grouped (group_weights)."""
    n = rows.shape[0]
    full = n - n % block
    parts = [group_weights(rows[b : b + block], fmt, doubled) for b in range(0, full, block)]
    parts += [group_weights(rows[b : b + 1], fmt, doubled) for b in range(full, n)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16 if fmt == "s16" else np.int8)


@dataclasses.dataclass(frozen=True)
class ConvColumn:
    """How one receptive field is laid out in the widened column."""

    segment: int  # input bytes per contiguous segment
    segment_padded: int
    segments: int  # segments per filter row
    column: int  # int16 values per column (k_h * segments * segment_padded)


def conv_column(k_h: int, k_w: int, in_c: int, dilation_w: int) -> ConvColumn:
    segment, segments = (k_w * in_c, 1) if dilation_w == 1 else (in_c, k_w)
    padded = round_up(segment, 4)
    return ConvColumn(segment, padded, segments, k_h * segments * padded)


def conv_weights(filt: np.ndarray, col: ConvColumn, fmt: str, doubled: bool, block: int = 2) -> np.ndarray:
    """OHWI filter -> ``block``-row blocks over the padded column (tp_sp_conv_layer.weights)."""
    oc = filt.shape[0]
    rows = filt.reshape(oc, filt.shape[1], col.segments, col.segment)
    padded = np.zeros((oc, filt.shape[1], col.segments, col.segment_padded), dtype=np.int64)
    padded[..., : col.segment] = rows
    return block_rows(padded.reshape(oc, col.column), block, fmt, doubled)


def fc_weights(w: np.ndarray, block: int, fmt: str, doubled: bool) -> np.ndarray:
    """(out, in) weights, in padded to a multiple of 4, in ``block``-row blocks."""
    out, k = w.shape
    padded = np.zeros((out, round_up(k, 4)), dtype=np.int64)
    padded[:, :k] = w
    return block_rows(padded, block, fmt, doubled)


def depthwise_weights(filt: np.ndarray, doubled: bool) -> np.ndarray:
    """(1, kh, kw, C) filter -> per channel, row and group of 4 taps the int16 pairs (w0,w2), (w1,w3)."""
    _, kh, kw, c = filt.shape
    groups = -(-kw // 4)
    taps = np.zeros((c, kh, groups * 4), dtype=np.int64)
    taps[:, :, :kw] = filt[0].transpose(2, 0, 1)
    taps = taps.reshape(c, kh, groups, 4)[..., REORDER] * (2 if doubled else 1)
    return taps.astype(np.int16).reshape(-1)


def add_tables(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's rescaled ADD inputs for every int8 value: MBQM((x + offset) << left_shift, M, shift)."""
    x = np.arange(-128, 128, dtype=np.int64)
    tables = []
    for k in (1, 2):
        shifted = ((x + p[f"input{k}_offset"]) << p["left_shift"]).astype(np.int32)
        tables.append(np.asarray(quant.multiply_by_quantized_multiplier(shifted, p[f"input{k}_multiplier"],
                                                                        p[f"input{k}_shift"]), dtype=np.int32))
    return tables[0], tables[1]


def const_bytes(graph, op) -> dict[str, int]:
    """Flash bytes of ``op``'s constants in the specialized form, per weight format."""
    t = graph.tensors
    if op.kind in ("CONV_2D", "FULLY_CONNECTED"):
        w = t[op.inputs[1]]
        k = round_up(w.size // w.shape[0], 4)
        if op.kind == "CONV_2D":
            k = conv_column(w.shape[1], w.shape[2], w.shape[3], op.options["dilation_w"]).column
        records = 16 * w.shape[0]
        return {"s16": 2 * k * w.shape[0] + records, "s8": k * w.shape[0] + records}
    if op.kind == "DEPTHWISE_CONV_2D":
        _, kh, kw, c = t[op.inputs[1]].shape
        n = 8 * kh * -(-kw // 4) * c + 16 * c
        return {"s16": n, "s8": n}
    if op.kind == "ADD":
        return {"s16": 2048, "s8": 2048}
    return {"s16": 0, "s8": 0}


def op_macs(graph, op) -> int:
    """Multiply-accumulates of one op (convs, depthwise convs, fully connected; 0 for the rest)."""
    if op.kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        return 0
    w, y = graph.tensors[op.inputs[1]], graph.tensors[op.outputs[0]]
    per_output = w.size // w.shape[0] if op.kind != "DEPTHWISE_CONV_2D" else w.shape[1] * w.shape[2]
    return int(y.size * per_output)


def macs(graph) -> int:
    """Multiply-accumulates of one inference."""
    return sum(op_macs(graph, op) for op in graph.ops)
