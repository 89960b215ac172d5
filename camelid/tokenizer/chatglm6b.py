"""ChatGLM-6B's tokenizer (the first ChatGLM), as THUDM's tokenization_chatglm.py computes it: a SentencePiece
model (ice_text.model) read after newlines become <n>, tabs <|tab|> and runs of 2 to 80 spaces <|blank_n|>;
ids are the model's pieces shifted by its image tokens (20000 in the first release, none in the last). A
prompt ends with [gMASK] <sop>: the reply is the block GLM fills in at the mask."""

from __future__ import annotations

from pathlib import Path

from camelid.errors import CamelidError
from camelid.tokenizer.tokenizer import Tokenizer, load_sentencepiece

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
MAX_BLANK = 80
VOCAB_FILE = "ice_text.model"


def _preprocess(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _postprocess(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


class ChatGLM6BBackend:
    def __init__(self, sp, image_tokens: int):
        self.sp, self.offset = sp, image_tokens
        self.specials = [s for s in SPECIALS + ["<pad>", "<unk>", "</s>"] if self._piece_id(s) is not None]
        self._skip = {self._piece_id(s) for s in self.specials}

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        return self.offset + self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return [i + self.offset for i in self.sp.encode(_preprocess(text))]

    def decode(self, ids: list[int]) -> str:
        pieces = [self.sp.id_to_piece(i - self.offset) for i in ids
                  if self.offset <= i < self.vocab_size and i - self.offset not in self._skip]
        return _postprocess(self.sp.decode_pieces(pieces))

    def token_id(self, piece: str) -> int | None:
        i = self._piece_id(piece)
        return None if i is None else i + self.offset

    def special_tokens(self) -> list[str]:
        return [s for s in self.specials if s not in ("<unk>",)]


def load_chatglm6b_tokenizer(folder: Path, tcfg: dict, mcfg: dict) -> Tokenizer:
    """A ChatGLM-6B folder's tokenizer: its ice_text.model, the image-token offset its tokenizer_config.json
    gives, EOS <eop>, and [gMASK] <sop> at the end of every prompt."""
    sp = load_sentencepiece(folder / VOCAB_FILE)
    image_tokens = tcfg.get("num_image_tokens", 20000)  # THUDM's default, for the configs that leave it out
    if not isinstance(image_tokens, int) or isinstance(image_tokens, bool) or image_tokens < 0:
        raise CamelidError(f"{folder / 'tokenizer_config.json'}: num_image_tokens must be a non-negative integer")
    backend = ChatGLM6BBackend(sp, image_tokens)
    ids = {name: backend.token_id(name) for name in ("[gMASK]", "<sop>", "<eop>")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise CamelidError(f"{folder / VOCAB_FILE}: no {missing[0]} piece (not ChatGLM-6B's vocabulary)")
    for key, piece in (("gmask_token_id", "[gMASK]"), ("bos_token_id", "<sop>")):
        if mcfg.get(key) is not None and mcfg[key] != ids[piece]:
            raise CamelidError(f"{folder / 'config.json'}: {key}={mcfg[key]} but {piece} is token {ids[piece]} in "
                               f"{VOCAB_FILE} with num_image_tokens={image_tokens}")
    eos = mcfg.get("eos_token_id", ids["<eop>"])
    return Tokenizer(backend, None, [eos], True, None, {"eos_token": "<eop>"},
                     prompt_end=[ids["[gMASK]"], ids["<sop>"]])


def chatglm6b_tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json as THUDM's release writes it (its code reads it, and camelid does)."""
    return {"tokenizer_class": "ChatGLMTokenizer", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
            "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
            "remove_space": False, "do_lower_case": False, "num_image_tokens": tok.backend.offset,
            "padding_side": "left"}
