"""`camelid data tokenize`: text files or JSONL into train/validation token shards, split by document."""

from __future__ import annotations

from collections import Counter
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from camelid.data.corpus import is_prepared, is_validation, list_files, read_jsonl, read_text_file
from camelid.data.shards import file_digest, write_shards
from camelid.errors import CamelidError
from camelid.files import check_output_folder, output_folder
from camelid.tokenizer.tokenizer import Tokenizer, load_tokenizer_file


def read_documents(paths: list[str | Path], text_key: str = "text") -> Iterator[str]:
    """Documents from .txt files (paragraphs separated by blank lines), .jsonl (one per line, `text_key`)
    and folders of those. Files that are not UTF-8 text are reported and skipped."""
    for f in list_files(paths, (".txt", ".jsonl")):
        if f.suffix == ".jsonl":
            try:
                yield from (text for _, text in read_jsonl(f, text_key))
            except UnicodeDecodeError:
                print(f"camelid: skipping the rest of {f}: not UTF-8 text")
            continue
        text = read_text_file(f, Counter())
        if text is not None:
            yield from (para for para in text.split("\n\n") if para.strip())


def split_documents(inputs: list[str], val_fraction: float) -> dict[str, Callable[[], Iterator[str]]]:
    """Each split as a function that streams its documents (called once per split, so nothing is held).
    A `camelid data prepare` folder keeps its own split; other inputs are split by content hash."""
    if len(inputs) == 1 and is_prepared(inputs[0]):
        folder = Path(inputs[0])
        return {split: (lambda f=folder / f"{split}.jsonl": read_documents([f])) for split in ("train", "val")}
    return {"train": lambda: (d for d in read_documents(inputs) if not is_validation(d, val_fraction)),
            "val": lambda: (d for d in read_documents(inputs) if is_validation(d, val_fraction))}


_TOKENIZER: Tokenizer | None = None


def _init(path):
    global _TOKENIZER
    _TOKENIZER = load_tokenizer_file(path)


def _encode(doc: str) -> list[int]:
    return _TOKENIZER.encode(doc, bos=_TOKENIZER.add_bos)


def tokenize_corpus(inputs: list[str], tokenizer_path: str | Path, out: str | Path, val_fraction: float = 0.01,
                    workers: int | None = None, force: bool = False) -> dict:
    """Writes OUT/train and OUT/val; the folder appears whole or not at all."""
    if workers is not None and workers < 1:
        raise CamelidError(f"--workers {workers}: must be at least 1")
    check_output_folder(out, force)
    tok = load_tokenizer_file(tokenizer_path)
    if not tok.eos_ids:
        raise CamelidError(f"{tokenizer_path}: the tokenizer has no end-of-text token")
    list_files(inputs, ())  # a missing path fails before any work
    splits = split_documents(inputs, val_fraction)
    tok_id = file_digest(tokenizer_path)
    report = {}
    with output_folder(out, force) as tmp, Pool(workers, initializer=_init, initargs=(str(tokenizer_path),)) as pool:
        for split, documents in splits.items():
            ids = tqdm(pool.imap(_encode, documents(), chunksize=64), desc=f"tokenizing {split}", unit="doc",
                       disable=None)
            index = write_shards(ids, tmp / split, tok.eos_ids[0], tok.vocab_size, tokenizer_id=tok_id)
            if index is not None:
                report[split] = {"documents": index["documents"], "tokens": index["tokens"]}
        if "train" not in report:
            raise CamelidError("the corpus is empty: no documents in " + ", ".join(map(str, inputs)))
    return report
