"""Decoding an encoder-decoder (model/t5.py): the prompts are encoded once, together (padding masked), and the
reply starts from the decoder's start token, every row at the same position, one token a step through the
decoder's cache. Sampling is camelid's own, as for the decoder-only models."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from camelid.generate.generate import Stats
from camelid.generate.sampling import SamplingParams, make_generator, sample
from camelid.model.t5 import T5


def seq2seq_tokens(model: T5, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                   stop_ids: set[int] = frozenset(), stats: Stats | None = None,
                   eos_id: int | None = None) -> Iterator[list[int | None]]:
    """Yields, per step, one new token per prompt (None once that prompt has finished), as generate_tokens
    does. T5's encoder reads prompts that end with EOS, as its tokenizer writes them: `eos_id` is appended
    where a prompt lacks it."""
    device = model.device
    prompts = [p + [eos_id] if eos_id is not None and (not p or p[-1] != eos_id) else p for p in prompts]
    B, longest = len(prompts), max(len(p) for p in prompts)
    src = torch.zeros(B, longest, dtype=torch.long, device=device)
    mask = torch.zeros(B, longest, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        src[i, :len(p)], mask[i, :len(p)] = torch.tensor(p, device=device), True
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens += sum(len(p) for p in prompts)
    generator = make_generator(params.seed, device)
    start = model.cfg.extra.get("decoder_start_token_id", 0)
    history: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = model.encode(src, mask)
        nxt = torch.full((B, 1), start, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            nxt = sample(model(nxt, cache)[:, -1], params, history, generator).view(B, 1)
            t0 = stats.timed(step, t0)
            out: list[int | None] = []
            for i, t in enumerate(nxt[:, 0].tolist()):
                if done[i] or t in stop_ids:
                    done[i] = True
                    out.append(None)
                else:
                    history[i].append(t)
                    out.append(t)
                    stats.generated_tokens += 1
            if any(t is not None for t in out):
                yield out
            if all(done):
                return
