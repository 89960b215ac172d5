"""Run multiple-choice tasks and report them in lm-evaluation-harness's results layout.

Metrics as lm-eval computes them: acc = argmax of the log-likelihoods; acc_norm divides each by the
choice's length in characters; truthfulqa_mc2 is the probability mass on the true answers; standard
errors are the sample standard deviation over sqrt(n); MMLU's group reports the average over all questions
(lm-eval's mmlu group) and, as acc_macro, the average over the 57 subjects (the Open LLM Leaderboard v1)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

from camelid.eval.loglikelihood import Request, loglikelihoods
from camelid.eval.tasks import LEADERBOARD_METRIC, LEADERBOARD_V1, MMLU_CATEGORIES, Item, load_task, prompts


@dataclass
class EvalSettings:
    tasks: list[str]
    data_dir: str
    num_fewshot: int | None = None  # None: the suite's count, else 0
    limit: int | None = None
    seed: int = 1234
    fewshot_sampler: str = "lm-eval"
    bos: bool = False  # add the tokenizer's BOS (lm-eval >= 0.4.10); off as in the leaderboard and <= 0.4.9
    batch_tokens: int = 4096
    shots: dict = field(default_factory=dict)  # per-task few-shot counts of a suite


def suite_settings(suite: str, data_dir: str, **kw) -> EvalSettings:
    if suite != "leaderboard-v1":
        raise ValueError(suite)
    return EvalSettings(list(LEADERBOARD_V1), data_dir, shots=dict(LEADERBOARD_V1),
                        **{"fewshot_sampler": "leaderboard-v1", **kw})


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the first, as np.argmax


def item_metrics(task_metrics: tuple[str, ...], item: Item, lls: list[float]) -> dict:
    if item.labels is not None:  # truthfulqa_mc2, normalised stably (lm-eval exponentiates the raw sums)
        top = max(lls)
        probs = [math.exp(ll - top) for ll in lls]
        return {"acc": sum(p for p, label in zip(probs, item.labels) if label == 1) / sum(probs)}
    out = {"acc": float(argmax(lls) == item.gold)}
    if "acc_norm" in task_metrics:
        out["acc_norm"] = float(argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.gold)
    return out


def mean_stderr(values: list[float]) -> tuple[float, float | str]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, "N/A"
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def pooled_stderr(stderrs: list[float], sizes: list[int]) -> float | str:
    if any(isinstance(s, str) for s in stderrs) or sum(sizes) <= len(sizes):
        return "N/A"
    var = sum((n - 1) * s ** 2 * n for s, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def evaluate(lm, settings: EvalSettings) -> tuple[dict, dict[str, list[dict]]]:
    """Results in lm-eval's layout, and the per-sample records of every task."""
    began = time.time()
    planned = []  # (task, n_shot, [(item, context)])
    for name in settings.tasks:
        shots = settings.shots.get(name, settings.num_fewshot or 0) if settings.num_fewshot is None \
            else settings.num_fewshot
        for task in load_task(name, settings.data_dir):
            if task.fixed_shots is not None and shots != task.fixed_shots:
                print(f"{task.name}: always {task.fixed_shots}-shot (its fixed prompt holds the examples); "
                      f"ignoring {shots} shots", file=sys.stderr)
                shots = task.fixed_shots
            planned.append((name, task, shots, prompts(task, shots, settings.limit, settings.seed,
                                                       settings.fewshot_sampler)))
    requests, owners = [], []
    for p, (_, _, _, items) in enumerate(planned):
        for k, (item, context) in enumerate(items):
            for choice in item.choices:
                requests.append(Request(context, " " + choice))
                owners.append((p, k))
    truncated: list[int] = []
    scores = loglikelihoods(lm, requests, bos=settings.bos, batch_tokens=settings.batch_tokens, truncated=truncated)
    cut = {}
    for i in truncated:
        cut[planned[owners[i][0]][1].name] = cut.get(planned[owners[i][0]][1].name, 0) + 1

    results, samples, configs, nshot, n_samples, versions = {}, {}, {}, {}, {}, {}
    position = 0
    for _name, task, shots, items in planned:
        per_metric: dict[str, list[float]] = {m: [] for m in task.metrics}
        records = []
        for k, (item, context) in enumerate(items):
            got = scores[position:position + len(item.choices)]
            position += len(item.choices)
            m = item_metrics(task.metrics, item, [ll for ll, _ in got])
            for key, value in m.items():
                per_metric[key].append(value)
            records.append({"doc_id": k, "doc": item.doc, "target": item.gold,
                            "arguments": [[context, " " + c] for c in item.choices],
                            "resps": [[ll, greedy] for ll, greedy in got], **m})
        row = {"alias": task.name}
        for key, values in per_metric.items():
            mean, se = mean_stderr(values)
            row[f"{key},none"], row[f"{key}_stderr,none"] = mean, se
        if cut.get(task.name):
            row["truncated_requests"] = cut[task.name]
        results[task.name] = row
        samples[task.name] = records
        versions[task.name] = task.version
        nshot[task.name] = shots
        n_samples[task.name] = {"original": len(task.items), "effective": len(items)}
        configs[task.name] = {"task": task.name, "num_fewshot": shots, "description": task.description,
                              "target_delimiter": " ", "fewshot_delimiter": "\n\n", "metric_list": list(task.metrics),
                              "fewshot_sampler": "first_n" if task.sampler == "first_n" else settings.fewshot_sampler}
    warn_truncated(planned, owners, truncated, lm.config.max_seq_len)
    groups, group_subtasks = mmlu_groups(results, n_samples)
    results.update(groups)
    out = {"results": results, "groups": groups, "group_subtasks": group_subtasks, "configs": configs,
           "versions": versions, "n-shot": nshot, "n-samples": n_samples,
           "higher_is_better": {t: {m.split(",")[0]: True for m in r if m.endswith(",none") and "stderr" not in m}
                                for t, r in results.items()},
           "config": {"model": "camelid", "model_args": lm.source,
                      "model_num_parameters": sum(p.numel() for p in lm.model.parameters()),
                      "model_dtype": str(lm.model.dtype), "device": str(lm.model.device),
                      "batch_tokens": settings.batch_tokens, "limit": settings.limit, "fewshot_seed": settings.seed,
                      "fewshot_sampler": settings.fewshot_sampler, "add_bos_token": settings.bos,
                      "max_length": lm.config.max_seq_len},
           "date": began, "total_evaluation_time_seconds": str(time.time() - began)}
    if settings.shots:
        out["leaderboard"] = leaderboard_scores(results)
    return out, samples


def warn_truncated(planned, owners, truncated, max_len):
    """Say, per requested task, how many prompts lost tokens to the model's context: lm-eval cuts them
    from the front without a word, which drops shots."""
    total, cut = {}, {}
    for p, _ in owners:
        total[planned[p][0]] = total.get(planned[p][0], 0) + 1
    for i in truncated:
        name = planned[owners[i][0]][0]
        cut[name] = cut.get(name, 0) + 1
    for name, n in cut.items():
        print(f"{name}: {n} of {total[name]} requests are longer than the model's {max_len}-token context; "
              f"their prompts lose tokens from the front (shots first), as lm-eval does", file=sys.stderr)


def mmlu_groups(results: dict, n_samples: dict) -> tuple[dict, dict]:
    subjects = [t for t in results if t.startswith("mmlu_") and t[5:] in MMLU_CATEGORIES]
    if not subjects:
        return {}, {}
    groups, members = {}, {"mmlu": subjects}
    for category in sorted(set(MMLU_CATEGORIES.values())):
        inside = [t for t in subjects if MMLU_CATEGORIES[t[5:]] == category]
        if inside:
            members[f"mmlu_{category}"] = inside
    for group, tasks in members.items():
        sizes = [n_samples[t]["effective"] for t in tasks]
        accs = [results[t]["acc,none"] for t in tasks]
        groups[group] = {"alias": group, "acc,none": sum(a * n for a, n in zip(accs, sizes)) / sum(sizes),
                         "acc_stderr,none": pooled_stderr([results[t]["acc_stderr,none"] for t in tasks], sizes),
                         "acc_macro,none": sum(accs) / len(accs)}
    return groups, members


def leaderboard_scores(results: dict) -> dict:
    """The Open LLM Leaderboard v1 columns (percent) and their average."""
    scores = {}
    for task, metric in LEADERBOARD_METRIC.items():
        if task in results:
            scores[task] = 100 * results[task][f"{metric},none"]
    if len(scores) == len(LEADERBOARD_METRIC):
        scores["average"] = sum(scores.values()) / len(scores)
    return scores


def format_table(results: dict) -> str:
    """lm-eval's make_table layout."""
    lines = ["|Tasks|Version|Filter|n-shot|Metric| |Value| |Stderr|", "|---|---|---|---|---|---|---:|---|---:|"]
    shown = [t for t in results["results"] if not (t.startswith("mmlu_") and t[5:] in MMLU_CATEGORIES)]
    for task in shown:
        row = results["results"][task]
        for key, value in row.items():
            if not key.endswith(",none") or "_stderr" in key:
                continue
            metric = key.split(",")[0]
            se = row.get(f"{metric}_stderr,none", "N/A")
            version = results.get("versions", {}).get(task, "")
            n_shot, groups = results.get("n-shot", {}), results.get("group_subtasks", {})
            shots = n_shot.get(task, n_shot.get(groups.get(task, [""])[0], ""))
            se_text = f"{se:.4f}" if isinstance(se, float) else se
            arrow = "↓" if "perplexity" in metric or metric in ("bits_per_byte", "plus_minus") else "↑"
            lines.append(f"|{task}|{version}|none|{shots}|{metric}|{arrow}|{value:.4f}|±|{se_text}|")
    return "\n".join(lines)
