"""Speculative decoding against plain decoding, same model, same run: tokens/s, the ratio and the acceptance.

The target is bench/finetune.py's 160M LLaMA shape with random weights (or --target MODEL). Cases:
- `lookup-greedy`: prompt lookup, greedy. Greedy decoding of such a model falls into a cycle within tens of
  tokens, which lookup then drafts: where speculation should pay (text that repeats itself).
- `lookup-sampled`: prompt lookup at temperature 1: nothing repeats, where it should not pay (the cost of
  drafting and verifying for little).
- `draft-sampled` / `draft-greedy`: a draft model (the target's first two layers with its embeddings and
  head, or --draft MODEL); with random weights it agrees little, which measures the overhead.
The outputs of the greedy cases are checked equal to plain decoding's. Each case runs twice and the second
run counts (the first compiles the CPU kernel for the row counts it meets). Prints one JSON line per case.

    python bench/speculative.py [--threads 2] [--new-tokens 128] [--draft-tokens 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from camelid.formats.load import load_model  # noqa: E402
from camelid.generate.decoding import prepare_for_decoding  # noqa: E402
from camelid.generate.generate import generate_tokens  # noqa: E402
from camelid.generate.sampling import SamplingParams  # noqa: E402
from camelid.generate.speculative import DraftModel, PromptLookup, SpeculationStats, speculative_tokens  # noqa: E402


def first_layers(model, n: int):
    """The target cut to its first n blocks: a draft that shares its embeddings and head."""
    draft = copy.deepcopy(model)
    draft.layers = draft.layers[:n]
    draft.cfg = copy.copy(model.cfg)
    draft.cfg.n_layers = n
    return draft


def timed(run, *args, **kwargs) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    tokens = [t[0] for t in run(*args, **kwargs)]
    return tokens, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.target:
        model = load_model(args.target).model
    else:
        from finetune import make_base

        folder = Path(tempfile.mkdtemp()) / "base"
        make_base(folder)
        model = load_model(folder).model
    prepare_for_decoding(model)
    draft = load_model(args.draft).model if args.draft else first_layers(model, 2)
    prompt = list(range(10, 74))
    cases = {"lookup-greedy": (SamplingParams.greedy(), "lookup"), "lookup-sampled": (SamplingParams(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), "lookup"),
        "draft-greedy": (SamplingParams.greedy(), "draft"),
        "draft-sampled": (SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), "draft")}
    for name, (params, kind) in cases.items():
        for _ in range(2):  # the first run compiles the CPU kernel for each row count it meets
            plain, plain_s = timed(generate_tokens, model, [prompt], args.new_tokens, params)
            stats = SpeculationStats()
            drafter = PromptLookup(3) if kind == "lookup" else DraftModel(draft, model.cfg.vocab_size, params, 2)
            fast, fast_s = timed(speculative_tokens, model, prompt, args.new_tokens, params, drafter,
                                 args.draft_tokens, speculation=stats)
        if params.temperature == 0:
            assert fast == plain, f"{name}: speculative greedy output differs from plain greedy"
        print(json.dumps({"bench": "speculative", "case": name, "threads": args.threads,
                          "tokens": len(fast), "plain_tok_s": round(len(plain) / plain_s, 1),
                          "speculative_tok_s": round(len(fast) / fast_s, 1),
                          "ratio": round((len(fast) / fast_s) / (len(plain) / plain_s), 2),
                          "acceptance": round(stats.acceptance_rate, 3),
                          "tokens_per_pass": round(len(fast) / max(stats.rounds, 1), 2)}))


if __name__ == "__main__":
    main()
