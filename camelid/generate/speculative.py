"""Speculative decoding for one prompt: a cheap drafter proposes the next few tokens and the model checks them
all in one forward pass, keeping the longest run it agrees with plus one token of its own.

Drafters: prompt lookup (the tokens that followed the last occurrence of the text's final n-gram, which pays
when a reply repeats or edits what it was given) and a smaller draft model with the same vocabulary. Greedy
output is exactly plain greedy decoding's; with sampling each draft token is accepted with probability
min(1, p/q) and a rejection draws from the normalised max(p - q, 0) (Leviathan et al. 2023; Chen et al.
2023), so the output is distributed exactly as the model's own sampling (p and q are the distributions
camelid's sampler draws from, penalties and truncation included).

Stale entries past the accepted tokens stay in the preallocated KV cache: attention reads only up to the
position being written, and the next pass overwrites them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from camelid.errors import CamelidError
from camelid.generate.decoding import decode_step
from camelid.generate.sampling import SamplingParams, distribution, make_generator


@dataclass
class Speculation:
    """How generation speculates: a drafter (PromptLookup or DraftModel), tokens drafted per pass, and the
    counts it keeps."""
    drafter: object
    draft_tokens: int = 4
    stats: "SpeculationStats" = None

    def __post_init__(self):
        self.stats = self.stats or SpeculationStats()


@dataclass
class SpeculationStats:
    rounds: int = 0  # verification passes of the model
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class PromptLookup:
    """Drafts the tokens that followed the most recent earlier occurrence of the text's last n tokens (the
    longest n from n_max down to n_min that occurs)."""

    def __init__(self, n_max: int = 3, n_min: int = 1):
        if not 1 <= n_min <= n_max:
            raise CamelidError("prompt lookup: need 1 <= n_min <= n_max")
        self.n_max, self.n_min = n_max, n_min

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], list]:
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == suffix:
                    found = tokens[start + n:start + n + k]
                    return found, [None] * len(found)  # a point mass: q(x) = 1 for the proposed token
        return [], []


class DraftModel:
    """Drafts by sampling a smaller model with the same vocabulary and sampling settings; it keeps its own KV
    cache and reuses whatever prefix of it the accepted text still shares."""

    def __init__(self, model, target_vocab: int, params: SamplingParams, seed: int | None = None):
        if model.cfg.vocab_size != target_vocab:
            raise CamelidError(f"--draft: its vocabulary has {model.cfg.vocab_size} tokens, the model's "
                               f"{target_vocab} (a draft model needs the same tokenizer)")
        self.model, self.params = model, params
        self.step = decode_step(model)
        self.cache = model.new_kv_cache(1, model.cfg.max_seq_len)
        self.fed: list[int] = []  # the tokens whose keys and values are in the cache, in order
        self.generator = make_generator(seed, model.device)

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], list]:
        k = min(k, self.model.cfg.max_seq_len - len(tokens))
        if k <= 0:
            return [], []
        same = 0
        while same < min(len(self.fed), len(tokens) - 1) and self.fed[same] == tokens[same]:
            same += 1
        ids = torch.tensor([tokens[same:]], device=self.model.device)
        logits = self.model(ids, same, self.cache, last_only=True)[:, -1]
        self.fed = tokens[:]
        draft, qs = [], []
        for i in range(k):
            q = distribution(logits, self.params, [tokens + draft])[0]
            token = int(q.argmax()) if self.params.temperature == 0 else \
                int(torch.multinomial(q, 1, generator=self.generator))
            draft.append(token)
            qs.append(q)
            if i + 1 < k:
                logits = self.step(torch.tensor([[token]], device=self.model.device), len(self.fed), self.cache,
                                   None)[:, -1]
                self.fed.append(token)
        return draft, qs


@torch.inference_mode()
def speculative_tokens(model, prompt: list[int], max_new_tokens: int, params: SamplingParams, drafter,
                       draft_tokens: int = 4, stop_ids: set[int] = frozenset(), stats=None,
                       speculation: SpeculationStats | None = None) -> Iterator[list[int]]:
    """Yields [token] for each new token, as generate_tokens does for a batch of one; ends at a stop id (not
    yielded), at max_new_tokens or at the model's context."""
    from camelid.generate.generate import Stats, check_prompts

    ctx = model.cfg.max_seq_len
    check_prompts([prompt], ctx, max_new_tokens)
    if draft_tokens < 1:
        raise CamelidError("--draft-tokens must be at least 1")
    stats = stats if stats is not None else Stats()
    speculation = speculation if speculation is not None else SpeculationStats()
    stats.prompt_tokens = len(prompt)
    device, generator = model.device, make_generator(params.seed, model.device)
    max_new_tokens = min(max_new_tokens, ctx - len(prompt))
    cache = model.new_kv_cache(1, ctx)
    t0 = time.perf_counter()
    if len(prompt) > 1:
        model(torch.tensor([prompt[:-1]], device=device), 0, cache, last_only=True)
    tokens, produced, first = list(prompt), 0, True
    while produced < max_new_tokens:
        k = min(draft_tokens, max_new_tokens - produced - 1, ctx - len(tokens) - 1)
        draft, qs = drafter.propose(tokens, k) if k > 0 else ([], [])
        ids = torch.tensor([[tokens[-1]] + draft], device=device)
        logits = model(ids, len(tokens) - 1, cache)[0]  # row i: the distribution after draft[:i]
        new = verify(logits, draft, qs, params, tokens, generator)
        speculation.rounds += 1
        speculation.drafted += len(draft)
        speculation.accepted += len(new) - 1
        now = time.perf_counter()
        if first:
            stats.prefill_seconds, first = now - t0, False
        else:
            stats.decode_seconds += now - t0
        t0 = now
        for token in new:
            if token in stop_ids:
                return
            tokens.append(token)
            produced += 1
            stats.generated_tokens += 1
            yield [token]
            if produced == max_new_tokens:
                return


def verify(logits: torch.Tensor, draft: list[int], qs: list, params: SamplingParams, tokens: list[int],
            generator) -> list[int]:
    """The accepted run of `draft` and one token of the model's own: the correction where it rejects a
    draft token, or the next token when it accepts them all."""
    new: list[int] = []
    for i, x in enumerate(draft):
        p = distribution(logits[i:i + 1], params, [tokens + new])[0]
        if params.temperature == 0:
            if int(p.argmax()) != x:
                return new + [int(p.argmax())]
            new.append(x)
            continue
        q = qs[i]
        q_x = 1.0 if q is None else float(q[x])
        if float(torch.rand((), generator=generator, device=p.device)) < min(1.0, float(p[x]) / q_x):
            new.append(x)
            continue
        residual = p.clone()
        if q is None:
            residual[x] = 0.0
        else:
            residual = (p - q).clamp_min(0.0)
        if float(residual.sum()) <= 0:  # p == q: nothing left to correct towards, any draw from p will do
            residual = p
        return new + [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    p = distribution(logits[len(draft):len(draft) + 1], params, [tokens + new])[0]
    token = int(p.argmax()) if params.temperature == 0 else int(torch.multinomial(p, 1, generator=generator))
    return new + [token]
