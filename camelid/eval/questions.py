"""MT-bench / Vicuna-bench question sets, reference answers and model answers, in FastChat's JSONL layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from camelid.errors import CamelidError

JUDGE_DATA = Path(__file__).parent / "judge_data"
QUESTION_SETS = {"mt_bench": "mt_bench_questions.jsonl", "vicuna": "vicuna_bench_questions.jsonl"}
REFERENCES = {"mt_bench": "mt_bench_reference_gpt4.jsonl"}


def read_jsonl(path: str | Path, required: tuple[str, ...], what: str) -> list[dict]:
    """Records of a JSONL file; a bad line is an error naming the file, line and key. A torn last line
    (an interrupted append) is dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CamelidError(f"{path}: cannot read {what} ({exc.__class__.__name__})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not line.rstrip().endswith("}"):
                break
            raise CamelidError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(record, dict):
            raise CamelidError(f"{path}:{n}: expected a JSON object")
        for key in required:
            if key not in record:
                raise CamelidError(f"{path}:{n}: {what} record has no {key!r}")
        records.append(record)
    return records


def append_jsonl(path: Path, records: list[dict]) -> None:
    """One write per call, flushed to disk, so an interrupted run loses at most the last record."""
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def load_questions(name_or_path: str) -> list[dict]:
    """`mt_bench`, `vicuna` or a path to a question.jsonl ({"question_id","category","turns"})."""
    path = JUDGE_DATA / QUESTION_SETS[name_or_path] if name_or_path in QUESTION_SETS else Path(name_or_path)
    if not path.exists():
        raise CamelidError(f"--questions {name_or_path}: no such file (built-in sets: {', '.join(QUESTION_SETS)})")
    questions = read_jsonl(path, ("question_id", "turns"), "question")
    for q in questions:
        turns = q["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise CamelidError(f"{path}: question {q['question_id']}: 'turns' must be a non-empty list of strings")
        q.setdefault("category", "general")
    if not questions:
        raise CamelidError(f"{path}: no questions")
    return questions


def load_references(name_or_path: str | None, questions_name: str) -> dict:
    """Reference answers by question id: an explicit file, else the set's bundled GPT-4 answers, else none."""
    if name_or_path is None:
        if questions_name not in REFERENCES:
            return {}
        name_or_path = str(JUDGE_DATA / REFERENCES[questions_name])
    return {r["question_id"]: r for r in load_answer_file(name_or_path, "reference answer")}


def load_answer_file(path: str | Path, what: str = "answer") -> list[dict]:
    records = read_jsonl(path, ("question_id", "model_id", "choices"), what)
    for r in records:
        choices = r["choices"]
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)
                and isinstance(choices[0].get("turns"), list)):
            raise CamelidError(f"{path}: question {r['question_id']}: 'choices' must be "
                               f'[{{"index": 0, "turns": [...]}}]')
    return records


def load_answers(paths: list[str]) -> dict[str, dict]:
    """{model_id: {question_id: answer}} from one or more answer files (a file may hold several models)."""
    answers: dict[str, dict] = {}
    for path in paths:
        for r in load_answer_file(path):
            answers.setdefault(r["model_id"], {})[r["question_id"]] = r
    if not answers:
        raise CamelidError(f"{', '.join(paths)}: no answers")
    return answers


def answer_turns(answer: dict) -> list[str]:
    return answer["choices"][0]["turns"]
