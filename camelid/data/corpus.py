"""Reading raw corpora: text, JSONL and HTML files, one document at a time, so any size fits in memory."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from camelid.errors import CamelidError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
HTML_SUFFIXES = (".html", ".htm")


@dataclass
class Document:
    source: str  # file, or file:line for JSONL
    text: str
    html: bool = False


def list_files(paths: list[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    """The files named, and the files under the folders named whose suffix is one of `suffixes`."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        elif p.is_file():
            files.append(p)
        else:
            raise CamelidError(f"{p}: no such file or directory")
    return files


def read_text_file(path: Path, skipped: Counter) -> str | None:
    """The file's text, or None (counted in `skipped`) when it is binary or not UTF-8."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        skipped["binary"] += 1
        print(f"camelid: skipping {path}: binary file")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        skipped["not_utf8"] += 1
        print(f"camelid: skipping {path}: not UTF-8 text")
        return None


def read_jsonl(path: Path, text_key: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each record; a record without a string `text_key` is an error naming the line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                raise CamelidError(f"{path}:{n}: not a JSON object with a string {text_key!r} field") from None
            yield n, text


def read_corpus(paths: list[str | Path], text_key: str = "text", skipped: Counter | None = None) -> Iterator[Document]:
    """Documents: a whole .txt/.md file, one JSONL record, or one HTML page (still HTML: `html=True`)."""
    skipped = Counter() if skipped is None else skipped
    for f in list_files(paths, TEXT_SUFFIXES + JSONL_SUFFIXES + HTML_SUFFIXES):
        if f.suffix.lower() in JSONL_SUFFIXES:
            try:
                for n, text in read_jsonl(f, text_key):
                    yield Document(f"{f}:{n}", text)
            except UnicodeDecodeError:
                skipped["not_utf8"] += 1
                print(f"camelid: skipping the rest of {f}: not UTF-8 text")
            continue
        text = read_text_file(f, skipped)
        if text is not None:
            yield Document(str(f), text, html=f.suffix.lower() in HTML_SUFFIXES)


def is_validation(text: str, fraction: float) -> bool:
    """A stable, content-based split: the same document always lands on the same side."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2 ** 64 < fraction


def read_texts(paths: list[str | Path], text_key: str = "text") -> Iterator[str]:
    """The texts of a corpus for tokenizer training: whole text files, JSONL records, or the train split of
    a `camelid data prepare` folder."""
    paths = [Path(p) / "train.jsonl" if is_prepared(p) else p for p in paths]
    for doc in read_corpus(paths, text_key):
        yield doc.text


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / "report.json").is_file() and (Path(path) / "train.jsonl").is_file()
