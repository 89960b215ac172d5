"""Serving an encoder-decoder: camelid's Seq2SeqEngine (each prompt encoded once, the replies decoded together
one token a step) against transformers' generate on the same requests as one padded batch, same weights, same
run, same threads.

Builds a Flan-T5-small-shaped model with random weights (d_model 512, 8 + 8 blocks, 6 heads, gated-GELU FFN
1024, vocab 32128) and sends N requests of different prompt lengths for a fixed number of greedy tokens each
(no end-of-text token stops them). Checks both give every request the same tokens, and prints one JSON line
with both throughputs (generated tokens per second, all requests together) and the ratio.

    python bench/t5_serve.py [--threads 2] [--requests 8] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from camelid.formats.loaded import LoadedModel  # noqa: E402
from camelid.generate.decoding import prepare_for_decoding  # noqa: E402
from camelid.generate.sampling import SamplingParams  # noqa: E402
from camelid.serve.engine import Request  # noqa: E402
from camelid.serve.seq2seq_engine import Seq2SeqEngine  # noqa: E402
from camelid.tokenizer.piece_vocab import PieceVocab  # noqa: E402
from camelid.tokenizer.tokenizer import piece_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from t5 import random_flan_t5  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref, ours = random_flan_t5(d_model=512, d_ff=1024, layers=8, heads=6)  # flan-t5-small's shape
    # a vocabulary of the model's size with no end-of-text token: every request writes all its tokens
    vocab = PieceVocab([f"<{i}>" for i in range(32128)], [0.0] * 32128)
    lm = LoadedModel(prepare_for_decoding(ours), piece_tokenizer(vocab, None, [], add_bos=False))  # as serve does
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 32000, (32 + 24 * i,), generator=g).tolist() + [1] for i in range(args.requests)]

    def theirs() -> list[list[int]]:
        longest = max(map(len, prompts))
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False)
        return [row[1:].tolist() for row in out]

    def camelid() -> list[list[int]]:
        engine = Seq2SeqEngine(lm, max_batch=args.requests)
        done = [threading.Event() for _ in prompts]
        requests = [Request(p, SamplingParams.greedy(), args.new_tokens, [],
                            emit=lambda kind, _, e=e: e.set() if kind in ("done", "error") else None)
                    for p, e in zip(prompts, done)]
        try:
            with engine._wake:  # all at once, as a burst of clients would send them
                for r in requests:
                    engine.submit(r)
            for e in done:
                e.wait()
        finally:
            engine.shutdown()
        return [r.tokens for r in requests]

    assert camelid() == theirs(), "greedy tokens differ"
    result = {"bench": "t5_serve", "model": "flan-t5-small shape (random weights)", "threads": args.threads,
              "requests": args.requests, "new_tokens": args.new_tokens,
              "prompt_tokens": [len(p) for p in prompts]}
    for name, run in (("camelid", camelid), ("transformers", theirs)):
        seconds = min(_timed(run) for _ in range(4))
        result[f"{name}_tokens_per_s"] = round(args.requests * args.new_tokens / seconds, 1)
    result["ratio"] = round(result["camelid_tokens_per_s"] / result["transformers_tokens_per_s"], 2)
    print(json.dumps(result))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
