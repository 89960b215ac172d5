"""`camelid answer`: a model's answers to MT-bench / Vicuna-bench questions, as FastChat's gen_model_answer.py
writes them: both turns in one conversation, per-category temperatures, one JSONL line per question."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from camelid.errors import CamelidError
from camelid.eval.questions import append_jsonl, read_jsonl
from camelid.files import write_text
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams
from camelid.tokenizer.chat_template import render_chat, resolve_template

# FastChat llm_judge/common.py temperature_config; anything else gets DEFAULT_TEMPERATURE.
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
FAILED = "ERROR"  # what FastChat records for a turn it could not generate


def sampling_for(category: str, seed: int) -> SamplingParams:
    """FastChat samples with transformers' defaults (top_k 50, top_p 1); below 1e-4 it decodes greedily."""
    t = TEMPERATURE.get(category, DEFAULT_TEMPERATURE)
    return SamplingParams(temperature=t if t >= 1e-4 else 0.0, top_k=50, top_p=1.0, min_p=0.0, seed=seed)


def _answer_batch(lm, batch: list[dict], template: str, stops: list[str], max_new_tokens: int,
                  seed: int) -> tuple[list[list[str]], int]:
    """Both turns of questions that share a temperature, decoded together turn by turn."""
    conversations = [[] for _ in batch]
    turns: list[list[str]] = [[] for _ in batch]
    failed = 0
    for t in range(max(len(q["turns"]) for q in batch)):
        live, prompts = [], []
        for i, q in enumerate(batch):
            if t >= len(q["turns"]):
                continue
            conversations[i].append({"role": "user", "content": q["turns"][t]})
            ids = lm.tokenizer.encode(render_chat(template, conversations[i], lm.tokenizer.special_tokens_map),
                                      bos=False)
            if len(ids) >= lm.config.max_seq_len:
                turns[i].append(FAILED)
                conversations[i].append({"role": "assistant", "content": FAILED})
                failed += 1
                continue
            live.append(i)
            prompts.append(ids)
        if prompts:
            done = generate(lm, prompts, max_new_tokens, sampling_for(batch[0]["category"], seed + t), stops)
            for i, c in zip(live, done):
                text = c.text.strip()
                turns[i].append(text)
                conversations[i].append({"role": "assistant", "content": text})
    return turns, failed


def answer_questions(lm, questions: list[dict], model_id: str, out: str | Path, max_new_tokens: int = 1024,
                     template: str | None = None, batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Appends answers to `out` as they finish (so an interrupted run resumes where it stopped), then rewrites
    it sorted by question id, as FastChat does. Returns counts of answered, skipped and failed turns."""
    from tqdm import tqdm

    if max_new_tokens < 1 or batch_size < 1:
        raise CamelidError("--max-new-tokens and --batch-size must be at least 1")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done_ids = {r["question_id"] for r in read_jsonl(out, ("question_id", "model_id"), "answer")
                if r["model_id"] == model_id} if out.exists() else set()
    todo = [q for q in questions if q["question_id"] not in done_ids]
    template = template or lm.template
    _, stops = resolve_template(template)
    by_temperature: dict[float, list[dict]] = {}
    for q in todo:
        by_temperature.setdefault(TEMPERATURE.get(q["category"], DEFAULT_TEMPERATURE), []).append(q)
    batches = [qs[i:i + batch_size] for qs in by_temperature.values() for i in range(0, len(qs), batch_size)]
    failed = 0
    bar = tqdm(total=len(todo), desc=f"answering ({model_id})", unit="q", disable=not progress, file=sys.stderr)
    for batch in batches:
        turns, n_failed = _answer_batch(lm, batch, template, stops, max_new_tokens, seed + batch[0]["question_id"])
        failed += n_failed
        append_jsonl(out, [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
                            "choices": [{"index": 0, "turns": t}], "tstamp": time.time()}
                           for q, t in zip(batch, turns)])
        bar.update(len(batch))
    bar.close()
    _sort_answers(out)
    if failed:
        print(f"warning: {failed} turns did not fit the model's context ({lm.config.max_seq_len} tokens) and were "
              f"recorded as {FAILED!r}", file=sys.stderr)
    return {"answered": len(todo), "skipped": len(done_ids), "failed_turns": failed, "out": str(out)}


def _sort_answers(path: Path) -> None:
    """Sorted by question id, one answer per (model, question): the last one written wins."""
    records = {(r["model_id"], r["question_id"]): r
               for r in read_jsonl(path, ("question_id", "model_id"), "answer")}
    write_text(path, "".join(json.dumps(records[k], ensure_ascii=False) + "\n"
                             for k in sorted(records, key=lambda k: (k[1], k[0]))))
