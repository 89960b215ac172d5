"""SentencePiece-style vocabularies given as pieces with scores: llama2.c `tokenizer.bin` and GGUF `llama` vocabs.

Encoding is llama.cpp's SPM algorithm: start from single characters and repeatedly merge the adjacent pair
whose concatenation is the highest-scoring piece (leftmost on ties); characters with no piece fall back to
their UTF-8 bytes (`<0xXX>`). llama2.c's `run.c` encodes the same way.
"""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path

from camelid.errors import CamelidError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class PieceVocab:
    def __init__(self, pieces: list[str], scores: list[float], space: str = "▁", add_space_prefix: bool = True,
                 unk_id: int = 0, special_ids: set[int] = frozenset()):
        self.pieces = pieces
        self.scores = scores
        self.space = space
        self.add_space_prefix = add_space_prefix
        self.unk_id = unk_id
        self.special_ids = set(special_ids)
        self.ids = {}
        for i, p in enumerate(pieces):
            self.ids.setdefault(p, i)
        self.byte_ids = {}
        self.byte_of = {}
        for i, p in enumerate(pieces):
            m = _BYTE_PIECE.match(p)
            if m:
                self.byte_ids[int(m.group(1), 16)] = i
                self.byte_of[i] = int(m.group(1), 16)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, prefix_space: bool = True) -> list[int]:
        if not text:
            return []
        if self.add_space_prefix and prefix_space:
            text = " " + text
        text = text.replace(" ", self.space)
        syms = list(text)
        nxt = list(range(1, len(syms))) + [-1]
        prev = list(range(-1, len(syms) - 1))
        heap: list = []

        def push(left: int):
            right = nxt[left] if left >= 0 else -1
            if left < 0 or right < 0:
                return
            merged = syms[left] + syms[right]
            tid = self.ids.get(merged)
            if tid is not None and tid not in self.special_ids:
                heapq.heappush(heap, (-self.scores[tid], left, merged))

        for i in range(len(syms) - 1):
            push(i)
        while heap:
            _, left, merged = heapq.heappop(heap)
            right = nxt[left]
            if right < 0 or syms[left] is None or syms[left] + syms[right] != merged:
                continue  # stale: one side was merged since this pair was queued
            syms[left], syms[right] = merged, None
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left])
            push(left)
        out = []
        i = 0
        while i >= 0:
            out.extend(self._piece_ids(syms[i]))
            i = nxt[i]
        return out

    def _piece_ids(self, sym: str) -> list[int]:
        tid = self.ids.get(sym)
        if tid is not None:
            return [tid]
        if self.byte_ids:
            return [self.byte_ids[b] for b in sym.encode("utf-8")]
        return [self.unk_id]

    def decode_bytes(self, ids: list[int]) -> bytes:
        out = bytearray()
        for i in ids:
            if i in self.byte_of:
                out.append(self.byte_of[i])
            elif i in self.special_ids or not 0 <= i < len(self.pieces):
                continue
            else:
                out += self.pieces[i].replace(self.space, " ").encode("utf-8")
        return bytes(out)

    def decode(self, ids: list[int]) -> str:
        text = self.decode_bytes(ids).decode("utf-8", errors="replace")
        # The prefix space added when encoding is not part of the text (SentencePiece and run.c drop it).
        if self.add_space_prefix and text.startswith(" "):
            text = text[1:]
        return text


def read_llama2c_tokenizer(path: str | Path, vocab_size: int) -> PieceVocab:
    """llama2.c `tokenizer.bin`: int32 max_token_length, then per token: f32 score, int32 length, bytes."""
    data = Path(path).read_bytes()
    pieces, scores = [], []
    offset = 4
    try:
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            raw = data[offset:offset + length]
            if len(raw) != length:
                raise struct.error
            offset += length
            pieces.append(raw.decode("utf-8", errors="replace"))
            scores.append(score)
    except struct.error:
        raise CamelidError(f"{path}: truncated llama2.c tokenizer (expected {vocab_size} tokens, "
                           f"read {len(pieces)})") from None
    # llama2.c stores "▁" as a plain space; ids 0-2 are <unk>, <s>, </s> (written as "\n<s>\n").
    pieces[:3] = [p.strip() for p in pieces[:3]]
    return PieceVocab(pieces, scores, space=" ", unk_id=0, special_ids={0, 1, 2})


def to_hf_tokenizer(vocab: PieceVocab, bos_id: int | None, add_bos: bool):
    """The same vocabulary as a `tokenizers` BPE (what transformers' LlamaConverter builds from a
    SentencePiece model): merges ranked by the score of the piece they make, bytes as fallback."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = "▁"
    pieces = [p.replace(vocab.space, sp) if i not in vocab.byte_of else p for i, p in enumerate(vocab.pieces)]
    ids = {}
    for i, p in enumerate(pieces):
        ids.setdefault(p, i)
    merges = []
    for i, piece in enumerate(pieces):
        if i in vocab.special_ids or i in vocab.byte_of:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += [(a, b, vocab.scores[i]) for a, b in sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    tok = Tokenizer(models.BPE(ids, [(a, b) for a, b, _ in merges], unk_token=pieces[vocab.unk_id],
                               fuse_unk=True, byte_fallback=bool(vocab.byte_ids)))
    steps = [normalizers.Replace(" ", sp)]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend(sp))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(sp, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in sorted(vocab.special_ids)])
    if add_bos and bos_id is not None:
        bos = pieces[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok
