"""`camelid leaderboard`: results files (camelid's or lm-eval's own) side by side, the Open LLM Leaderboard view."""

from __future__ import annotations

import json
import re
from pathlib import Path

from camelid.errors import CamelidError
from camelid.eval.tasks import LEADERBOARD_METRIC
from camelid.files import atomic_file, write_text

MMLU_GROUPS = ("mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other")
PERPLEXITY_METRICS = ("word_perplexity", "perplexity")


def model_name(results: dict, path: Path) -> str:
    config = results.get("config", {})
    found = re.search(r"pretrained=([^,]+)", str(config.get("model_args", "")))
    name = results.get("model_name") or (found and found.group(1)) or config.get("model") or path.parent.name
    return Path(str(name).rstrip("/")).name or str(name)


def task_score(task: str, row: dict) -> tuple[str, float] | None:
    """The leaderboard's metric for its tasks, else acc_norm, acc or perplexity; accuracies as percentages."""
    for metric in (LEADERBOARD_METRIC.get(task), "acc_norm", "acc", "acc_macro"):
        if metric and isinstance(row.get(f"{metric},none"), (int, float)):
            return metric, 100 * row[f"{metric},none"]
    for metric in PERPLEXITY_METRICS:
        if isinstance(row.get(f"{metric},none"), (int, float)):
            return metric, row[f"{metric},none"]
    return None


def read_scores(path: str | Path) -> tuple[str, dict[str, tuple[str, float]]]:
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CamelidError(f"{path}: not a readable results JSON ({exc.__class__.__name__})") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise CamelidError(f"{path}: no 'results' object (expected camelid eval's or lm-eval's results file)")
    scores = {}
    for task, row in results["results"].items():
        if (task.startswith("mmlu_") and task not in MMLU_GROUPS) or not isinstance(row, dict):
            continue
        found = task_score(task, row)
        if found:
            scores[task] = found
    if not scores:
        raise CamelidError(f"{path}: no accuracy or perplexity metrics in 'results'")
    return model_name(results, path), scores


def leaderboard(paths: list[str], names: list[str] | None = None) -> tuple[list[str], dict[str, dict]]:
    """Task columns and {model: {task: (metric, value), "average": ...}}, best average first. The average
    is the Open LLM Leaderboard v1's: the mean of its four tasks, only where a model has all four."""
    if names and len(names) != len(paths):
        raise CamelidError(f"--names: {len(names)} names for {len(paths)} results files")
    rows: dict[str, dict] = {}
    for i, path in enumerate(paths):
        name, scores = read_scores(path)
        name = names[i] if names else name
        while name in rows:
            name += "'"
        rows[name] = scores
    tasks = [t for t in LEADERBOARD_METRIC if any(t in r for r in rows.values())]
    tasks += sorted({t for r in rows.values() for t in r} - set(tasks))
    for scores in rows.values():
        if all(t in scores for t in LEADERBOARD_METRIC):
            scores["average"] = ("average", sum(scores[t][1] for t in LEADERBOARD_METRIC) / len(LEADERBOARD_METRIC))
    order = sorted(rows, key=lambda m: -rows[m].get("average", ("", -1.0))[1])
    columns = tasks + (["average"] if any("average" in r for r in rows.values()) else [])
    return columns, {m: rows[m] for m in order}


def format_leaderboard(columns: list[str], rows: dict[str, dict]) -> str:
    metric = {c: next((r[c][0] for r in rows.values() if c in r), "") for c in columns}
    head = [f"{c} ({metric[c]})" if metric[c] != c else c for c in columns]
    lines = ["|model|" + "|".join(head) + "|", "|---|" + "---:|" * len(columns)]
    for model, scores in rows.items():
        lines.append(f"|{model}|" + "|".join(f"{scores[c][1]:.2f}" if c in scores else "" for c in columns) + "|")
    return "\n".join(lines)


def plot_leaderboard(columns: list[str], rows: dict[str, dict], path: Path) -> bool:
    """Grouped bars: one group per task, one bar per model (accuracies only; perplexity has its own scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in columns if not any(c in r and r[c][0] in PERPLEXITY_METRICS for r in rows.values())]
    if not shown:
        return False
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(shown) + 2), 4.5))
    for k, (model, scores) in enumerate(rows.items()):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(shown))]
        ax.bar(xs, [scores[c][1] if c in scores else 0 for c in shown], width, label=model)
    ax.set_xticks(range(len(shown)), shown, rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("camelid leaderboard")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def write_leaderboard(columns: list[str], rows: dict[str, dict], out: str | Path) -> list[Path]:
    """<out>.md, <out>.json and, where there are accuracies to chart, <out>.png."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".md"), out.with_suffix(".json"), out.with_suffix(".png")]
    data = {m: {c: {"metric": s[c][0], "value": s[c][1]} for c in columns if c in s} for m, s in rows.items()}
    for path, text in zip(paths, (format_leaderboard(columns, rows) + "\n", json.dumps(data, indent=2))):
        write_text(path, text)
    return paths if plot_leaderboard(columns, rows, paths[2]) else paths[:2]
