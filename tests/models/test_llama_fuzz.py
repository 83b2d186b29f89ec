"""Damaged inputs: GGUF mutants and bad command lines end in one clear error, never anything else.

Every mutant of a valid tiny GGUF file (header fields, metadata values and types, tensor shapes,
types and offsets, truncation, bit flips, metadata that describes an impossible model) is loaded by
``models.llama.load`` in a child process: it must load, or raise one single-line ValueError. Any
other exception, a signal or a hang fails the test and names the mutant. A quick run is part of
the default suite; ``-m slow`` runs 400 mutants.
"""
from __future__ import annotations

import math
import pathlib
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest

from models.llama import __main__ as cli
from models.llama import config as llama_config
from models.llama import gguf_loader, peers
from tests.models.test_llama import TYPES, write_tiny_gguf

REPO = pathlib.Path(__file__).resolve().parents[2]


class Loader:
    """Runs in the child: load a file, report 'ok' or the ValueError's message."""

    def load(self, path: str) -> tuple[str, str]:
        from models.llama import load

        try:
            load(path)
        except ValueError as e:
            return "ValueError", str(e)
        return "ok", ""


# ---------------------------------------------------------------------------------------------
# The file's fields and where they are (a walk over the GGUF layout), to mutate them one at a time
# ---------------------------------------------------------------------------------------------

def fields(data: bytes) -> list[tuple[str, int, str]]:
    """(description, offset, struct format) of every scalar field of the header, metadata and tensor infos."""
    out = [("version", 4, "<I"), ("tensor count", 8, "<Q"), ("metadata count", 16, "<Q")]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fmts = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}

    def string(what):
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        out.append((f"length of {what}", pos, "<Q"))
        pos += 8
        text = data[pos:pos + n].decode()
        pos += n
        return text

    for _ in range(n_kv):
        key = string("a key")
        vtype = struct.unpack_from("<I", data, pos)[0]
        out.append((f"value type of {key}", pos, "<I"))
        pos += 4
        if vtype == 8:
            string(key)
        elif vtype == 9:
            etype, count = struct.unpack_from("<IQ", data, pos)
            out += [(f"element type of {key}", pos, "<I"), (f"element count of {key}", pos + 4, "<Q")]
            pos += 12
            for i in range(count):
                if etype == 8:
                    string(f"element {i} of {key}")
                else:
                    if i < 4:
                        out.append((f"element {i} of {key}", pos, fmts[etype]))
                    pos += sizes[etype]
        else:
            out.append((f"value of {key}", pos, fmts[vtype]))
            pos += sizes[vtype]
    for _ in range(n_tensors):
        name = string("a tensor name")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        out.append((f"dimension count of {name}", pos, "<I"))
        pos += 4
        for d in range(n_dims):
            out.append((f"dimension {d} of {name}", pos, "<Q"))
            pos += 8
        out += [(f"type of {name}", pos, "<I"), (f"data offset of {name}", pos + 4, "<Q")]
        pos += 12
    return out


EXTREMES = {"<B": [0, 1, 255], "<b": [0, -1, 127, -128], "<H": [0, 65535], "<h": [0, -1, 32767],
            "<I": [0, 1, 7, 99, 2**31, 2**32 - 1], "<i": [0, -1, 2**31 - 1, -2**31],
            "<Q": [0, 1, 3, 2**31, 2**40, 2**63, 2**64 - 1], "<q": [0, -1, 2**62, -2**63],
            "<f": [0.0, -1.0, math.nan, math.inf, 1e30], "<d": [0.0, -1.0, math.nan, math.inf]}


def _semantic_mutants(folder: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """Well-formed files whose metadata describes an impossible or inconsistent model."""
    cfg = llama_config.tiny()
    cases = {
        "head_count 0": {"head_count": 0}, "head_count 3 (dim 64)": {"head_count": 3},
        "head_count_kv 3": {"head_count_kv": 3}, "embedding_length 32": {"embedding_length": 32},
        "block_count 1000": {"block_count": 1000}, "block_count 1": {"block_count": 1},
        "feed_forward_length 64": {"feed_forward_length": 64}, "context_length 0": {"context_length": 0},
        "rope.freq_base -1": {"rope_freq_base": -1.0}, "rms eps nan": {"rms_eps": math.nan},
        "attn_k shape": {"attn_k_rows": cfg.n_kv_heads * cfg.head_dim * 2},
        "ffn_up Q5_0": {"types": {**TYPES, "ffn_up": "Q5_0"}}, "norm as Q8_0": {"norm_type": "Q8_0"},
        "no tokens": {"tokens": None}, "tokens as ints": {"tokens": "ints"}, "arch gpt2": {"arch": "gpt2"},
    }
    out = []
    for name, overrides in cases.items():
        path = folder / f"semantic-{len(out)}.gguf"
        _write_variant(path, **overrides)
        out.append((f"metadata: {name}", path))
    return out


def _write_variant(path, *, arch="llama", head_count=None, head_count_kv=None, embedding_length=None,
                   block_count=None, feed_forward_length=None, context_length=None, rope_freq_base=None,
                   rms_eps=None, attn_k_rows=None, types=TYPES, norm_type="F32", tokens="strings"):
    cfg = llama_config.tiny()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers if block_count is None else block_count)
    w.add_context_length(cfg.max_seq_len if context_length is None else context_length)
    w.add_embedding_length(cfg.dim if embedding_length is None else embedding_length)
    w.add_feed_forward_length(cfg.ffn_dim if feed_forward_length is None else feed_forward_length)
    w.add_head_count(cfg.n_heads if head_count is None else head_count)
    w.add_head_count_kv(cfg.n_kv_heads if head_count_kv is None else head_count_kv)
    w.add_layer_norm_rms_eps(cfg.norm_eps if rms_eps is None else rms_eps)
    w.add_rope_freq_base(cfg.rope_theta if rope_freq_base is None else rope_freq_base)
    w.add_tokenizer_model("gpt2")
    if tokens == "strings":
        w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    elif tokens == "ints":
        w.add_array("tokenizer.ggml.tokens", list(range(cfg.vocab_size)))
    w.add_token_merges([])
    hd = cfg.head_dim
    shapes = {"attn_q": (cfg.n_heads * hd, cfg.dim), "attn_k": (attn_k_rows or cfg.n_kv_heads * hd, cfg.dim),
              "attn_v": (cfg.n_kv_heads * hd, cfg.dim), "attn_output": (cfg.dim, cfg.dim),
              "ffn_gate": (cfg.ffn_dim, cfg.dim), "ffn_up": (cfg.ffn_dim, cfg.dim), "ffn_down": (cfg.dim, cfg.ffn_dim)}

    def add(name, array, kind):
        qtype = gguf.GGMLQuantizationType[kind]
        data = array.astype(np.float32 if kind == "F32" else np.float16) if kind in ("F32", "F16") else \
            gguf.quants.quantize(array.astype(np.float32), qtype)
        w.add_tensor(name, data, raw_dtype=qtype)

    add("token_embd.weight", rng.normal(size=(cfg.vocab_size, cfg.dim)), "Q8_0")
    add("output_norm.weight", 1 + 0.1 * rng.normal(size=(cfg.dim,)), "F32")
    for i in range(cfg.n_layers):
        for name, shape in shapes.items():
            kind = types[name] if types[name] not in ("BF16",) else "F16"
            add(f"blk.{i}.{name}.weight", rng.normal(size=shape) * 0.1, kind)
        for norm in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{norm}.weight", 1 + 0.1 * rng.normal(size=(cfg.dim,)), norm_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mutants(base: pathlib.Path, folder: pathlib.Path, count: int, seed: int = 0) -> list[tuple[str, pathlib.Path]]:
    """``count`` mutants of ``base``: field values, truncations, bit flips, and semantic variants."""
    data = base.read_bytes()
    field_list = fields(data)
    rng = np.random.default_rng(seed)
    out = _semantic_mutants(folder)
    header_end = max(off for _, off, _ in field_list) + 16
    while len(out) < count:
        kind = rng.choice(["field", "field", "field", "truncate", "flip", "flip_header"])
        buf = bytearray(data)
        if kind == "field":
            what, off, fmt = field_list[rng.integers(len(field_list))]
            choices = EXTREMES[fmt]
            value = choices[rng.integers(len(choices))]
            struct.pack_into(fmt, buf, off, value)
            desc = f"{what} = {value}"
        elif kind == "truncate":
            cut = int(rng.integers(0, len(data)))
            buf = buf[:cut]
            desc = f"truncated to {cut} bytes"
        else:
            hi = header_end if kind == "flip_header" else len(data)
            flips = [(int(rng.integers(hi)), int(rng.integers(8))) for _ in range(int(rng.integers(1, 9)))]
            for pos, bit in flips:
                buf[pos] ^= 1 << bit
            desc = f"bit flips at {flips}"
        path = folder / f"mutant-{len(out)}.gguf"
        path.write_bytes(bytes(buf))
        out.append((desc, path))
    return out


def _run_mutants(tmp_path, count: int, seed: int) -> None:
    base = tmp_path / "base.gguf"
    write_tiny_gguf(base)
    cases = mutants(base, tmp_path, count, seed)
    assert len(cases) >= count
    failures, outcomes = [], {"ok": 0, "ValueError": 0}
    worker = None
    try:
        for desc, path in cases:
            if worker is None:
                worker = peers.Peer("GGUF loader", "tests.models.test_llama_fuzz:Loader", timeout=120)
            try:
                status, message = worker.call("load", str(path))
            except peers.PeerError as e:  # another exception, a signal or a hang: all failures
                failures.append(f"{desc}: {e}")
                worker.close()
                worker = None
                continue
            outcomes[status] += 1
            if status == "ValueError" and (not message or "\n" in message):
                failures.append(f"{desc}: the ValueError is not one line: {message!r}")
    finally:
        if worker is not None:
            worker.close()
    assert not failures, f"{len(failures)} of {len(cases)} mutants failed badly:\n" + "\n".join(failures[:20])
    assert outcomes["ValueError"] > len(cases) // 4, outcomes  # the mutations do reach the checks


def test_gguf_mutants_load_or_raise_one_clear_value_error(tmp_path):
    _run_mutants(tmp_path, count=48, seed=1)


@pytest.mark.slow
def test_gguf_mutants_long_run(tmp_path):
    _run_mutants(tmp_path, count=400, seed=2)


def test_gguf_tensor_shape_checked_against_the_config_names_the_tensor(tmp_path):
    path = tmp_path / "bad_k.gguf"
    _write_variant(path, attn_k_rows=64)
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.attn_k\.weight' has shape \[64, 64\].*needs \[64, 32\]"):
        gguf_loader.load_gguf(path)


def test_gguf_impossible_metadata_is_a_value_error(tmp_path):
    for overrides, pattern in (({"head_count": 0}, "must be positive"), ({"rms_eps": math.nan}, "not a finite"),
                               ({"block_count": 1000}, "lacks tensor 'blk.2")):
        path = tmp_path / "m.gguf"
        _write_variant(path, **overrides)
        with pytest.raises(ValueError, match=pattern):
            gguf_loader.load_gguf(path)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--max-tokens", "-3"], "--max-tokens -3 must be >= 1"),
    (["--max-tokens", "0"], "must be >= 1"),
    (["--max-tokens", "many"], "invalid int value"),
    (["--temperature", "-0.5"], "--temperature -0.5"),
    (["--temperature", "nan"], "finite"),
    (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    (["--top-p", "1.5"], "must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k -1"),
    (["--path", "gpu"], "invalid choice: 'gpu'"),
    (["--dtype", "int3"], "invalid choice: 'int3'"),
    (["--model", "/nonexistent/model.gguf"], "does not exist"),
    (["--prompt", ""], "--prompt is empty"),
    (["--path", "cpu", "--dtype", "bfloat16"], "runs in float32"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_cli_bad_arguments_print_one_error_line_and_exit_2(extra, message, capsys):
    argv = ["generate", "--prompt", "hi"] + extra
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_cli_bad_model_files_print_one_error_line_and_exit_2(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.gguf"
    base = tmp_path / "base.gguf"
    write_tiny_gguf(base)
    corrupt.write_bytes(base.read_bytes()[:5000])
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    for model, message in ((corrupt, "corrupt or truncated"), (not_gguf, "not a GGUF file"),
                           (empty_dir, "no config.json")):
        assert cli.main(["generate", "--prompt", "hi", "--model", str(model)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_cli_refusal_in_a_fresh_process_has_no_traceback(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(40))
    proc = subprocess.run([sys.executable, "-m", "models.llama", "generate", "--prompt", "x", "--model", str(corrupt)],
                          capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
