"""Autoregressive generation with a KV cache, for one prompt or a batch of prompts of different lengths."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from camelid.errors import CamelidError
from camelid.generate.constrained import Constraint, Guide, allowed_tokens
from camelid.generate.decoding import decode_step
from camelid.generate.kv_blocks import BlockPool, Sequence
from camelid.generate.sampling import SamplingParams, make_generator, sample
from camelid.model.kv_cache import PagedKVCache
from camelid.model.transformer import Transformer


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values a KVSession already held
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def timed(self, step: int, since: float) -> float:
        """Count the time since `since` as the prefill's (step 0: it gives the first token) or decoding's; the
        time now, for the next step."""
        now = time.perf_counter()
        if step == 0:
            self.prefill_seconds += now - since
        else:
            self.decode_seconds += now - since
        return now

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first generated token comes from the prefill pass.
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


class KVSession:
    """A paged KV cache kept from one call to the next (a chat's turns, a program's prompts): a prompt that
    begins as an earlier one did, in whole blocks, prefills only the rest (see generate/kv_blocks.py). It
    holds `tokens` positions (default: one sequence at the model's context), stored as `kv_type` (default: the
    model's dtype); on a CPU its memory is taken as blocks are first written."""

    def __init__(self, model: Transformer, tokens: int | None = None, kv_type: str | None = None,
                 block_size: int = 16):
        cfg = model.cfg
        kv_type = kv_type or {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model.dtype, "f32")
        n_blocks = -(-(tokens or cfg.max_seq_len) // block_size)
        try:
            self.cache = PagedKVCache(cfg.n_layers, n_blocks, block_size, cfg.n_kv_heads, cfg.head_dim, model.dtype,
                                      model.device, kv_type)
        except ValueError as exc:
            raise CamelidError(f"--kv-type {kv_type}: {exc}") from None
        self.pool = BlockPool(n_blocks, block_size)
        self.model = model

    def open(self, prompt: list[int], longest: int, adapter: int = 0) -> Sequence:
        seqs = self.pool.admit(prompt, longest, adapter)
        if seqs is None:
            raise CamelidError(f"the KV session holds {self.pool.n_blocks * self.pool.block_size} tokens; "
                               f"{longest} are needed")
        return seqs[0]

    def rows(self, seq: Sequence, length: int):
        """seq's blocks, enough for `length` tokens, as the cache a forward uses."""
        return self.cache.rows(torch.tensor([self.pool.grow(seq, length)], device=self.model.device))

    def close(self, seq: Sequence, tokens: list[int]):
        """seq is done; `tokens` are those its blocks hold, kept for later prompts."""
        self.pool.commit(seq, tokens)
        self.pool.release(seq)


def check_prompts(prompts: list[list[int]], max_seq_len: int, max_new_tokens: int):
    if max_new_tokens < 1:
        raise CamelidError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if not p:
            raise CamelidError("the prompt is empty (and the model adds no BOS token)"
                               + (f" (prompt {i})" if len(prompts) > 1 else ""))
        if len(p) >= max_seq_len:
            raise CamelidError(f"the prompt has {len(p)} tokens; the model's context is {max_seq_len} "
                               f"(shorten it or pass --truncate-prompt)")


@torch.inference_mode()
def generate_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                    stop_ids: set[int] = frozenset(), stats: Stats | None = None, yield_stop: bool = False,
                    guides: list | None = None, session: KVSession | None = None) -> Iterator[list[int | None]]:
    """Yields, per step, one new token per prompt (None once that prompt has finished).

    A prompt finishes at a stop id (yielded only with `yield_stop`: a trainer scores the end of the reply
    too), when its guide (constrained.Guide, per prompt or None) is complete, or at max_new_tokens;
    generation also ends at the model's context length, so nothing is ever silently cut from the prompt.
    With a `session` (one prompt) the keys and values go into its paged cache, a cached prefix is reused, and
    what was computed stays there for the next call.
    """
    cfg = model.cfg
    check_prompts(prompts, cfg.max_seq_len, max_new_tokens)
    device = model.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - longest)
    total = longest + max_new_tokens
    tokens = torch.zeros(B, longest, dtype=torch.long, device=device)
    pad_mask = None
    if any(len(p) != longest for p in prompts):
        pad_mask = torch.zeros(B, total, dtype=torch.bool, device=device)
        pad_mask[:, longest:] = True
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, device=device)
        if pad_mask is not None:
            pad_mask[i, longest - len(p):longest] = True
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens += sum(len(p) for p in prompts)  # a Stats may gather several calls
    if session is None:
        kv_cache = model.new_kv_cache(B, total)
        yield from _decode(model, tokens, pad_mask, prompts, max_new_tokens, params, stop_ids, stats, yield_stop,
                           guides, lambda _: kv_cache)
        return
    if B != 1:
        raise CamelidError("a KV session takes one prompt at a time")
    seq = session.open(prompts[0], total)
    stats.cached_tokens += seq.cached
    fed: list[int] = []  # the tokens whose keys and values are in seq's blocks
    try:
        yield from _decode(model, tokens, None, prompts, max_new_tokens, params, stop_ids, stats, yield_stop, guides,
                           lambda length: session.rows(seq, length), seq.cached, fed)
    finally:
        session.close(seq, fed)


def _decode(model, tokens, pad_mask, prompts, max_new_tokens, params, stop_ids, stats, yield_stop, guides,
            cache_for, cached: int = 0, fed: list[int] | None = None):
    """generate_tokens' loop over the cache cache_for(length) gives for `length` positions; the first `cached`
    positions of the (one) prompt are in it already. `fed` collects the tokens the cache holds."""
    B, longest = tokens.shape
    generator = make_generator(params.seed, model.device)
    history = [list(p) for p in prompts]
    done = [False] * B
    step_once = decode_step(model)
    t0 = time.perf_counter()
    mask = None if pad_mask is None else pad_mask[:, :longest]
    logits = model(tokens[:, cached:], cached, cache_for(longest), mask, last_only=True)
    if fed is not None:
        fed.extend(prompts[0])
    guides = guides or [None] * B
    for step in range(max_new_tokens):
        live = [None if done[i] else g for i, g in enumerate(guides)]
        allowed = allowed_tokens(live, logits.shape[-1])
        for g in live:
            if g is not None and g.error is not None:
                raise g.error
        nxt = sample(logits[:, -1], params, history, generator, allowed)
        t0 = stats.timed(step, t0)
        out: list[int | None] = []
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                out.append(None)
            elif t in stop_ids:
                out.append(t if yield_stop else None)
                done[i] = True
            else:
                history[i].append(t)
                out.append(t)
                stats.generated_tokens += 1
                if live[i] is not None:
                    live[i].accept(t)
                    done[i] = live[i].done
        if any(t is not None for t in out):
            yield out
        if all(done) or step + 1 == max_new_tokens:
            return
        pos = longest + step
        mask = None if pad_mask is None else pad_mask[:, :pos + 1]
        t0 = time.perf_counter()
        logits = step_once(nxt.view(B, 1), pos, cache_for(pos + 1), mask)
        if fed is not None:
            fed.append(int(nxt[0]))


class StopStrings:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Completion:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS id or stop string) or "length"


def stream(lm, prompt: str | list[int], max_new_tokens: int = 256, params: SamplingParams | None = None,
           stop: list[str] | None = None, stats: Stats | None = None, completion: Completion | None = None,
           constraint: Constraint | None = None, speculation=None, session: KVSession | None = None) -> Iterator[str]:
    """Text pieces as they are generated for one prompt; `completion` (if given) is filled in as it goes;
    with a `speculation` (generate/speculative.py) tokens are drafted and verified several at a time; with a
    `session` a prefix an earlier call computed is reused."""
    for _, piece in stream_batch(lm, [prompt], max_new_tokens, params, stop, stats,
                                 [completion] if completion is not None else None, constraint, speculation,
                                 session):
        yield piece


def stream_batch(lm, prompts: list, max_new_tokens: int = 256, params: SamplingParams | None = None,
                 stop: list[str] | None = None, stats: Stats | None = None,
                 completions: list[Completion] | None = None, constraint: Constraint | None = None,
                 speculation=None, session: KVSession | None = None) -> Iterator[tuple[int, str]]:
    """(prompt index, text piece) pairs as a batch is decoded together; with a `constraint` (a JSON schema or
    a grammar) each prompt's output follows it."""
    tok = lm.tokenizer
    params = params or SamplingParams()
    ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    completions = completions if completions is not None else [Completion() for _ in prompts]
    seq2seq = lm.config.n_encoder_layers > 0  # a reply of its own, not the prompt's continuation
    decoders = [tok.stream([] if seq2seq else p) for p in ids]
    stoppers = [StopStrings(list(stop or []) + lm.stop) for _ in prompts]
    finished = [False] * len(prompts)
    guides = [Guide(constraint, tok) for _ in prompts] if constraint is not None else None
    if seq2seq:
        from camelid.generate.seq2seq import seq2seq_tokens

        if speculation is not None or guides is not None or session is not None:
            raise CamelidError("an encoder-decoder model (T5) generates without speculative decoding, grammars or "
                               "KV sessions")
        steps = seq2seq_tokens(lm.model, ids, max_new_tokens, params, set(tok.eos_ids), stats,
                               tok.eos_ids[0] if tok.eos_ids else None)
    elif speculation is not None:
        from camelid.generate.speculative import speculative_tokens

        if len(ids) != 1 or constraint is not None:
            raise CamelidError("speculative decoding takes one prompt and no grammar")
        steps = speculative_tokens(lm.model, ids[0], max_new_tokens, params, speculation.drafter,
                                   speculation.draft_tokens, set(tok.eos_ids), stats, speculation.stats)
    else:
        steps = generate_tokens(lm.model, ids, max_new_tokens, params, set(tok.eos_ids), stats, guides=guides,
                                session=session)
    for step_tokens in steps:
        for i, t in enumerate(step_tokens):
            if finished[i]:
                continue
            if t is None:
                finished[i] = True
                completions[i].finish_reason = "stop"
                tail = stoppers[i].push(decoders[i].flush())[0] + stoppers[i].flush()
                if tail:
                    completions[i].text += tail
                    yield i, tail
                continue
            completions[i].tokens.append(t)
            text, hit = stoppers[i].push(decoders[i].push(t))
            if text:
                completions[i].text += text
                yield i, text
            if hit:
                finished[i] = True
                completions[i].finish_reason = "stop"
        if all(finished):
            break
    for i in range(len(prompts)):
        if not finished[i]:
            text, hit = stoppers[i].push(decoders[i].flush())
            text += "" if hit else stoppers[i].flush()
            if hit or (guides is not None and guides[i].done):
                completions[i].finish_reason = "stop"
            if text:
                completions[i].text += text
                yield i, text


def generate(lm, prompts: list, max_new_tokens: int = 256, params: SamplingParams | None = None,
             stop: list[str] | None = None, stats: Stats | None = None, constraint: Constraint | None = None,
             speculation=None, session: KVSession | None = None) -> list[Completion]:
    completions = [Completion() for _ in prompts]
    for _ in stream_batch(lm, prompts, max_new_tokens, params, stop, stats, completions, constraint, speculation,
                          session):
        pass
    return completions
