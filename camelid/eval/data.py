"""Benchmark data from local files only: the Hugging Face dataset files as the hub stores them (parquet,
JSON, JSONL) and the original releases (AI2's ARC JSONL, MMLU's CSVs, llama.cpp's HellaSwag text, the
TruthfulQA CSV). Every reader returns records in the Hugging Face dataset's schema, so one task definition
serves every layout."""

from __future__ import annotations

import bz2
import csv
import json
from pathlib import Path

from camelid.errors import CamelidError, require


def read_table(path: Path) -> list[dict]:
    """Rows of a parquet, JSON (a list, or {"data": [...]}) or JSONL file."""
    try:
        if path.suffix == ".parquet":
            require("pyarrow", extra="eval")
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
            return data["data"] if isinstance(data, dict) and "data" in data else data
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CamelidError(f"{path}: cannot read: {e}") from None


def find(data_dir: Path, patterns: list[str]) -> list[Path]:
    """Files under data_dir matching the first pattern that matches anything."""
    for pattern in patterns:
        hits = sorted(p for p in data_dir.glob(pattern) if p.is_file())
        if hits:
            return hits
    return []


def split_files(data_dir: Path, what: str, patterns: list[str]) -> list[Path]:
    hits = find(data_dir, patterns)
    if not hits:
        raise CamelidError(f"{data_dir}: no {what} (looked for {', '.join(patterns)})")
    return hits


def check_columns(path: Path, rows: list[dict], columns: tuple[str, ...]) -> list[dict]:
    for n, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise CamelidError(f"{path}: record {n}: missing column {missing[0]!r} (expected {', '.join(columns)})")
    return rows


HF_SPLITS = {"train": "train", "validation": "validation", "test": "test", "dev": "dev"}
ARC_COLUMNS = ("question", "choices", "answerKey")


def arc(data_dir: Path, subset: str, split: str) -> list[dict]:
    """ARC-Easy / ARC-Challenge: allenai/ai2_arc's files, or AI2's original ARC-*-Test.jsonl."""
    hub = [f"**/{subset}/{split}-*.parquet", f"**/{subset}/{split}*.jsonl", f"**/{subset}/{split}*.json"]
    hits = find(data_dir, hub)
    if hits:
        return [r for p in hits for r in check_columns(p, read_table(p), ARC_COLUMNS)]
    original = split_files(data_dir, f"{subset} {split} data", hub + [f"**/{subset}-{split.capitalize()}.jsonl"])
    rows = []
    for p in original:
        for n, r in enumerate(read_table(p)):
            try:
                choices = r["question"]["choices"]
                rows.append({"id": r.get("id"), "question": r["question"]["stem"], "answerKey": r["answerKey"],
                             "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
            except (KeyError, TypeError) as e:
                raise CamelidError(f"{p}: record {n}: missing {e} (AI2's ARC layout: question.stem, "
                                   "question.choices, answerKey)") from None
    return rows


HELLASWAG_COLUMNS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


def hellaswag(data_dir: Path, split: str) -> list[dict]:
    """Rowan/hellaswag's files, Rowan Zellers' hellaswag_{train,val}.jsonl, or llama.cpp's text file."""
    short = {"validation": "val"}.get(split, split)
    hub = [f"**/hellaswag/**/{split}-*.parquet", f"**/hellaswag/**/{split}*.jsonl", f"**/hellaswag_{short}.jsonl"]
    hits = find(data_dir, hub)
    if hits:
        return [r for p in hits for r in check_columns(p, read_table(p), HELLASWAG_COLUMNS)]
    if split != "validation":
        return []
    return llamacpp_hellaswag(split_files(data_dir, "HellaSwag validation data",
                                          hub + ["**/hellaswag_val_full.txt.bz2", "**/hellaswag_val_full.txt"])[0])


def llamacpp_hellaswag(path: Path) -> list[dict]:
    """llama.cpp's 6-line records (context, gold label, four endings). The file joins activity label and
    context, and ctx_a and ctx_b, so they are split again: the label ends at the first ": ", and ctx_b is
    the lower-case fragment after the last full stop (the part lm-eval capitalises)."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise CamelidError(f"{path}: {len(lines)} lines is not a whole number of 6-line HellaSwag tasks")
    rows = []
    for i in range(0, len(lines), 6):
        context, label, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
        if not label.strip().isdigit():
            raise CamelidError(f"{path}:{i + 2}: the gold label {label!r} is not a number 0-3")
        activity, _, ctx = context.partition(": ")
        head, dot, tail = ctx.rpartition(". ")
        ctx_a, ctx_b = (head + dot.rstrip(), tail) if dot and tail[:1].islower() else (ctx, "")
        rows.append({"ind": i // 6, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "endings": endings, "label": label.strip()})
    return rows


MMLU_COLUMNS = ("question", "subject", "choices", "answer")


def mmlu(data_dir: Path, split: str) -> list[dict]:
    """cais/mmlu's all/{split} files, or the original release's {split}/<subject>_{split}.csv."""
    hub = [f"**/all/{split}-*.parquet", f"**/all/{split}*.jsonl"]
    hits = find(data_dir, hub)
    if hits:
        return [r for p in hits for r in check_columns(p, read_table(p), MMLU_COLUMNS)]
    rows = []
    for p in split_files(data_dir, f"MMLU {split} data", hub + [f"**/{split}/*_{split}.csv"]):
        subject = p.name[:-len(f"_{split}.csv")]
        with open(p, newline="", encoding="utf-8") as f:
            for n, rec in enumerate(csv.reader(f), 1):
                if len(rec) != 6 or rec[5] not in ("A", "B", "C", "D"):
                    raise CamelidError(f"{p}:{n}: expected 6 columns question,A,B,C,D,answer (A-D)")
                rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5],
                             "answer": "ABCD".index(rec[5])})
    return rows


def truthfulqa(data_dir: Path) -> list[dict]:
    """truthful_qa's multiple_choice files, the original mc_task.json, or TruthfulQA.csv. The CSV is the
    generation set: mc1 becomes the best answer against the incorrect ones, mc2 the correct answers against
    the incorrect ones, which is close to, not identical with, the published multiple-choice targets."""
    hub = ["**/multiple_choice/validation-*.parquet", "**/multiple_choice/validation*.jsonl"]
    hits = find(data_dir, hub)
    if hits:
        return [r for p in hits for r in check_columns(p, read_table(p), ("question", "mc1_targets", "mc2_targets"))]
    path = split_files(data_dir, "TruthfulQA data", hub + ["**/mc_task.json", "**/TruthfulQA.csv"])[0]
    if path.suffix == ".json":
        def targets(d):
            return {"choices": list(d), "labels": list(d.values())}
        return [{"question": r["question"], "mc1_targets": targets(r["mc1_targets"]),
                 "mc2_targets": targets(r["mc2_targets"])} for r in read_table(path)]
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, rec in enumerate(csv.DictReader(f), 2):
            missing = [c for c in ("Question", "Best Answer", "Correct Answers", "Incorrect Answers") if c not in rec]
            if missing:
                raise CamelidError(f"{path}: missing column {missing[0]!r}")
            correct = [a.strip() for a in rec["Correct Answers"].split(";") if a.strip()]
            wrong = [a.strip() for a in rec["Incorrect Answers"].split(";") if a.strip()]
            if not wrong:
                raise CamelidError(f"{path}:{n}: no incorrect answers")
            rows.append({"question": rec["Question"],
                         "mc1_targets": {"choices": [rec["Best Answer"]] + wrong, "labels": [1] + [0] * len(wrong)},
                         "mc2_targets": {"choices": correct + wrong, "labels": [1] * len(correct) + [0] * len(wrong)}})
    return rows
