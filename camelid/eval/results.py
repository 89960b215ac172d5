"""Results files in lm-evaluation-harness's layout: results_<time>.json and samples_<task>_<time>.jsonl."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from camelid.files import write_text


def merge(a: dict | None, b: dict) -> dict:
    """One results document from two (perplexity and the multiple-choice tasks of one run)."""
    if a is None:
        return b
    out = dict(b)
    for key in ("results", "n-samples", "configs", "versions", "n-shot", "higher_is_better", "group_subtasks"):
        out[key] = {**a.get(key, {}), **b.get(key, {})}
    out["config"] = {**a.get("config", {}), **b.get("config", {})}
    return out


def write_results(results: dict, output: str | Path, samples: dict[str, list[dict]] | None = None,
                  model_name: str = "model") -> list[Path]:
    """`output` ending in .json is the results file; otherwise it is a folder that gets
    <model>/results_<time>.json as lm-eval writes it. Samples files go beside the results file."""
    stamp = datetime.now().isoformat().replace(":", "-")
    output = Path(output)
    if output.suffix == ".json":
        path = output
    else:
        path = output / re.sub(r'["<>:/|\\?*\[\]]+', "__", str(model_name)) / f"results_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=2, ensure_ascii=False, default=str))
    written = [path]
    for task, records in (samples or {}).items():
        sample_path = path.with_name(f"samples_{task}_{stamp}.jsonl")
        write_text(sample_path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
        written.append(sample_path)
    return written
