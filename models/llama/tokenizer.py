"""The tokenizer a GGUF file describes (``tokenizer.ggml.*``), built on Hugging Face ``tokenizers``.

``gpt2`` models: byte-level BPE with the pre-tokenizer regexes llama.cpp uses for the file's
``tokenizer.ggml.pre``; ``llama`` models: SentencePiece-style BPE over scored pieces with byte
fallback. Control tokens (``<|im_start|>``) are parsed only when asked, as in llama.cpp.
"""
from __future__ import annotations

import dataclasses

# Pre-tokenizer regexes by GGUF ``tokenizer.ggml.pre`` (the splits llama.cpp applies, in order),
# and whether a whole pre-token found in the vocabulary skips the merges ("ignore_merges").
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": ([_GPT2], False),
    "gpt2": ([_GPT2], False),
    "smollm": ([r"\p{N}", _GPT2], False),
    "starcoder": ([r"\p{N}", _GPT2], False),
    "refact": ([r"\p{N}", _GPT2], False),
    "llama3": ([_LLAMA3], True),
    "llama-bpe": ([_LLAMA3], True),
}
# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclasses.dataclass
class Tokenizer:
    """Encode/decode plus the ids and chat template a generator needs."""

    _tokenizer: object  # tokenizers.Tokenizer; control tokens are parsed only when asked (``encode``)
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    stop_ids: frozenset
    chat_template: str | None
    control_ids: frozenset

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``; BOS is prepended when the model asks for it (or ``add_bos``)."""
        # One tokenizer for both (each holds the vocabulary and merges, ~15 MB): with
        # ``encode_special_tokens`` set, control tokens in the text are encoded as plain text.
        self._tokenizer.encode_special_tokens = not parse_special
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.control_ids]
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render the file's Jinja chat template (``tokenizer.chat_template``)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass --no-chat to use the prompt as raw text")
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token="" if self.bos_id is None else self.decode([self.bos_id], skip_special=False),
                eos_token="" if self.eos_id is None else self.decode([self.eos_id], skip_special=False))
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template does not render ({type(e).__name__}: {e}); "
                             "pass --no-chat to use the prompt as raw text") from None


def _bpe_gpt2(tokens: list[str], merges: list[str], pre: str):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _bpe_spm(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool):
    """SentencePiece BPE as HF's LLaMA converter does it: merges ranked by the merged piece's score."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, pid in vocab.items():
        if types[pid] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[pid], pid, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    tok = HFTokenizer(models.BPE(vocab, [(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        norm = [normalizers.Prepend("\u2581")] + norm
    tok.normalizer = normalizers.Sequence(norm)
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    return tok


def _list_of(meta: dict, key: str, kinds, length: int | None = None, default=None) -> list:
    """``meta[key]`` checked to be a list of ``kinds`` (of ``length``), else one ValueError naming it."""
    v = meta.get(key, default)
    if v is None:
        raise ValueError(f"GGUF metadata has no {key}; the file carries no usable tokenizer")
    if not isinstance(v, list) or not all(isinstance(x, kinds) and not isinstance(x, bool) for x in v):
        raise ValueError(f"GGUF metadata {key} is not a list of {kinds.__name__ if isinstance(kinds, type) else 'numbers'}; "
                         "the file is corrupt")
    if length is not None and len(v) != length:
        raise ValueError(f"GGUF metadata {key} has {len(v)} entries for {length} tokens; the file is corrupt")
    return v


def from_gguf_metadata(meta: dict) -> Tokenizer:
    """Build the tokenizer from a GGUF file's metadata (``models.llama.gguf_loader.read_metadata``).
    Malformed metadata is one ValueError naming the key."""
    from tokenizers import AddedToken

    model = meta.get("tokenizer.ggml.model")
    tokens = _list_of(meta, "tokenizer.ggml.tokens", str)
    if not tokens:
        raise ValueError("GGUF metadata tokenizer.ggml.tokens is empty; the file carries no usable tokenizer")
    types = _list_of(meta, "tokenizer.ggml.token_type", int, len(tokens), [NORMAL] * len(tokens))
    if model == "gpt2":
        merges = _list_of(meta, "tokenizer.ggml.merges", str, default=[])
        pre = meta.get("tokenizer.ggml.pre", "default")
        build = lambda: _bpe_gpt2(tokens, merges, pre)
        add_bos_default = False
    elif model == "llama":
        scores = _list_of(meta, "tokenizer.ggml.scores", (int, float), len(tokens), [0.0] * len(tokens))
        space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        build = lambda: _bpe_spm(tokens, scores, types, space)
        add_bos_default = True
    else:
        raise ValueError(f"tokenizer model {model!r:.80} is not supported (supported: 'gpt2' BPE, 'llama' SentencePiece)")
    try:
        tok = build()
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
        control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
        if user:
            tok.add_tokens(user)
        if control:
            tok.add_special_tokens(control)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises its own error types)
        raise ValueError(f"the GGUF tokenizer metadata could not be built into a tokenizer ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); the file is corrupt") from None

    def opt_id(key):
        v = meta.get(key)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"GGUF metadata {key} = {v!r:.40} is not a token id; the file is corrupt")  # noqa: TRY004
        if v >= len(tokens):
            raise ValueError(f"GGUF metadata {key} = {v} is past the vocabulary of {len(tokens)} tokens")
        return None if v < 0 else v

    eos = opt_id("tokenizer.ggml.eos_token_id")
    stops = {i for i in (eos, opt_id("tokenizer.ggml.eot_token_id"), opt_id("tokenizer.ggml.eom_token_id"))
             if i is not None}
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(
        _tokenizer=tok, bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=eos,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)), stop_ids=frozenset(stops),
        chat_template=template if isinstance(template, str) else None,
        control_ids=frozenset(i for i, ty in enumerate(types) if ty == CONTROL))


def from_hf_folder(folder) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint folder (tokenizer.json + tokenizer_config.json)."""
    import json
    import pathlib

    from tokenizers import Tokenizer as HFTokenizer

    folder = pathlib.Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json; copy it from the model's repository")
    conf_path = folder / "tokenizer_config.json"
    try:
        tok = HFTokenizer.from_file(str(path))
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception type)
        raise ValueError(f"the tokenizer files in {folder} are unreadable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{conf_path} is not a JSON object")  # noqa: TRY004  (bad input: ValueError)

    def token_id(name):
        v = conf.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        return None if v is None else tok.token_to_id(v)

    control = frozenset(tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values() if t.special)
    eos = token_id("eos_token")
    # transformers >= 4.43 may write the template beside the config instead of inside it (5.x always does)
    template = conf.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(_tokenizer=tok, bos_id=token_id("bos_token"), eos_id=eos,
                     add_bos=bool(conf.get("add_bos_token", False)), stop_ids=frozenset({eos} - {None}),
                     chat_template=template if isinstance(template, str) else None, control_ids=control)
