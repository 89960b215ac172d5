"""Saving a Tokenizer into a camelid folder and reading it back, whatever its backend."""

from __future__ import annotations

import json
from pathlib import Path

from camelid.errors import CamelidError
from camelid.files import read_json
from camelid.tokenizer.piece_vocab import PieceVocab
from camelid.tokenizer.thudm import GLM_VOCAB_FILE, VOCAB_FILE, ChatGLM3Backend, ChatGLM6BBackend
from camelid.tokenizer.tokenizer import HFBackend, PieceBackend, SentencePieceBackend, Tokenizer, load_sentencepiece


def save_tokenizer(tok: Tokenizer, folder: Path) -> dict:
    """Writes the vocabulary file; returns the section camelid.json keeps about it."""
    b = tok.backend
    extra = {}
    if isinstance(b, (ChatGLM6BBackend, ChatGLM3Backend)):  # THUDM's: its SentencePiece model under its name
        name = VOCAB_FILE if isinstance(b, ChatGLM6BBackend) else GLM_VOCAB_FILE
        (folder / name).write_bytes(b.sp.serialized_model_proto())
        extra = {"thudm": "chatglm6b", "num_image_tokens": b.offset} if isinstance(b, ChatGLM6BBackend) \
            else {"thudm": "chatglm3"}
    elif isinstance(b, HFBackend):
        name = "tokenizer.json"
        b.tok.save(str(folder / name))
    elif isinstance(b, SentencePieceBackend):
        name = "tokenizer.model"
        (folder / name).write_bytes(b.sp.serialized_model_proto())
    else:
        name = "tokenizer.pieces.json"
        v = b.vocab
        (folder / name).write_text(json.dumps({
            "pieces": v.pieces, "scores": v.scores, "space": v.space, "add_space_prefix": v.add_space_prefix,
            "unk_id": v.unk_id, "special_ids": sorted(v.special_ids)}, ensure_ascii=False), encoding="utf-8")
    return {"file": name, "bos_id": tok.bos_id, "eos_ids": tok.eos_ids, "add_bos": tok.add_bos,
            "chat_template": tok.chat_template, "special_tokens": tok.special_tokens_map,
            "prompt_start": tok.prompt_start, "prompt_end": tok.prompt_end, **extra}


_PIECES_SCHEMA = {"pieces": list, "scores": list, "space": str, "add_space_prefix": bool, "unk_id": int,
                  "special_ids": list}


def load_saved_tokenizer(folder: Path, section: dict) -> Tokenizer:
    meta = folder / "camelid.json"
    name = section.get("file")
    if not isinstance(name, str) or Path(name).name != name:
        raise CamelidError(f"{meta}: tokenizer.file must be a file name in the folder, got {name!r}")
    path = folder / name
    if not path.is_file():
        raise CamelidError(f"{meta}: tokenizer file {name!r} is missing")
    bos_id, eos_ids = section.get("bos_id"), section.get("eos_ids") or []
    start, end, images = section.get("prompt_start") or [], section.get("prompt_end") or [], \
        section.get("num_image_tokens", 0)
    kinds = [(eos_ids, list), (section.get("special_tokens") or {}, dict), (section.get("chat_template") or "", str),
             (section.get("add_bos", True), bool), (start, list), (end, list), (images, int)]
    if not all(isinstance(value, kind) for value, kind in kinds) or isinstance(images, bool):
        raise CamelidError(f"{meta}: tokenizer: eos_ids, prompt_start and prompt_end must be lists, special_tokens "
                           f"an object, chat_template a string, add_bos true or false and num_image_tokens an integer")
    thudm = section.get("thudm")
    if thudm == "chatglm6b":
        backend = ChatGLM6BBackend(load_sentencepiece(path), images)
    elif thudm == "chatglm3":
        backend = ChatGLM3Backend(load_sentencepiece(path))
    elif path.name == "tokenizer.json":
        from tokenizers import Tokenizer as HFTokenizer
        backend = HFBackend(HFTokenizer.from_file(str(path)))
    elif path.suffix == ".model":
        backend = SentencePieceBackend(load_sentencepiece(path))
    else:
        backend = PieceBackend(_read_pieces(path))
    return Tokenizer(backend, bos_id, list(eos_ids), section.get("add_bos", True), section.get("chat_template"),
                     section.get("special_tokens") or {}, prompt_start=start, prompt_end=end)


def _read_pieces(path: Path) -> PieceVocab:
    d = read_json(path)
    for key, kind in _PIECES_SCHEMA.items():
        if not isinstance(d.get(key), kind):
            raise CamelidError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    pieces, scores, n = d["pieces"], d["scores"], len(d["pieces"])
    if not all(isinstance(p, str) for p in pieces) or len(scores) != n or \
            not all(isinstance(x, (int, float)) for x in scores):
        raise CamelidError(f"{path}: 'pieces' must be strings with one number in 'scores' for each")
    if not all(isinstance(i, int) and 0 <= i < n for i in d["special_ids"] + [d["unk_id"]]):
        raise CamelidError(f"{path}: unk_id and special_ids must be indices of 'pieces' (0..{n - 1})")
    return PieceVocab(pieces, scores, d["space"], d["add_space_prefix"], d["unk_id"], set(d["special_ids"]))
