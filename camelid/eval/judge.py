"""`camelid judge`: LLM-as-a-judge with FastChat's MT-bench rules (llm_judge/common.py, show_result.py).

Single mode grades each answer 1-10; pairwise mode compares two answers, judged in both orders so position
bias cancels: verdicts that disagree count as a tie. Reference-based prompts grade math, reasoning and coding.
"""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from camelid.errors import CamelidError
from camelid.eval.judge_clients import Ask
from camelid.eval.questions import JUDGE_DATA, answer_turns, append_jsonl, read_jsonl
from camelid.files import atomic_file, write_text

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass
class Match:
    question: dict
    models: tuple[str, ...]  # one model (single) or two (pairwise)
    turn: int  # 1 or 2
    prompt: dict  # a judge_prompts.jsonl record
    reference: dict | None


def load_judge_prompts(path: str | Path | None = None) -> dict[str, dict]:
    path = path or JUDGE_DATA / "judge_prompts.jsonl"
    prompts = {p["name"]: p for p in read_jsonl(path, ("name", "system_prompt", "prompt_template", "output_format"),
                                                "judge prompt")}
    needed = [f"{base}{mt}" for base in ("single-v1", "single-math-v1", "pair-v2", "pair-math-v1")
              for mt in ("", "-multi-turn")]
    missing = [n for n in needed if n not in prompts]
    if missing:
        raise CamelidError(f"{path}: no judge prompt named {missing[0]!r}")
    return prompts


def prompt_name(kind: str, with_reference: bool, turn: int) -> str:
    base = {"single": ("single-v1", "single-math-v1"), "pair": ("pair-v2", "pair-math-v1")}[kind][with_reference]
    return base + ("-multi-turn" if turn == 2 else "")


def make_matches(questions: list[dict], answers: dict[str, dict], references: dict, prompts: dict[str, dict],
                 mode: str = "single", baseline: str | None = None) -> list[Match]:
    """Turn 1 of every question and turn 2 of the two-turn ones, for each model (single) or model pair."""
    models = sorted(answers)
    if mode == "single":
        groups = [(m,) for m in models]
    elif mode == "pairwise-baseline":
        if baseline not in answers:
            raise CamelidError(f"--baseline {baseline!r}: no answers from it (models: {', '.join(models)})")
        groups = [(m, baseline) for m in models if m != baseline]
    elif mode == "pairwise-all":
        groups = list(combinations(models, 2))
    else:
        raise CamelidError(f"--mode {mode!r}: use single, pairwise-baseline or pairwise-all")
    if not groups:
        raise CamelidError(f"--mode {mode}: needs answers from at least two models (got {', '.join(models)})")
    kind = "single" if mode == "single" else "pair"
    matches = []
    for q in questions:
        qid = q["question_id"]
        for m in {m for g in groups for m in g}:
            got = answers[m].get(qid)
            if got is None or len(answer_turns(got)) < len(q["turns"]):
                raise CamelidError(f"model {m!r}: no answer to {'question' if got is None else 'every turn of'} "
                                   f"{qid} (run camelid answer for it)")
        reference = references.get(qid) if q["category"] in NEED_REF_CATS else None
        for turn in range(1, min(len(q["turns"]), 2) + 1):
            name = prompt_name(kind, reference is not None, turn)
            matches += [Match(q, g, turn, prompts[name], reference) for g in groups]
    return matches


def fill_prompt(match: Match, answers: list[dict]) -> tuple[str, str]:
    """The judge's system and user prompts, formatted exactly as FastChat's run_judge_single/pair."""
    q, kw = match.question["turns"], {}
    if match.reference is not None:
        kw["ref_answer_1"] = answer_turns(match.reference)[0]
        if match.turn == 2:
            kw["ref_answer_2"] = answer_turns(match.reference)[1]
    turns = [answer_turns(a) for a in answers]
    if len(turns) == 1 and match.turn == 2:
        kw.update(question_1=q[0], question_2=q[1], answer_1=turns[0][0], answer_2=turns[0][1])
    elif len(turns) == 1:
        kw.update(question=q[0], answer=turns[0][0])
    elif match.turn == 2:
        kw.update(question_1=q[0], question_2=q[1], answer_a_1=turns[0][0], answer_b_1=turns[1][0],
                  answer_a_2=turns[0][1], answer_b_2=turns[1][1])
    else:
        kw.update(question=q[0], answer_a=turns[0][0], answer_b=turns[1][0])
    return match.prompt["system_prompt"], match.prompt["prompt_template"].format(**kw)


def parse_rating(judgment: str) -> float:
    """`[[8]]`, else `[8]`; -1 when the judge gave no rating (an error, left out of the averages)."""
    found = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return float(found.group(1)) if found else -1.0


def parse_verdict(judgment: str) -> str:
    for tag, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if tag in judgment:
            return verdict
    return "error"


def play(ask: Ask, judge_model: str, match: Match, answers: dict[str, dict]) -> dict:
    """One judgment line in FastChat's layout."""
    qid = match.question["question_id"]
    judge = [judge_model, match.prompt["name"]]
    if len(match.models) == 1:
        model = match.models[0]
        system, user = fill_prompt(match, [answers[model][qid]])
        judgment = ask(system, user)
        return {"question_id": qid, "model": model, "judge": judge, "user_prompt": user, "judgment": judgment,
                "score": parse_rating(judgment), "turn": match.turn, "tstamp": time.time()}
    m1, m2 = match.models
    row = {"question_id": qid, "model_1": m1, "model_2": m2}
    for game, (a, b), names in (("g1", (m1, m2), {"A": "model_1", "B": "model_2"}),
                                ("g2", (m2, m1), {"A": "model_2", "B": "model_1"})):
        system, user = fill_prompt(match, [answers[a][qid], answers[b][qid]])
        judgment = ask(system, user)
        verdict = parse_verdict(judgment)
        row.update({f"{game}_winner": names.get(verdict, verdict), f"{game}_user_prompt": user,
                    f"{game}_judgment": judgment})
    row.update(judge=judge, turn=match.turn, tstamp=time.time())
    order = ["question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt", "g1_judgment",
             "g2_user_prompt", "g2_judgment", "turn", "tstamp"]
    return {k: row[k] for k in order}


def _key(row: dict) -> tuple:
    models = (row["model"],) if "model" in row else (row["model_1"], row["model_2"])
    return row["question_id"], models, row["turn"], row["judge"][0]


def judge_matches(ask: Ask, judge_model: str, matches: list[Match], answers: dict[str, dict], out: str | Path,
                  parallel: int = 1, progress: bool = True) -> list[dict]:
    """Judges the matches not already in `out` (so an interrupted run resumes), appending each line as it
    comes back. Returns every line of `out` for these matches."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r): r for r in read_jsonl(out, ("question_id", "turn", "judge"), "judgment")} if out.exists() else {}
    keys = [(m.question["question_id"], m.models, m.turn, judge_model) for m in matches]
    todo = [m for m, k in zip(matches, keys) if k not in done]
    bar = tqdm(total=len(todo), desc=f"judging with {judge_model}", unit="match", disable=not progress,
               file=sys.stderr)
    pool = ThreadPoolExecutor(parallel) if parallel > 1 else None
    rows = (f.result() for f in as_completed([pool.submit(play, ask, judge_model, m, answers) for m in todo])) \
        if pool else (play(ask, judge_model, m, answers) for m in todo)
    try:
        for row in rows:
            append_jsonl(out, [row])
            done[_key(row)] = row
            bar.update(1)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)  # a failed request stops the run without spending more
        bar.close()
    return [done[k] for k in keys]


def single_scores(rows: list[dict]) -> dict[str, dict]:
    """Per model: mean score of turn 1, of turn 2 and of all turns (the MT-bench score), per category too."""
    by_model: dict[str, dict] = {}
    for r in rows:
        s = by_model.setdefault(r["model"], {"turns": {}, "errors": 0})
        if r["score"] < 0:
            s["errors"] += 1
            continue
        s["turns"].setdefault(r["turn"], []).append(r["score"])
    table = {}
    for model, s in by_model.items():
        every = [x for xs in s["turns"].values() for x in xs]
        table[model] = {**{f"turn_{t}": _mean(s["turns"].get(t, [])) for t in (1, 2)}, "score": _mean(every),
                        "judged": len(every), "errors": s["errors"]}
    return dict(sorted(table.items(), key=lambda kv: -(kv[1]["score"] or 0)))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def pairwise_rates(rows: list[dict], baseline: str | None = None) -> dict[str, dict]:
    """FastChat's display_result_pairwise: errors dropped, a tie or disagreeing games count as a tie for both."""
    counts: dict[str, dict] = {}

    def bump(model, what):
        counts.setdefault(model, {"win": 0, "loss": 0, "tie": 0, "errors": 0})[what] += 1

    for r in rows:
        m1, m2, g1, g2 = r["model_1"], r["model_2"], r["g1_winner"], r["g2_winner"]
        if "error" in (g1, g2):
            bump(m1, "errors"), bump(m2, "errors")
        elif g1 == "tie" or g1 != g2:
            bump(m1, "tie"), bump(m2, "tie")
        else:
            winner, loser = (m1, m2) if g1 == "model_1" else (m2, m1)
            bump(winner, "win"), bump(loser, "loss")
    table = {}
    for model, c in counts.items():
        if model == baseline:
            continue
        n = c["win"] + c["loss"] + c["tie"]
        table[model] = {**c, "win_rate": c["win"] / n if n else None, "loss_rate": c["loss"] / n if n else None,
                        "win_rate_adjusted": (c["win"] + 0.5 * c["tie"]) / n if n else None}
    return dict(sorted(table.items(), key=lambda kv: -(kv[1]["win_rate_adjusted"] or 0)))


def format_scores(table: dict[str, dict]) -> str:
    columns = list(next(iter(table.values())))
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["|model|" + "|".join(columns) + "|", "|---|" + "---:|" * len(columns)]
    lines += [f"|{m}|" + "|".join(fmt(row[c]) for c in columns) + "|" for m, row in table.items()]
    return "\n".join(lines)


def plot_scores(table: dict[str, dict], mode: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(table)[::-1]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(models)))
    y = range(len(models))
    if mode == "single":
        for k, (key, label) in enumerate((("turn_1", "turn 1"), ("turn_2", "turn 2"), ("score", "overall"))):
            ax.barh([i + (k - 1) * 0.27 for i in y], [table[m][key] or 0 for m in models], height=0.27, label=label)
        ax.set_xlim(0, 10)
        ax.set_xlabel("score (1-10)")
    else:
        left = [0.0] * len(models)
        for key, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
            share = [table[m][key] / max(1, table[m]["win"] + table[m]["tie"] + table[m]["loss"]) for m in models]
            ax.barh(list(y), share, left=left, color=color, label=key)
            left = [a + b for a, b in zip(left, share)]
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of judged matches")
    ax.set_yticks(list(y), models)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"LLM-as-a-judge ({mode})")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_summary(table: dict[str, dict], mode: str, out_dir: Path, stem: str) -> list[Path]:
    """<stem>.json, <stem>.md and <stem>.png, each written whole or not at all."""
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    for path, text in zip(paths, (json.dumps({"mode": mode, "models": table}, indent=2), format_scores(table) + "\n")):
        write_text(path, text)
    plot_scores(table, mode, paths[2])
    return paths
