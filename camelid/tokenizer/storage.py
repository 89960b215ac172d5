"""Saving a Tokenizer into a camelid folder and reading it back, whatever its backend."""

from __future__ import annotations

import json
from pathlib import Path

from camelid.errors import CamelidError
from camelid.tokenizer.piece_vocab import PieceVocab
from camelid.tokenizer.tokenizer import (HFBackend, PieceBackend, SentencePieceBackend, Tokenizer,
                                         load_sentencepiece)


def save_tokenizer(tok: Tokenizer, folder: Path) -> dict:
    """Writes the vocabulary file; returns the section camelid.json keeps about it."""
    b = tok.backend
    if isinstance(b, HFBackend):
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
            "chat_template": tok.chat_template, "special_tokens": tok.special_tokens_map}


def load_saved_tokenizer(folder: Path, section: dict) -> Tokenizer:
    path = folder / section.get("file", "")
    if not path.is_file():
        raise CamelidError(f"{folder / 'camelid.json'}: tokenizer file {section.get('file')!r} is missing")
    if path.name == "tokenizer.json":
        from tokenizers import Tokenizer as HFTokenizer
        backend = HFBackend(HFTokenizer.from_file(str(path)))
    elif path.suffix == ".model":
        backend = SentencePieceBackend(load_sentencepiece(path))
    else:
        d = json.loads(path.read_text(encoding="utf-8"))
        backend = PieceBackend(PieceVocab(d["pieces"], d["scores"], d["space"], d["add_space_prefix"],
                                          d["unk_id"], set(d["special_ids"])))
    return Tokenizer(backend, section.get("bos_id"), list(section.get("eos_ids") or []),
                     section.get("add_bos", True), section.get("chat_template"), section.get("special_tokens") or {})
