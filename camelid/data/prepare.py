"""`camelid data prepare`: raw text, JSONL and HTML into a clean, deduplicated corpus split by document.

Documents stream through a process pool (cleaning, filters and MinHash are per document and use every
core); the parent keeps only hashes and signatures for deduplication, so a corpus larger than memory works.
The output folder has train.jsonl, val.jsonl and a report of what each step removed, with examples; it is
written beside the destination and renamed into place only when complete."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from camelid.data import clean
from camelid.data.corpus import Document, is_validation, list_files, read_corpus
from camelid.data.dedup import Deduplicator, exact_key, minhash_signature
from camelid.errors import CamelidError, require
from camelid.files import check_output_folder, output_folder

REPORT = "report.json"
CLEANING_STEPS = ("html", "gutenberg", "unicode", "emoji", "whitespace")
EXAMPLES = 3


@dataclass
class PrepareOptions:
    text_key: str = "text"
    val_fraction: float = 0.01
    exact_dedup: bool = True
    near_dedup_threshold: float | None = 0.8  # estimated Jaccard of word 5-grams; None turns it off
    emoji_to_text: bool = True
    blocklist: str | None = None
    rules: clean.QualityRules = field(default_factory=clean.QualityRules)
    workers: int | None = None


@dataclass
class StepReport:
    documents: int = 0  # cleaning steps: documents trimmed; filters: documents removed
    bytes: int = 0
    examples: list = field(default_factory=list)

    def add(self, n_bytes: int, example: dict):
        self.documents += 1
        self.bytes += n_bytes
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)


_OPTIONS: PrepareOptions | None = None
_BLOCKLIST = None


def _init(options: PrepareOptions):
    global _OPTIONS, _BLOCKLIST
    _OPTIONS = options
    _BLOCKLIST = clean.read_blocklist(options.blocklist) if options.blocklist else None


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def clean_document(doc: Document, options: PrepareOptions, blocklist=None) -> dict:
    """Cleaning steps, then the quality filters. Returns the text (or None), the bytes each step removed,
    the filter that rejected it, and what deduplication needs."""
    text, removed = doc.text, {}
    steps = [("html", doc.html, clean.html_to_text), ("gutenberg", clean.is_gutenberg(text), clean.strip_gutenberg),
             ("unicode", True, clean.fix_unicode), ("emoji", options.emoji_to_text, clean.emoji_to_text),
             ("whitespace", True, clean.normalize_whitespace)]
    for name, applies, step in steps:
        if applies:
            before = _size(text)
            text = step(text)
            removed[name] = max(0, before - _size(text))
    result = {"source": doc.source, "original_bytes": _size(doc.text), "removed": removed, "text": text}
    if not text:
        result["reason"] = "empty"
        return result
    problem = clean.quality_problem(text, options.rules, blocklist)
    if problem:
        result["reason"] = problem
        return result
    result["exact_key"] = exact_key(text)
    if options.near_dedup_threshold is not None:
        result["signature"] = minhash_signature(text)
    return result


def _clean(doc: Document) -> dict:
    return clean_document(doc, _OPTIONS, _BLOCKLIST)


def _snippet(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def prepare_corpus(inputs: list[str], out: str | Path, options: PrepareOptions | None = None,
                   force: bool = False) -> dict:
    """Writes the folder `out` whole, or nothing; an earlier output there is replaced only with `force`."""
    options = options or PrepareOptions()
    if options.workers is not None and options.workers < 1:
        raise CamelidError(f"--workers {options.workers}: must be at least 1")
    check_output_folder(out, force)
    require("trafilatura", "ftfy", "emoji", "datasketch", extra="data")
    list_files(inputs, ())  # a missing path fails before any work
    if options.blocklist:
        clean.read_blocklist(options.blocklist)  # a bad path fails here, before any work
    if options.near_dedup_threshold is not None and not 0 < options.near_dedup_threshold <= 1:
        raise CamelidError("near_dedup_threshold must be in (0, 1]")
    with output_folder(out, force) as tmp:
        return _run(inputs, tmp, options)


def _run(inputs: list[str], folder: Path, options: PrepareOptions) -> dict:
    skipped = Counter()
    steps = {name: StepReport() for name in CLEANING_STEPS}
    filters: dict[str, StepReport] = {}
    dedup = Deduplicator(options.near_dedup_threshold)
    totals = Counter(dict.fromkeys(("documents_in", "bytes_in", "documents_train", "documents_val", "bytes_out"), 0))
    with open(folder / "train.jsonl", "w", encoding="utf-8") as train, \
            open(folder / "val.jsonl", "w", encoding="utf-8") as val, \
            Pool(options.workers, initializer=_init, initargs=(options,)) as pool:
        docs = read_corpus(inputs, options.text_key, skipped)
        bar = tqdm(pool.imap(_clean, docs, chunksize=4), desc="preparing", unit="doc", disable=None)
        for r in bar:
            totals["documents_in"] += 1
            totals["bytes_in"] += r["original_bytes"]
            for name, n in r["removed"].items():
                if n:
                    steps[name].add(n, {"source": r["source"], "bytes_removed": n})
            reason = r.get("reason") or _duplicate(r, dedup, options)
            if reason:
                filters.setdefault(reason, StepReport()).add(
                    _size(r["text"]), {"source": r["source"], "reason": reason, "text": _snippet(r["text"]),
                                       **({"duplicate_of": r["duplicate_of"]} if "duplicate_of" in r else {})})
                continue
            split = val if is_validation(r["text"], options.val_fraction) else train
            split.write(json.dumps({"text": r["text"], "source": r["source"]}, ensure_ascii=False) + "\n")
            totals["documents_" + ("val" if split is val else "train")] += 1
            totals["bytes_out"] += _size(r["text"])
    if totals["documents_train"] + totals["documents_val"] == 0:
        raise CamelidError("the corpus is empty after cleaning: no documents in " + ", ".join(map(str, inputs))
                           + (f" (skipped files: {dict(skipped)})" if skipped else ""))
    report = {"inputs": list(map(str, inputs)), "options": asdict(options), **totals,
              "skipped_files": dict(skipped),
              "cleaning": {k: asdict(v) for k, v in steps.items() if v.bytes},
              "removed": {k: asdict(v) for k, v in sorted(filters.items(), key=lambda kv: -kv[1].documents)}}
    (folder / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (folder / "report.md").write_text(report_markdown(report))
    return report


def _duplicate(r: dict, dedup: Deduplicator, options: PrepareOptions) -> str | None:
    if options.exact_dedup:
        other = dedup.exact_duplicate(r["exact_key"], r["source"])
        if other:
            r["duplicate_of"] = other
            return "exact_duplicate"
    if options.near_dedup_threshold is not None:
        other = dedup.near_duplicate(r["signature"], r["source"])
        if other:
            r["duplicate_of"] = other
            return "near_duplicate"
    return None


def report_markdown(report: dict) -> str:
    mb = 1 / 1e6
    lines = ["# camelid data prepare report", "",
             f"Documents in: {report['documents_in']:,} ({report['bytes_in'] * mb:,.1f} MB); "
             f"kept: {report['documents_train']:,} train + {report['documents_val']:,} validation "
             f"({report['bytes_out'] * mb:,.1f} MB).", ""]
    if report["skipped_files"]:
        lines += [f"Skipped files: {report['skipped_files']}", ""]
    lines += ["| step | documents | MB removed |", "|---|---:|---:|"]
    for name, s in report["cleaning"].items():
        lines.append(f"| clean {name} | {s['documents']:,} trimmed | {s['bytes'] * mb:,.2f} |")
    for name, s in report["removed"].items():
        lines.append(f"| filter {name} | {s['documents']:,} removed | {s['bytes'] * mb:,.2f} |")
    lines += ["", "## Examples", ""]
    for name, s in report["removed"].items():
        lines.append(f"### {name}")
        lines += [f"- `{e['source']}`" + (f" (duplicate of `{e['duplicate_of']}`)" if "duplicate_of" in e else "")
                  + f": {e['text']}" for e in s["examples"]]
        lines.append("")
    return "\n".join(lines)
