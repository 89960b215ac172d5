"""Speculative decoding against plain decoding, same model, same run: tokens/s, the ratio and the acceptance.

Two sets of cases, each printing one JSON line:
- `trained-*` (where speculation should pay): a target and a much smaller draft, both trained by camelid on
  Tiny Shakespeare with one tokenizer (built once and cached in .cache/speculative: `camelid tokenizer train`,
  `camelid data tokenize`, `camelid pretrain` with the shapes below). `trained-lookup-repeat`: the target given
  a passage and then its first line again, greedy, prompt lookup drafting the rest of the passage, as a model
  asked to repeat or edit what it was given. `trained-draft-greedy` / `trained-draft-sampled`: the draft model
  drafting a continuation of a passage.
- `random-*` (where it should not pay): bench/finetune.py's 160M LLaMA shape with random weights (or --target
  MODEL). `random-lookup-greedy`: greedy decoding of such a model falls into a cycle within tens of tokens,
  which lookup then drafts; `random-lookup-sampled`: at temperature 1 nothing repeats (the cost of drafting and
  verifying for little); `random-draft-*`: the target's first two layers with its embeddings and head as the
  draft (or --draft MODEL), which agrees little, measuring the overhead.
The outputs of the greedy cases are checked equal to plain decoding's. Each case runs twice and the second
run counts (the first compiles the CPU kernel for the row counts it meets).

    python bench/speculative.py [--threads 2] [--new-tokens 128] [--draft-tokens 4] [--only trained|random]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]

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


CACHE = REPO / ".cache" / "speculative"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora" / "tinyshakespeare.txt"
# the target about 60 times the draft's arithmetic a token, as a 7B model is to a 110M draft
TRAINED = {"target": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1408, max_steps=300),
           "draft": dict(dim=96, n_layers=2, n_heads=3, n_kv_heads=3, ffn_dim=256, max_steps=300)}


def camelid(*argv: str):
    subprocess.run([sys.executable, "-m", "camelid.cli", *argv], check=True, stdout=subprocess.DEVNULL)


def trained_models() -> tuple[Path, Path]:
    """The target and the draft, trained by camelid on Tiny Shakespeare with one tokenizer (cached)."""
    tok, data = CACHE / "tok", CACHE / "data"
    if not (tok / "tokenizer.json").exists():
        camelid("tokenizer", "train", str(SHAKESPEARE), "--out", str(tok), "--vocab-size", "1024")
    if not (data / "val").exists():
        camelid("data", "tokenize", str(SHAKESPEARE), "--tokenizer", str(tok / "tokenizer.json"), "--out", str(data),
                "--val-fraction", "0.05")
    out = {}
    for name, shape in TRAINED.items():
        run = CACHE / name
        out[name] = run / "model"
        if out[name].exists():
            continue
        steps = shape["max_steps"]
        model = " ".join(f"model.{k}={v}" for k, v in shape.items() if k != "max_steps")
        camelid("pretrain", "--config", str(REPO / "recipes" / "tiny-shakespeare.yaml"), f"out_dir={run}",
                f"data={data / 'train'}", f"val_data={data / 'val'}", f"tokenizer={tok / 'tokenizer.json'}",
                f"max_steps={steps}", "model.dropout=0.0", "seq_len=128", "micro_batch=8", "log_every=50",
                f"eval_every={steps}", f"ckpt_every={steps}", *model.split())
    return out["target"], out["draft"]


def run_case(name, model, draft, prompt, params, kind, args, new_tokens=None):
    new_tokens = new_tokens or args.new_tokens
    for _ in range(2):  # the first run compiles the CPU kernel for each row count it meets
        plain, plain_s = timed(generate_tokens, model, [prompt], new_tokens, params)
        stats = SpeculationStats()
        drafter = PromptLookup(3) if kind == "lookup" else DraftModel(draft, model.cfg.vocab_size, params, 2)
        fast, fast_s = timed(speculative_tokens, model, prompt, new_tokens, params, drafter,
                             args.draft_tokens, speculation=stats)
    if params.temperature == 0:
        assert fast == plain, f"{name}: speculative greedy output differs from plain greedy"
    print(json.dumps({"bench": "speculative", "case": name, "threads": args.threads,
                      "tokens": len(fast), "plain_tok_s": round(len(plain) / plain_s, 1),
                      "speculative_tok_s": round(len(fast) / fast_s, 1),
                      "ratio": round((len(fast) / fast_s) / (len(plain) / plain_s), 2),
                      "acceptance": round(stats.acceptance_rate, 3),
                      "tokens_per_pass": round(len(fast) / max(stats.rounds, 1), 2)}), flush=True)


GREEDY = SamplingParams.greedy()
SAMPLED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)


def trained_cases(args):
    if not SHAKESPEARE.exists():
        print("the trained cases need ../shared/data/corpora/tinyshakespeare.txt", file=sys.stderr)
        return
    target_dir, draft_dir = trained_models()
    lm = load_model(target_dir)
    model, draft = prepare_for_decoding(lm.model), prepare_for_decoding(load_model(draft_dir).model)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    passage = text[200_000:200_280]
    repeat = lm.tokenizer.encode(passage + "\n\n" + passage.split("\n")[0])
    start = lm.tokenizer.encode(passage)
    for name, prompt, params, kind in (("trained-lookup-repeat", repeat, GREEDY, "lookup"),
                                       ("trained-draft-greedy", start, GREEDY, "draft"),
                                       ("trained-draft-sampled", start, SAMPLED, "draft")):
        room = model.cfg.max_seq_len - len(prompt) - args.draft_tokens - 1  # the models' context is 256
        run_case(name, model, draft, prompt, params, kind, args, min(args.new_tokens, room))


def random_cases(args):
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
    for name, params, kind in (("random-lookup-greedy", GREEDY, "lookup"), ("random-lookup-sampled", SAMPLED, "lookup"),
                               ("random-draft-greedy", GREEDY, "draft"), ("random-draft-sampled", SAMPLED, "draft")):
        run_case(name, model, draft, prompt, params, kind, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--target", default=None, help="the random cases' target (default: random weights)")
    ap.add_argument("--draft", default=None, help="the random cases' draft")
    ap.add_argument("--only", choices=("trained", "random"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only != "random":
        trained_cases(args)
    if args.only != "trained":
        random_cases(args)


if __name__ == "__main__":
    main()
