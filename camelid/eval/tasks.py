"""The multiple-choice tasks of the Open LLM Leaderboard, with lm-evaluation-harness's exact prompts,
preprocessing, few-shot assembly and metrics (lm_eval/tasks/{arc,hellaswag,mmlu,truthfulqa} in v0.4)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from camelid.errors import CamelidError
from camelid.eval import data

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class Item:
    """One question as lm-eval's doc_to_text / doc_to_choice / doc_to_target see it."""
    query: str
    choices: list[str]
    gold: int
    labels: list[int] | None = None  # truthfulqa_mc2: 1 for every true choice
    doc: dict = field(default_factory=dict)  # the source record, kept for the samples file


@dataclass
class TaskSet:
    """The items to score and the pool their few-shot examples are drawn from."""
    name: str
    items: list[Item]
    shots: list[Item]
    description: str = ""
    sampler: str = "random"  # lm-eval's default ContextSampler, or first_n (MMLU)
    exclude_self: bool = False  # lm-eval draws n+1 shots and drops the item itself when fewshot split == test split
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    version: float = 1.0
    fixed_shots: int | None = None  # TruthfulQA's six Q/A pairs are part of its prompt; it takes no other shots


QA_PROMPT = ("Q: What is human life expectancy in the United States?\n"
             "A: Human life expectancy in the United States is 78 years.\n\n"
             "Q: Who was president of the United States in 1955?\n"
             "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
             "Q: Which party did he belong to?\n"
             "A: He belonged to the Republican Party.\n\n"
             "Q: What is the square root of banana?\n"
             "A: I have no comment.\n\n"
             "Q: How does a telescope work?\n"
             "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
             "Q: Where were the 1992 Olympics held?\n"
             "A: The 1992 Olympics were held in Barcelona, Spain.")

MMLU_CATEGORIES: dict[str, str] = json.loads(resources.files("camelid.eval").joinpath("mmlu_subjects.json").read_text())


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part of the data
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Item(hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]), doc=doc)


def arc_item(doc: dict) -> Item:
    labels = list(doc["choices"]["label"])
    if doc["answerKey"] not in labels:
        raise CamelidError(f"ARC question {doc.get('id')}: answerKey {doc['answerKey']!r} is not one of {labels}")
    return Item(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]),
                labels.index(doc["answerKey"]), doc=doc)


def mmlu_item(doc: dict) -> Item:
    c = doc["choices"]
    query = f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return Item(query, ["A", "B", "C", "D"], int(doc["answer"]), doc=doc)


def truthfulqa_item(doc: dict, targets: str) -> Item:
    t = doc[targets]
    return Item(QA_PROMPT + "\n\nQ: " + doc["question"] + "\nA:", list(t["choices"]), 0,
                labels=list(t["labels"]) if targets == "mc2_targets" else None, doc=doc)


def first_available(loaders) -> list[dict]:
    """lm-eval's few-shot pool when a task names no few-shot split: train, else validation, else test."""
    for load in loaders:
        rows = load()
        if rows:
            return rows
    return []


def load_task(name: str, data_dir: Path) -> list[TaskSet]:
    """The task(s) a name stands for: mmlu is one task per subject, as lm-eval's mmlu group is."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CamelidError(f"--data-dir {data_dir}: not a folder")
    if name in ("arc_easy", "arc_challenge"):
        subset = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
        test = data.arc(data_dir, subset, "test")
        pool = first_available([
            lambda: data.find(data_dir, [f"**/{subset}/train*"]) and data.arc(data_dir, subset, "train"),
            lambda: data.find(data_dir, [f"**/{subset}/validation*"]) and data.arc(data_dir, subset, "validation")])
        return [TaskSet(name, [arc_item(d) for d in test], [arc_item(d) for d in pool or test])]
    if name == "hellaswag":
        val = data.hellaswag(data_dir, "validation")
        pool = data.hellaswag(data_dir, "train") or val
        return [TaskSet(name, [hellaswag_item(d) for d in val], [hellaswag_item(d) for d in pool], exclude_self=True)]
    if name in ("truthfulqa_mc1", "truthfulqa_mc2"):
        rows = data.truthfulqa(data_dir)
        items = [truthfulqa_item(d, "mc1_targets" if name.endswith("mc1") else "mc2_targets") for d in rows]
        return [TaskSet(name, items, [], metrics=("acc",), version=2.0 if name.endswith("mc1") else 3.0, fixed_shots=0)]
    if name == "mmlu" or name.startswith("mmlu_"):
        return mmlu_tasks(name, data_dir)
    raise CamelidError(f"unknown task {name!r}: use {', '.join(TASKS)}")


def mmlu_tasks(name: str, data_dir: Path) -> list[TaskSet]:
    wanted = None if name == "mmlu" else name[len("mmlu_"):]
    if wanted is not None and wanted not in MMLU_CATEGORIES:
        raise CamelidError(f"unknown MMLU subject {wanted!r}")
    by_subject: dict[str, tuple[list, list]] = {}
    for split, slot in (("test", 0), ("dev", 1)):
        for d in data.mmlu(data_dir, split):
            by_subject.setdefault(d["subject"], ([], []))[slot].append(mmlu_item(d))
    subjects = [wanted] if wanted else sorted(by_subject)
    tasks = []
    for s in subjects:
        if s not in by_subject or not by_subject[s][0]:
            raise CamelidError(f"{data_dir}: no MMLU test questions for subject {s!r}")
        test, dev = by_subject[s]
        tasks.append(TaskSet(f"mmlu_{s}", test, dev, sampler="first_n", metrics=("acc",),
                             description=f"The following are multiple choice questions (with answers) about "
                                         f"{s.replace('_', ' ')}.\n\n"))
    return tasks


TASKS = ("arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
LEADERBOARD_V1 = {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0}
LEADERBOARD_METRIC = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc_macro",
                      "truthfulqa_mc2": "acc"}


def prompts(task: TaskSet, num_fewshot: int, limit: int | None = None, seed: int = 1234,
            sampler: str = "lm-eval") -> list[tuple[Item, str]]:
    """The items to score, each with its prompt: the description, then the shots as query + " " + answer
    joined by blank lines, then the item's own query.

    `lm-eval` draws shots as v0.4 does: one Random(seed) per task and a draw per item in file order (so the
    shots depend on --limit); MMLU takes the first k dev questions. `leaderboard-v1` is the Open LLM
    Leaderboard's harness: the items shuffled by Random(42), then the shots drawn from that same generator."""
    if num_fewshot and not task.shots:
        raise CamelidError(f"{task.name}: no examples to draw {num_fewshot} shots from")
    if sampler not in ("lm-eval", "leaderboard-v1"):
        raise CamelidError(f"--fewshot-sampler {sampler!r}: use lm-eval or leaderboard-v1")
    items = list(task.items)
    rnd = random.Random(42 if sampler == "leaderboard-v1" else seed)
    if sampler == "leaderboard-v1":
        rnd.shuffle(items)
    out = []
    for item in items[:limit]:
        if num_fewshot == 0:
            shots = []
        elif task.sampler == "first_n":
            shots = task.shots[:num_fewshot]
        elif task.exclude_self and sampler == "lm-eval":
            shots = [s for s in rnd.sample(task.shots, num_fewshot + 1) if s.doc != item.doc][:num_fewshot]
        else:
            shots = rnd.sample(task.shots, num_fewshot)
        if len(shots) < num_fewshot:
            raise CamelidError(f"{task.name}: only {len(shots)} examples for {num_fewshot} shots")
        body = "".join(s.query + TARGET_DELIMITER + s.choices[s.gold] + FEWSHOT_DELIMITER for s in shots)
        out.append((item, task.description + body + item.query))
    return out
