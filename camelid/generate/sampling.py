"""Next-token sampling with llama.cpp's semantics and order:
penalties -> top-k -> top-p -> min-p -> temperature -> draw. Temperature 0 is greedy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from camelid.errors import CamelidError, ModelError

INT64 = (-(1 << 63), (1 << 63) - 1)
# A positive temperature below float32's smallest normal number would divide the logits by zero.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1 disables
    min_p: float = 0.05  # 0 disables
    repeat_penalty: float = 1.0  # 1 disables; >1 discourages tokens seen in the last repeat_last_n
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        floats = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CamelidError(f"invalid sampling parameter: {name} must be a finite number, got {value!r}")
        seed_ok = self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                        and INT64[0] <= self.seed <= INT64[1])
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
             f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:.3g}"),
            (seed_ok, f"seed must be an integer in [{INT64[0]}, {INT64[1]}]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (isinstance(self.repeat_last_n, int) and self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise CamelidError(f"invalid sampling parameter: {message}")

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature=0.0)


def apply_penalties(logits: torch.Tensor, history: list[list[int]], p: SamplingParams) -> torch.Tensor:
    """llama.cpp's repetition penalty (divide positive logits, multiply negative ones) and the OpenAI
    presence/frequency penalties, over each row's last `repeat_last_n` tokens."""
    if p.repeat_last_n == 0 or (p.repeat_penalty == 1 and not p.presence_penalty and not p.frequency_penalty):
        return logits
    logits = logits.clone()
    for row, tokens in enumerate(history):
        recent = tokens[-p.repeat_last_n:]
        if not recent:
            continue
        ids, counts = torch.tensor(recent, device=logits.device).unique(return_counts=True)
        values = logits[row, ids]
        if p.repeat_penalty != 1:
            values = torch.where(values > 0, values / p.repeat_penalty, values * p.repeat_penalty)
        values = values - counts.to(values.dtype) * p.frequency_penalty - p.presence_penalty
        logits[row, ids] = values
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, history: list[list[int]],
           generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V), drawn among the `allowed` ones (B, V bool) where given: a grammar's
    mask goes first, so truncation and temperature share out the probability of the tokens it allows. NaN
    logits are the model's fault and raise ModelError."""
    logits = processed_logits(logits, p, history, allowed)
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(_probabilities(logits, p), 1, generator=generator).squeeze(-1)


def distribution(logits: torch.Tensor, p: SamplingParams, history: list[list[int]]) -> torch.Tensor:
    """(B, V) the probabilities `sample` draws from (one-hot at the argmax when greedy): what speculative
    decoding must keep the output distributed as."""
    logits = processed_logits(logits, p, history)
    if p.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return _probabilities(logits, p)


def processed_logits(logits: torch.Tensor, p: SamplingParams, history: list[list[int]],
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The logits after the mask, the penalties and truncation (top-k, top-p, min-p), before temperature."""
    if torch.isnan(logits).any():
        raise ModelError("the model produced NaN logits (its weights or config are broken)")
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    logits = apply_penalties(logits, history, p)
    if p.temperature == 0:
        return logits
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose probability reaches top_p (always at least one token).
        drop = (probs.cumsum(dim=-1) - probs) >= p.top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if p.min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def _probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    # Shifted so the best token is 0: a tiny temperature sends the others to -inf, never the best to inf.
    return ((logits - logits.max(dim=-1, keepdim=True).values) / p.temperature).softmax(dim=-1)


def make_generator(seed: int | None, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
