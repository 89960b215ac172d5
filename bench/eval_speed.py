"""Multiple-choice evaluation speed: camelid eval against lm-evaluation-harness's Hugging Face backend on
the same model, task files and settings, in the same run.

The model is GPT-2 small's shape (hidden 768, 12 layers, 12 heads, 1024 positions; 124M parameters, random
weights) with the real GPT-2 tokenizer, fp32 on CPU. lm-eval runs its own task YAMLs pointed at the same
local files (tests/lm_eval_local.py). Both are timed from task loading to metrics, the model already
loaded; the engines alternate for --repeats rounds and the medians are compared. Prints one JSON line per
task with both items/s and the ratio, and checks that the accuracies agree.

    python bench/eval_speed.py [--threads 2] [--hellaswag 60] [--mmlu 40] [--lm-eval-batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12)
TASKS = {"hellaswag": 0, "mmlu_abstract_algebra": 5}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hellaswag", type=int, default=60, help="HellaSwag questions (0-shot)")
    ap.add_argument("--mmlu", type=int, default=40, help="MMLU abstract algebra questions (5-shot)")
    ap.add_argument("--lm-eval-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from camelid.eval.harness import EvalSettings, evaluate
    from camelid.formats.load import load_model

    from lm_eval_local import tiny_gpt2, write_local_tasks

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="camelid-eval-bench-"))
    tiny_gpt2(root / "model", n_positions=1024, **GPT2_SMALL)
    data_dir, task_dir = write_local_tasks(root, {**TASKS, "arc_easy": 0, "truthfulqa_mc1": 0, "truthfulqa_mc2": 0},
                                           n_hellaswag=args.hellaswag, n_mmlu=args.mmlu)
    ours_lm = load_model(root / "model")
    theirs_lm = HFLM(pretrained=str(root / "model"), dtype="float32", device="cpu", batch_size=args.lm_eval_batch)
    manager = TaskManager(include_path=str(task_dir))
    n_items = {"hellaswag": args.hellaswag, "mmlu_abstract_algebra": args.mmlu}

    for task, shots in TASKS.items():
        ours_t, theirs_t = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours, _ = evaluate(ours_lm, EvalSettings([task], str(data_dir), num_fewshot=shots))
            ours_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = simple_evaluate(model=theirs_lm, tasks=[f"local_{task}"], num_fewshot=shots, task_manager=manager)
            theirs_t.append(time.perf_counter() - t0)
        acc = ours["results"][task]["acc,none"]
        ref_acc = theirs["results"][f"local_{task}"]["acc,none"]
        ours_rate, theirs_rate = n_items[task] / statistics.median(ours_t), n_items[task] / statistics.median(theirs_t)
        print(json.dumps({"bench": "eval_speed", "task": task, "shots": shots, "items": n_items[task],
                          "model": "gpt2-small-shape fp32", "threads": args.threads,
                          "camelid_items_per_s": round(ours_rate, 3), "lm_eval_items_per_s": round(theirs_rate, 3),
                          "lm_eval_batch_size": args.lm_eval_batch, "ratio": round(ours_rate / theirs_rate, 2),
                          "acc_camelid": acc, "acc_lm_eval": ref_acc, "acc_equal": abs(acc - ref_acc) < 1e-9}),
              flush=True)


if __name__ == "__main__":
    main()
