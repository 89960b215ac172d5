"""`camelid data tokenize`: text files or JSONL into train/validation token shards, split by document."""

from __future__ import annotations

import hashlib
import json
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from camelid.data.shards import write_shards
from camelid.errors import CamelidError
from camelid.tokenizer.tokenizer import Tokenizer, load_tokenizer_file


def read_documents(paths: list[str | Path], text_key: str = "text") -> Iterator[str]:
    """Documents from .txt files (paragraphs separated by blank lines), .jsonl (one per line, `text_key`)
    and folders of those. Files that are not UTF-8 text are reported and skipped."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise CamelidError(f"{p}: no such file or directory")
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            print(f"camelid: skipping {f}: not UTF-8 text")
            continue
        if f.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[text_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CamelidError(f"{f}:{n}: not a JSON object with a {text_key!r} field") from None
                yield doc
        else:
            yield from (para for para in text.split("\n\n") if para.strip())


def is_validation(doc: str, fraction: float) -> bool:
    """A stable, content-based split: the same document always lands on the same side."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2 ** 64 < fraction


_TOKENIZER: Tokenizer | None = None


def _init(path):
    global _TOKENIZER
    _TOKENIZER = load_tokenizer_file(path)


def _encode(doc: str) -> list[int]:
    return _TOKENIZER.encode(doc, bos=_TOKENIZER.add_bos)


def tokenize_corpus(inputs: list[str], tokenizer_path: str | Path, out: str | Path, val_fraction: float = 0.01,
                    workers: int | None = None) -> dict:
    tok = load_tokenizer_file(tokenizer_path)
    if not tok.eos_ids:
        raise CamelidError(f"{tokenizer_path}: the tokenizer has no end-of-text token")
    docs = list(read_documents(inputs))
    if not docs:
        raise CamelidError("the corpus is empty: no documents in " + ", ".join(map(str, inputs)))
    splits = {"train": [d for d in docs if not is_validation(d, val_fraction)],
              "val": [d for d in docs if is_validation(d, val_fraction)]}
    tok_id = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()[:16]
    out = Path(out)
    report = {}
    with Pool(workers, initializer=_init, initargs=(str(tokenizer_path),)) as pool:
        for split, items in splits.items():
            if not items:
                continue
            ids = tqdm(pool.imap(_encode, items, chunksize=64), total=len(items), desc=f"tokenizing {split}", disable=None)
            index = write_shards(ids, out / split, tok.eos_ids[0], tok.vocab_size, tokenizer_id=tok_id)
            report[split] = {"documents": index["documents"], "tokens": index["tokens"]}
    return report
