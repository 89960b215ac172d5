"""`camelid self-instruct`: new instruction data the way Stanford Alpaca made its 52K (Wang et al. 2022,
Taori et al. 2023). Each request shows a model Alpaca's prompt and 3 tasks sampled from the 175 human seed
tasks, asks for the rest of a list of 20, and keeps the new tasks that pass the filters: length, a keyword
blocklist, well-formed text, and ROUGE-L similarity below 0.7 to every task kept so far.

The model is a local camelid model or any OpenAI-compatible completions endpoint. The output is Alpaca JSON,
rewritten atomically after every request, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import random
import re
import string
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from camelid.errors import CamelidError
from camelid.files import write_text

# Alpaca's blocklist: tasks a text-only model cannot do.
BLOCKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
PROMPT_TASKS = 3
MAX_SIMILARITY = 0.7

Complete = Callable[[str], tuple[str, str]]  # prompt -> (text, finish_reason)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lowercase alphanumeric words."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1: the longest common subsequence against both lengths."""
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def read_seed_tasks(path: str | Path) -> list[dict]:
    tasks = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                instance = record["instances"][0]
                tasks.append({"instruction": record["instruction"], "input": instance.get("input", ""),
                              "output": instance["output"]})
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                raise CamelidError(f"{path}:{n}: not a seed task (instruction and instances[0].output)") from None
    if not tasks:
        raise CamelidError(f"{path}: no seed tasks")
    return tasks


def encode_prompt(preamble: str, tasks: list[dict]) -> str:
    """Alpaca's prompt: the requirements, then numbered example tasks, then the next number to fill in."""
    prompt = preamble.rstrip("\n") + "\n"
    for i, t in enumerate(tasks, 1):
        instruction = re.sub(r"\s+", " ", t["instruction"]).strip().rstrip(":")
        prompt += (f"###\n{i}. Instruction: {instruction}\n{i}. Input:\n{t['input'] or '<noinput>'}\n"
                   f"{i}. Output:\n{t['output']}\n")
    return prompt + f"###\n{len(tasks) + 1}. Instruction:"


def parse_tasks(text: str, finish_reason: str, first: int, dropped: Counter) -> list[dict]:
    """Tasks numbered from `first` in a completion; malformed ones are counted in `dropped`."""
    parts = re.split("###", f"{first}. Instruction:" + text)
    tasks = []
    for k, part in enumerate(parts):
        if k == len(parts) - 1 and finish_reason == "length":
            dropped["cut_off"] += 1  # the last task was cut off by the token limit
            continue
        fields = re.split(rf"{first + k}\.\s+(Instruction|Input|Output):", part)
        if len(fields) != 7:
            dropped["malformed"] += 1
            continue
        inp = fields[4].strip()
        tasks.append({"instruction": fields[2].strip(), "input": "" if inp.lower() == "<noinput>" else inp,
                      "output": fields[6].strip()})
    return tasks


def task_problem(task: dict, blocklist: tuple[str, ...] = BLOCKLIST) -> str | None:
    """Alpaca's filters, by name; None when the task passes them."""
    inst = task["instruction"]
    words = inst.split()
    if len(words) <= 3 or len(words) > 150:
        return "length"
    if any(re.search(rf"\b{re.escape(w)}\b", inst, re.IGNORECASE) for w in blocklist):
        return "blocklist"
    if inst.startswith("Write a program"):
        return "write_a_program"
    if inst[0] in string.punctuation:
        return "starts_with_punctuation"
    if not inst[0].isascii():
        return "non_english"
    if not task["output"]:
        return "empty_output"
    return None


def endpoint_client(url: str, model: str, max_tokens: int, api_key: str | None = None,
                    timeout: float = 600) -> Complete:
    """An OpenAI-compatible /completions endpoint (OpenAI, camelid serve, vLLM, llama.cpp's server)."""
    base = url.rstrip("/")
    target = base + ("/completions" if base.endswith("/v1") else "/v1/completions")

    def complete(prompt: str) -> tuple[str, str]:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                           "top_p": 1.0, "stop": ["\n20", "20.", "20 ."]}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(target, body, headers), timeout=timeout) as r:
                choice = json.loads(r.read())["choices"][0]
        except urllib.error.HTTPError as exc:
            raise CamelidError(f"{target}: HTTP {exc.code} {exc.read()[:200].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise CamelidError(f"{target}: cannot connect ({getattr(exc, 'reason', exc)})") from None
        except (KeyError, IndexError, json.JSONDecodeError):
            raise CamelidError(f"{target}: not an OpenAI-style completions response") from None
        return choice.get("text", ""), choice.get("finish_reason") or "stop"
    return complete


def local_client(model_path: str, max_tokens: int, seed: int) -> Complete:
    from camelid.formats.load import load_model
    from camelid.generate.generate import generate
    from camelid.generate.sampling import SamplingParams

    lm = load_model(model_path)
    calls = {"n": 0}

    def complete(prompt: str) -> tuple[str, str]:
        calls["n"] += 1
        room = lm.config.max_seq_len - len(lm.tokenizer.encode(prompt))
        if room < 16:
            raise CamelidError(f"{model_path}: the Self-Instruct prompt does not fit the model's context "
                               f"({lm.config.max_seq_len} tokens)")
        params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=seed + calls["n"])
        done = generate(lm, [prompt], min(max_tokens, room), params, stop=["\n20", "20."])[0]
        return done.text, done.finish_reason
    return complete


def self_instruct(complete: Complete, seed_path: str | Path, prompt_path: str | Path, out: str | Path,
                  num_instructions: int, seed: int = 0, requests_limit: int | None = None) -> dict:
    seeds = read_seed_tasks(seed_path)
    try:
        preamble = Path(prompt_path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CamelidError(f"{prompt_path}: cannot read the prompt ({exc.__class__.__name__})") from None
    out = Path(out)
    report_path = out.with_name(out.stem + ".report.json")
    generated = json.loads(out.read_text(encoding="utf-8")) if out.exists() else []
    report = json.loads(report_path.read_text()) if report_path.exists() else {"requests": 0, "dropped": {}}
    dropped = Counter(report["dropped"])
    known = [rouge_tokens(t["instruction"]) for t in seeds + generated]
    rng = random.Random(seed + report["requests"])  # a resumed run does not replay the same prompts
    bar = tqdm(total=num_instructions, initial=len(generated), desc="self-instruct", unit="task", disable=None)
    requests = 0
    while len(generated) < num_instructions and (requests_limit is None or requests < requests_limit):
        text, finish = complete(encode_prompt(preamble, rng.sample(seeds, PROMPT_TASKS)))
        requests += 1
        for task in parse_tasks(text, finish, PROMPT_TASKS + 1, dropped):
            problem = task_problem(task)
            if problem is None:
                tokens = rouge_tokens(task["instruction"])
                if any(rouge_l(tokens, other) > MAX_SIMILARITY for other in known):
                    problem = "similar"
            if problem:
                dropped[problem] += 1
                continue
            known.append(tokens)
            generated.append(task)
            bar.update(1)
        report = {"requests": report["requests"] + 1, "kept": len(generated), "dropped": dict(dropped)}
        _write_json(out, generated[:num_instructions])
        _write_json(report_path, report)
    bar.close()
    return report


def _write_json(path: Path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=1, ensure_ascii=False))
