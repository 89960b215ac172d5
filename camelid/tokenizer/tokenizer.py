"""One Tokenizer for every source: Hugging Face tokenizer.json, SentencePiece .model, piece vocabularies
(llama2.c tokenizer.bin, GGUF). It owns the BOS/EOS policy, the chat template and safe streaming decode."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from camelid.errors import CamelidError
from camelid.files import read_json, read_text
from camelid.tokenizer.piece_vocab import PieceVocab


class HFBackend:
    def __init__(self, tok):
        self.tok = tok

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, piece: str):
        return self.tok.token_to_id(piece)

    def special_tokens(self) -> list[str]:
        return []  # tokenizers splits its added tokens itself


class SentencePieceBackend:
    def __init__(self, sp):
        self.sp = sp

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if not self.sp.is_control(i)])

    def token_id(self, piece: str):
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def special_tokens(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)
                if self.sp.is_control(i) and self.sp.id_to_piece(i)]


class PieceBackend:
    def __init__(self, vocab: PieceVocab):
        self.vocab = vocab

    @property
    def vocab_size(self):
        return self.vocab.vocab_size

    def encode(self, text: str, prefix_space: bool = True) -> list[int]:
        return self.vocab.encode(text, prefix_space)

    def decode(self, ids: list[int]) -> str:
        return self.vocab.decode(ids)

    def token_id(self, piece: str):
        return self.vocab.ids.get(piece)

    def special_tokens(self) -> list[str]:
        return [self.vocab.pieces[i] for i in sorted(self.vocab.special_ids) if self.vocab.pieces[i]]


@dataclass
class Tokenizer:
    backend: object
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    add_bos: bool = True
    chat_template: str | None = None
    special_tokens_map: dict = field(default_factory=dict)  # bos_token, eos_token, ... as strings for templates
    # what a prompt ends with where BOS would be added (ChatGLM-6B's [gMASK] <sop>: its reply starts there)
    prompt_end: list[int] = field(default_factory=list)
    prompt_start: list[int] = field(default_factory=list)  # and starts with, after BOS (ChatGLM2/3: [gMASK] sop)

    def __post_init__(self):
        specials = sorted(set(self.backend.special_tokens()), key=len, reverse=True)
        self._special_re = getattr(self.backend, "special_regex", None) or (
            re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None)

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. "<s>") become their ids. With `bos` (default:
        the tokenizer's add_bos) the prompt's marks are added: BOS, and prompt_start and prompt_end where the text
        does not already begin or end with them."""
        check_text(text)
        body = self._encode_text(text)
        if not (self.add_bos if bos is None else bos):
            return body
        start, end = self.prompt_start, self.prompt_end
        if start and body[:len(start)] != start:
            body = start + body
        if end and body[len(body) - len(end):] != end:
            body = body + end
        return ([self.bos_id] if self.bos_id is not None else []) + body

    def _encode_text(self, text: str) -> list[int]:
        if self._special_re is None:
            return self.backend.encode(text)
        ids, after_special, previous = [], True, None
        for k, part in enumerate(self._special_re.split(text)):  # the matches are the odd parts
            if not part:
                continue
            tid = self.backend.token_id(part) if k % 2 else None
            if tid is not None:
                ids.append(tid)
                after_special, previous = True, part
            elif isinstance(self.backend, PieceBackend):
                # llama.cpp adds the SentencePiece prefix space at the start and after each special token.
                ids += self.backend.encode(part, after_special)
            elif hasattr(self.backend, "encode_after"):  # THUDM's chat input: what follows a role token
                ids += self.backend.encode_after(part, previous)
            else:
                ids += self.backend.encode(part)
            if tid is None:
                after_special, previous = False, None
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    def special_text(self, tid: int) -> str:
        """How a BOS or EOS id is written in templates ("</s>"), which decode() leaves out."""
        names = {"bos_token": [self.bos_id], "eos_token": self.eos_ids}
        for key, ids in names.items():
            if tid in ids and self.special_tokens_map.get(key):
                return self.special_tokens_map[key]
        return self.decode([tid])

    def token_id(self, piece: str) -> int | None:
        return self.backend.token_id(piece)

    def stream(self, context: list[int] = ()) -> "StreamDecoder":
        """A decoder for what follows `context` (the prompt): the first token is decoded after the prompt's
        last tokens, so its leading space survives (SentencePiece drops it at the start of a text)."""
        return StreamDecoder(self, context)

    def validate(self, source: str, vocab_size: int):
        """The special ids must be rows of the model's embedding (`vocab_size`)."""
        check_token_ids(source, vocab_size, self.bos_id, self.eos_ids)


def check_token_ids(source, vocab_size: int, bos_id, eos_ids):
    """The special ids a config names must be tokens of the vocabulary (a file can hold any number)."""
    for name, tid in [("bos_token_id", bos_id)] + [("eos_token_id", e) for e in eos_ids]:
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab_size):
            raise CamelidError(f"{source}: {name} {tid!r} is not a token id of the vocabulary (0..{vocab_size - 1})")


def check_text(text: str):
    """Text from JSON ("\\ud800") or from bytes that are not UTF-8 (Python reads them as lone surrogates) has
    characters no tokenizer can encode: it is refused by name, everywhere text enters, not replaced."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CamelidError(f"the text is not valid Unicode at character {exc.start} ({text[exc.start]!r}: "
                           f"bytes that are not UTF-8, or a lone UTF-16 surrogate)") from None


# Prompt tokens the first generated token is decoded after: enough for a word boundary, as vLLM does.
STREAM_CONTEXT = 5


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 and keeping SentencePiece
    spaces right: each step decodes a short window and emits only what the new token added."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)[-STREAM_CONTEXT:]
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


# ---------------------------------------------------------------- loading from files


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


# Tokenizers a folder defines in its own code (trust_remote_code), read as that code computes them
# (tokenizer/thudm.py): the file each reads
_REMOTE_CODE_TOKENIZERS = {"ChatGLMTokenizer": "tokenizer.model or ice_text.model",
                           "ChatGLM4Tokenizer": "tokenizer.model, tiktoken's ranks"}


def load_hf_tokenizer(folder: Path, model_config: dict | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder: tokenizer.json, else tokenizer.model."""
    folder = Path(folder)
    tcfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    gen = read_json(folder / "generation_config.json") if (folder / "generation_config.json").exists() else {}
    mcfg = model_config or {}
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer
        try:
            backend = HFBackend(HFTokenizer.from_file(str(folder / "tokenizer.json")))
        except Exception as exc:
            raise CamelidError(f"{folder / 'tokenizer.json'}: cannot be read: {str(exc).splitlines()[0]}") from None
    elif tcfg.get("tokenizer_class") in _REMOTE_CODE_TOKENIZERS and ((folder / "ice_text.model").exists()
                                                                      or (folder / "tokenizer.model").exists()):
        from camelid.tokenizer.thudm import load_chatglm3_tokenizer, load_chatglm6b_tokenizer, load_glm4_tokenizer

        if tcfg["tokenizer_class"] == "ChatGLM4Tokenizer":
            tok = load_glm4_tokenizer(folder, tcfg, gen, mcfg)
        elif (folder / "ice_text.model").exists():
            tok = load_chatglm6b_tokenizer(folder, tcfg, mcfg)
        else:
            tok = load_chatglm3_tokenizer(folder, tcfg, gen, mcfg)
        tok.chat_template = _chat_template(folder, tcfg) or tok.chat_template
        check_token_ids(folder, max(tok.vocab_size, mcfg.get("vocab_size") or mcfg.get("padded_vocab_size") or 0),
                        tok.bos_id, tok.eos_ids)
        return tok
    elif tcfg.get("tokenizer_class") in _REMOTE_CODE_TOKENIZERS:
        raise CamelidError(f"{folder / 'tokenizer_config.json'}: {tcfg['tokenizer_class']} (THUDM's code over "
                           f"{_REMOTE_CODE_TOKENIZERS[tcfg['tokenizer_class']]}) needs its vocabulary file, which "
                           f"the folder lacks: copy it there, or give --tokenizer a tokenizer.json for this model")
    elif (folder / "tokenizer.model").exists() or (folder / "spiece.model").exists():  # spiece.model: T5's
        model_file = folder / "tokenizer.model" if (folder / "tokenizer.model").exists() else folder / "spiece.model"
        backend = SentencePieceBackend(load_sentencepiece(model_file))
    else:
        raise CamelidError(f"{folder}: no tokenizer.json, tokenizer.model or spiece.model")
    specials = {k: _token_str(tcfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials = {k: v for k, v in specials.items() if v is not None}
    bos_id = _first(gen.get("bos_token_id"), mcfg.get("bos_token_id"))
    if bos_id is None and specials.get("bos_token"):
        bos_id = backend.token_id(specials["bos_token"])
    eos_ids = _as_list(gen.get("eos_token_id")) or _as_list(mcfg.get("eos_token_id"))
    if not eos_ids and specials.get("eos_token") and backend.token_id(specials["eos_token"]) is not None:
        eos_ids = [backend.token_id(specials["eos_token"])]
    # A model's embedding may have more rows than its tokenizer has tokens (padded vocabularies).
    check_token_ids(folder, max(backend.vocab_size, mcfg.get("vocab_size") or 0), bos_id, eos_ids)
    if "bos_token" not in specials and bos_id is not None:
        specials["bos_token"] = _piece_text(backend, bos_id)
    if "eos_token" not in specials and eos_ids:
        specials["eos_token"] = _piece_text(backend, eos_ids[0])
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:
        add_bos = _post_processor_adds_bos(backend, bos_id) if isinstance(backend, HFBackend) \
            else isinstance(backend, SentencePieceBackend)
    template = _chat_template(folder, tcfg)
    return Tokenizer(backend, bos_id, eos_ids, bool(add_bos) and bos_id is not None, template, specials)


def _first(*values):
    return next((_as_list(v)[0] for v in values if _as_list(v)), None)


def _piece_text(backend, tid: int) -> str:
    if not 0 <= tid < backend.vocab_size:  # an id of the padded embedding rows has no text
        return ""
    if isinstance(backend, HFBackend):
        return backend.tok.id_to_token(tid) or ""
    if isinstance(backend, SentencePieceBackend):
        return backend.sp.id_to_piece(tid)
    return backend.vocab.pieces[tid]


def _post_processor_adds_bos(backend: HFBackend, bos_id) -> bool:
    with_specials = backend.tok.encode("a", add_special_tokens=True).ids
    return bos_id is not None and bool(with_specials) and with_specials[0] == bos_id


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return read_text(folder / "chat_template.jinja")
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is what apply_chat_template uses
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise CamelidError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list "
                               f"of {{name, template}} objects")
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise CamelidError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string, "
                           f"not {type(template).__name__}")
    return template


def load_sentencepiece(path: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as exc:
        raise CamelidError(f"{path}: not a SentencePiece model ({str(exc).splitlines()[0]})") from None
    return sp


def piece_tokenizer(vocab: PieceVocab, bos_id, eos_ids, add_bos=True, chat_template=None) -> Tokenizer:
    specials = {}
    if bos_id is not None:
        specials["bos_token"] = vocab.pieces[bos_id]
    if eos_ids:
        specials["eos_token"] = vocab.pieces[eos_ids[0]]
    return Tokenizer(PieceBackend(vocab), bos_id, list(eos_ids), add_bos, chat_template, specials)


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A tokenizer from one file: `tokenizer.json` (BOS/EOS: <|endoftext|> or </s>) or a SentencePiece .model."""
    path = Path(path)
    if not path.is_file():
        raise CamelidError(f"{path}: no such tokenizer file")
    if path.suffix == ".model":
        sp = load_sentencepiece(path)
        backend = SentencePieceBackend(sp)
        bos, eos = sp.bos_id(), sp.eos_id()
        specials = {"bos_token": sp.id_to_piece(bos), "eos_token": sp.id_to_piece(eos)}
        return Tokenizer(backend, bos if bos >= 0 else None, [eos] if eos >= 0 else [], bos >= 0, None, specials)
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFBackend(HFTokenizer.from_file(str(path)))
    except Exception as exc:
        raise CamelidError(f"{path}: cannot be read as tokenizer.json ({str(exc).splitlines()[0]})") from None
    for bos_piece, eos_piece in (("<|endoftext|>", "<|endoftext|>"), ("<s>", "</s>")):
        bos, eos = backend.token_id(bos_piece), backend.token_id(eos_piece)
        if eos is not None:
            # GPT-2 style vocabularies separate documents with one token and add no BOS.
            add_bos = bos_piece != eos_piece and bos is not None
            return Tokenizer(backend, bos, [eos], add_bos, None, {"bos_token": bos_piece, "eos_token": eos_piece})
    raise CamelidError(f"{path}: no end-of-text token (<|endoftext|> or </s>) in the vocabulary")
