"""Training a tokenizer: byte-level BPE with `tokenizers`, or SentencePiece (unigram or BPE)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from camelid.errors import CamelidError
from camelid.files import output_folder

KINDS = ("bpe", "sentencepiece-unigram", "sentencepiece-bpe")
END_OF_TEXT = "<|endoftext|>"


class _Counted:
    """Passes the documents through, counting the characters, so an input with no text is an error."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.chars = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.chars += len(text.strip())
            yield text


def train_tokenizer(texts: Iterable[str], out: str | Path, kind: str = "bpe", vocab_size: int = 8192,
                    special_tokens: tuple[str, ...] = (END_OF_TEXT,), force: bool = False) -> Path:
    """Train on documents; writes `tokenizer.json` (bpe) or `tokenizer.model` (sentencepiece) into the folder
    `out`, which appears whole or not at all."""
    if kind not in KINDS:
        raise CamelidError(f"tokenizer kind {kind!r}: use one of {', '.join(KINDS)}")
    if vocab_size < 300 and kind == "bpe":
        raise CamelidError("--vocab-size must be at least 300 for byte-level BPE (256 bytes + merges)")
    counted = _Counted(texts)
    empty = CamelidError("no text to train on: every input was empty or not UTF-8 text")
    with output_folder(out, force) as tmp:
        try:
            name = _train(counted, tmp, kind, vocab_size, special_tokens)
        except Exception:
            if not counted.chars:  # SentencePiece fails on its own words when it gets no sentences
                raise empty from None
            raise
        if not counted.chars:
            raise empty
    return Path(out) / name


def _train(texts: Iterable[str], out: Path, kind: str, vocab_size: int, special_tokens: tuple[str, ...]) -> str:
    if kind == "bpe":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
        tok.train_from_iterator(texts, trainer)
        tok.save(str(out / "tokenizer.json"))
        return "tokenizer.json"
    import sentencepiece as spm

    prefix = out / "tokenizer"
    # SentencePiece trains on sentences (at most 4 KB each): feed it lines, a bounded random sample of them.
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=str(prefix), vocab_size=vocab_size,
                                   input_sentence_size=5_000_000, shuffle_input_sentence=True,
                                   model_type=kind.split("-")[1], byte_fallback=True, character_coverage=0.9995,
                                   user_defined_symbols=[t for t in special_tokens if t != "</s>"],
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (prefix.with_suffix(".vocab")).unlink(missing_ok=True)
    return "tokenizer.model"
