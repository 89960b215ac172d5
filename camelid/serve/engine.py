"""Continuous batching: concurrent requests decoded together, one token each per forward pass.

Keys and values live in one paged pool (model/kv_cache.py) shared by every request, sized by a memory
budget; generate/kv_blocks.py says which blocks are whose and which prefixes the pool already holds, so a
request that begins as an earlier one did (a system prompt, the earlier turns of a chat) prefills only the
rest. A request joins when a batch row is free and the pool can promise the blocks its prompt and reply may
need; until then it waits in the queue. Its prompt is prefilled in chunks between the running requests'
decode steps, so a long prompt never stalls the streams already running for its whole length. It leaves as
soon as it finishes or is cancelled, and its blocks go back to the pool.
The engine runs in its own thread; events reach each request through a callback. A failure while serving
one request fails that request (emit("error", exc)) and the engine goes on with the others; a fault the
engine cannot recover from ends every request and marks it not `alive`, which /health reports.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from camelid.errors import CamelidError
from camelid.formats.loaded import LoadedModel
from camelid.generate.constrained import Constraint, Guide, allowed_tokens, allowed_tokens_soon
from camelid.generate.decoding import decode_step
from camelid.generate.generate import StopStrings
from camelid.generate.kv_blocks import BlockPool, Sequence
from camelid.generate.sampling import SamplingParams, distribution, make_generator, sample
from camelid.generate.speculative import PromptLookup, verify
from camelid.model.kv_cache import PagedKVCache, kv_value_bytes
from camelid.model.lora import MultiLoRALinear, adapter_rows
from camelid.model.memory import human_bytes, kv_cache_bytes, machine_memory


@dataclass
class TokenLogprob:
    """A token and its log-probability under the model (before temperature, penalties or truncation, as the
    OpenAI API and vLLM report them), with the most likely alternatives at its position. The first prompt
    token has none."""
    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """logits (N, vocab) at the positions that predict `tokens` (N)."""
    if not tokens:
        return []
    logps = torch.log_softmax(logits.float(), dim=-1)
    chosen = logps.gather(-1, torch.tensor(tokens, device=logps.device)[:, None])[:, 0].tolist()
    best = logps.topk(top, dim=-1) if top else None
    return [TokenLogprob(t, lp, list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best else [])
            for i, (t, lp) in enumerate(zip(tokens, chosen))]


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


class TooLong(CamelidError):
    """A request whose prompt and reply cannot fit the KV budget even alone."""


KV_TYPE_OF = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@dataclass
class KVBudget:
    """How much KV cache the engine keeps: `tokens` positions in blocks of `block_size` (None: --parallel
    slots at the context size; `memory` bytes instead, where given), stored as `kv_type` (None: the model's
    dtype)."""
    memory: int | None = None
    tokens: int | None = None
    kv_type: str | None = None
    block_size: int = 16


def _allocate_pool(model, budget: KVBudget, slots: int, ctx: int) -> PagedKVCache:
    """The paged KV pool, checked against the machine: blocks are only touched on a CPU as they are written,
    but a budget the machine cannot hold would be found by the OOM killer once the pool fills."""
    cfg = model.cfg
    kv_type = budget.kv_type or KV_TYPE_OF[model.dtype]
    per_token = kv_cache_bytes(cfg, 1, kv_value_bytes(kv_type))
    tokens = budget.memory // per_token if budget.memory else budget.tokens or slots * ctx
    n_blocks = max(1, tokens // budget.block_size)
    size = n_blocks * budget.block_size * per_token
    problem = f"a KV cache of {n_blocks * budget.block_size} tokens ({kv_type}) needs {human_bytes(size)}"
    if model.device.type == "cpu" and size > machine_memory()[1]:
        raise CamelidError(f"{problem}, more than this machine's free memory (lower --kv-memory, --ctx-size or "
                           f"--parallel, or use --kv-type q8_0)")
    try:  # one block more, never given to a sequence: where a batch's padding positions write
        return PagedKVCache(cfg.n_layers, n_blocks + 1, budget.block_size, cfg.n_kv_heads, cfg.head_dim,
                            model.dtype, model.device, kv_type)
    except (RuntimeError, MemoryError):
        raise CamelidError(f"{problem}, more than the device can allocate (lower --kv-memory)") from None
    except ValueError as exc:
        raise CamelidError(f"--kv-type {kv_type}: {exc}") from None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    # emit("text", str) / emit("done", finish_reason) / emit("error", exc); with logprobs also
    # emit("token", TokenLogprob) before each generated token's text, and emit("prompt", [TokenLogprob]) first
    emit: Callable[[str, object], None]
    logprobs: int | None = None  # each generated token's log-probability and this many alternatives; None: none
    prompt_logprobs: bool = False  # the prompt's tokens' too (a completion with echo)
    constraint: Constraint | None = None  # a JSON schema or grammar the output follows
    # the other choices of an n > 1 request: the same prompt, prefilled once into this request's row and copied
    copies: list["Request"] = field(default_factory=list)
    adapter: int = 0  # the LoRA adapter its rows apply (model/lora.py's adapter_rows; 0: the base alone)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def cancel(self):
        self.cancelled = True


@dataclass
class Metrics:
    requests_total: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    latency_seconds_sum: float = 0.0
    ttft_seconds_sum: float = 0.0
    batch_size_sum: int = 0
    decode_steps: int = 0
    prefill_chunks: int = 0
    prefilled_tokens: int = 0  # prompt tokens computed (those found in the prefix cache are not)
    speculative_rounds: int = 0  # rows' verifications of a draft
    speculative_drafted: int = 0
    speculative_accepted: int = 0


class Engine:
    def __init__(self, lm: LoadedModel, max_batch: int = 8, max_queue: int = 64, kv: KVBudget | None = None,
                 ctx_size: int | None = None, prefill_chunk: int = 256, prefix_cache: bool = True,
                 lookup: PromptLookup | None = None, draft_tokens: int = 4, draft=None):
        self.lm = lm
        self.model = lm.model
        self.tok = lm.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.ctx = min(ctx_size or lm.config.max_seq_len, lm.config.max_seq_len)  # one request's most tokens
        self.cache = _allocate_pool(self.model, kv or KVBudget(), max_batch, self.ctx)
        self.pool = BlockPool(self.cache.n_blocks - 1, self.cache.block_size)
        self.scratch = self.cache.n_blocks - 1
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled between two decode steps of running requests
        self.prefix_cache = prefix_cache
        # speculative decoding: prompt lookup, or a smaller model with the same vocabulary (`draft`), whose
        # keys and values go into a pool of its own under the same block tables
        self.lookup, self.draft_tokens, self.draft, self.draft_cache = lookup, draft_tokens, draft, None
        if draft is not None:
            if draft.cfg.vocab_size != lm.config.vocab_size:
                raise CamelidError(f"--draft: its vocabulary has {draft.cfg.vocab_size} tokens, the model's "
                                   f"{lm.config.vocab_size} (a draft model needs the same tokenizer)")
            d = draft.cfg
            self.draft_cache = PagedKVCache(d.n_layers, self.cache.n_blocks, self.cache.block_size, d.n_kv_heads,
                                            d.head_dim, draft.dtype, draft.device, KV_TYPE_OF[draft.dtype])
            self.draft_step = decode_step(draft)
        # served adapters apply per row, which only the model's own forward does (not the fused C step)
        self.adapters = any(isinstance(m, MultiLoRALinear) for m in self.model.modules())
        self.decode = self.model if self.adapters else decode_step(self.model)  # the weights stay as they are
        self.vocab_width = lm.config.vocab_size  # the logits' width, for grammar masks
        self.device = self.model.device
        self._start_engine("camelid-engine")

    def _start_engine(self, name: str):
        """The queues, the metrics and the engine's thread, started."""
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: collections.deque[_Prefill] = collections.deque()
        self.active: list[_Slot] = []
        self.metrics = Metrics()
        self.failure: str | None = None  # why the engine stopped, if it did
        self._wake = threading.Condition()
        self._stop = False
        self._calls: list[tuple[Callable[[], object], Future]] = []  # run by the engine's thread between steps
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public, thread-safe

    def fits(self, prompt: int, max_tokens: int) -> str | None:
        """Why a request of `prompt` tokens asking for `max_tokens` more can never run here (None: it can)."""
        total = prompt + max_tokens
        asks = f"the request has {prompt} prompt tokens and asks for {max_tokens} more"
        if total > self.ctx:
            return f"this model's maximum context length is {self.ctx} tokens; {asks}"
        if self.pool.blocks_for(total) > self.pool.n_blocks:
            return (f"the server's KV cache holds {self.pool.n_blocks * self.pool.block_size} tokens "
                    f"(--kv-memory); {asks}")
        return None

    def submit(self, request: Request):
        problem = self.fits(len(request.prompt), request.max_tokens)
        if problem:
            raise TooLong(problem)
        with self._wake:
            if not self.alive:
                raise EngineStopped(self.failure or "the engine has stopped")
            if len(self.waiting) >= self.max_queue:
                self.metrics.requests_rejected += 1
                raise QueueFull()
            self.metrics.requests_total += 1 + len(request.copies)
            self.metrics.prompt_tokens += len(request.prompt)
            self.waiting.append(request)
            self._wake.notify()

    def between_steps(self, fn: Callable[[], object]) -> Future:
        """Run fn in the engine's thread between two steps (no forward runs meanwhile): its result, or its
        exception, comes back through the future."""
        future: Future = Future()
        with self._wake:
            if not self.alive:
                raise EngineStopped(self.failure or "the engine has stopped")
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def use_adapters(self):
        """The model now has served adapters (engine thread only): rows apply them, so decode by its forward."""
        self.adapters, self.decode = True, self.model

    def uses_adapter(self, adapter: int) -> bool:
        return (any(s.req.adapter == adapter for s in self.active) or any(r.adapter == adapter for r in self.waiting)
                or any(p.req.adapter == adapter for p in self.prefilling))

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active) + sum(1 + len(p.req.copies) for p in self.prefilling)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def shutdown(self):
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)
        for _, future in self._calls:
            future.set_exception(EngineStopped("the engine has stopped"))
        self._calls = []

    # ------------------------------------------------------------ the loop

    def _run(self):
        try:
            self._loop()
        except BaseException as exc:  # a bug in the engine itself: nothing may wait forever on it
            self.failure = f"the generation engine stopped: {type(exc).__name__}: {exc}"
            logging.getLogger("camelid.serve").exception(self.failure)
            with self._wake:
                pending = ([s.req for s in self.active] + [r for p in self.prefilling for r in p.group]
                           + list(self.waiting))
                self.active.clear()
                self.prefilling.clear()
                self.waiting.clear()
                calls, self._calls = self._calls, []
            for _, future in calls:
                future.set_exception(EngineStopped(self.failure))
            for req in pending:
                with contextlib.suppress(Exception):
                    req.emit("error", RuntimeError(self.failure))

    def _loop(self):
        with torch.inference_mode():
            while True:
                with self._wake:
                    while (not self._stop and not self.waiting and not self.active and not self.prefilling
                           and not self._calls):
                        self._wake.wait()
                    if self._stop:
                        return
                    calls, self._calls = self._calls, []
                for fn, future in calls:
                    try:
                        with torch.inference_mode(False):  # e.g. a new adapter's weights: ordinary tensors
                            future.set_result(fn())
                    except Exception as exc:  # the caller's error, reported to it
                        future.set_exception(exc)
                self._join_waiting()
                if self.active:
                    self._step()
                self._prefill(self.prefill_chunk if self.active else None)

    def _join_waiting(self):
        """Waiting requests join, in order, while a row is free and the pool can promise their blocks."""
        with self._wake:
            while self.waiting:
                req = self.waiting[0]
                group = [req] + req.copies
                if self.running + len(group) > self.max_batch:
                    return
                if all(r.cancelled for r in group):
                    self.waiting.popleft()
                    for r in group:
                        self._finish_request(r, "cancelled")
                    continue
                seqs = self._admit(req)
                if seqs is None:
                    return  # the pool is full until a running request finishes
                self.waiting.popleft()
                self.prefilling.append(_Prefill(req, seqs, done=seqs[0].cached))

    def _admit(self, req: Request) -> list[Sequence] | None:
        """The pool's blocks for the request and its copies (None: not until a running request finishes)."""
        # a prompt to be scored needs every position's logits: nothing of it may come from the cache
        reuse = self.prefix_cache and not req.prompt_logprobs
        return self.pool.admit(req.prompt, len(req.prompt) + req.max_tokens, req.adapter, reuse,
                               copies=len(req.copies))

    def _prefill(self, budget: int | None):
        """Prefill waiting prompts, at most `budget` tokens (None: all of them, nothing else is running)."""
        while self.prefilling and (budget is None or budget > 0):
            job = self.prefilling[0]
            req = job.req
            if all(r.cancelled for r in job.group):
                self.prefilling.popleft()
                self._release(job.seqs)
                for r in job.group:
                    self._finish_request(r, "cancelled")
                continue
            n = len(req.prompt) - job.done if budget is None else min(budget, len(req.prompt) - job.done)
            try:  # a failing request must not take the others down
                logits = self._prefill_chunk(job, n)
            except Exception as exc:
                self.prefilling.popleft()
                self._release(job.seqs)
                for r in job.group:
                    self._fail(r, exc)
                continue
            if budget is not None:
                budget -= n
            if job.done == len(req.prompt):
                self.prefilling.popleft()
                self._start_group(job, logits)

    def _prefill_chunk(self, job: "_Prefill", n: int) -> torch.Tensor:
        req, seq, start = job.req, job.seqs[0], job.done
        table = torch.tensor([self.pool.grow(seq, start + n)], device=self.device)
        ids = torch.tensor([req.prompt[start:start + n]], device=self.device)
        with self._rows([req.adapter]):
            logits = self.model(ids, start, self.cache.rows(table), last_only=not req.prompt_logprobs)
        # the draft reads the whole prompt (a cached prefix's blocks need not hold the draft's keys and values),
        # as far as its own context goes: past it, the request is not drafted
        if self.draft is not None and start + n <= self.draft.cfg.max_seq_len:
            seen = torch.tensor([req.prompt[job.drafted:start + n]], device=self.device)
            self.draft(seen, job.drafted, self.draft_cache.rows(table), last_only=True)
            job.drafted = start + n
        job.done += n
        self.metrics.prefill_chunks += 1
        self.metrics.prefilled_tokens += n
        if req.prompt_logprobs:
            job.logits.append(logits[0])
        return logits[:, -1]

    def _start_group(self, job: "_Prefill", logits: torch.Tensor):
        req, seq = job.req, job.seqs[0]
        self.pool.commit(seq, req.prompt)  # requests arriving from now on find this prompt's blocks
        scored = None
        if req.prompt_logprobs:
            every = torch.cat(job.logits)
            scored = [TokenLogprob(req.prompt[0], None, [])] + token_logprobs(every[:-1], req.prompt[1:],
                                                                              req.logprobs or 0)
        for copy in job.seqs[1:]:  # the copies share the prompt's full blocks, its partial one copied
            partial = self.pool.fork(seq, copy, len(req.prompt))
            if partial is not None:
                for cache in filter(None, (self.cache, self.draft_cache)):
                    cache.copy_block(partial, copy.blocks[-1])
        for member, member_seq in zip(job.group, job.seqs):  # (a cancelled one gives its blocks back here)
            self._start(member, member_seq, logits, scored, job.drafted)
        self._retire_finished()

    def _start(self, req: Request, seq: Sequence, logits: torch.Tensor, scored: list | None, job_drafted: int):
        """A request whose prompt is in its blocks: its first token, from the prompt's logits."""
        if req.cancelled:
            self._release([seq])
            self._finish_request(req, "cancelled")
            return
        try:
            slot = _Slot(req, seq, self.tok, make_generator(req.params.seed, self.device))
            slot.length, slot.drafted = len(req.prompt), job_drafted
            if req.constraint is not None:
                slot.guide = Guide(req.constraint, self.tok)
            if scored is not None:
                req.emit("prompt", scored)
            if req.max_tokens == 0:  # the prompt scored, nothing generated (a completion with echo)
                self._release([seq])
                self._finish_request(req, "length")
                return
            allowed = allowed_tokens([slot.guide], logits.shape[-1])
            if slot.guide is not None and slot.guide.error:
                raise slot.guide.error
            token = sample(logits, req.params, [slot.history], slot.generator, allowed).item()
        except Exception as exc:
            self._release([seq])
            self._fail(req, exc)
            return
        self.active.append(slot)
        self._accept(slot, token, logits)

    def _step(self):
        n = len(self.active)
        tokens = torch.tensor([[s.last] for s in self.active], device=self.device)
        # one request alone: a plain position, which the C decode step takes
        starts = self.active[0].length if n == 1 else torch.tensor([s.length for s in self.active],
                                                                    device=self.device)
        guides = [s.guide for s in self.active]
        drafts, qs = None, None
        if self.lookup is not None and not any(guides):
            drafts = self._drafts()
        elif self.draft is not None and not any(guides):
            try:
                drafts, qs = self._model_drafts()
            except Exception as exc:  # the draft's forward failed: its cache, and so every row, is in doubt
                self._fail_all(exc)
                return
        if drafts is not None and any(drafts):
            return self._verify_step(drafts, qs)
        tables = self._tables([s.length + 1 for s in self.active], [s.length + 1 for s in self.active])
        # the grammars' masks depend only on the tokens taken so far: computed while the forward runs
        masks = allowed_tokens_soon(guides, self.vocab_width) if any(guides) else None
        try:
            with self._rows([s.req.adapter for s in self.active]):
                logits = self.decode(tokens, starts, self.cache.rows(tables), None)[:, -1]
        except Exception as exc:  # the batch's forward failed: no row's cache can be trusted
            self._fail_all(exc)
            return
        finally:
            allowed, mask_error = _result(masks)
        self.metrics.decode_steps += 1
        self.metrics.batch_size_sum += n
        for i, slot in enumerate(self.active):
            slot.length += 1
            if slot.guide is not None and (mask_error or slot.guide.error):
                slot.finish, slot.error = "error", mask_error or slot.guide.error
                continue
            try:
                row = None if allowed is None else allowed[i:i + 1]
                token = sample(logits[i:i + 1], slot.req.params, [slot.history], slot.generator, row).item()
            except Exception as exc:
                slot.finish = "error"
                slot.error = exc
                continue
            self._accept(slot, token, logits[i:i + 1])
        self._retire_finished()

    def _tables(self, lengths: list[int], width: list[int], slots: list["_Slot"] | None = None) -> torch.Tensor:
        """The block tables of the active rows (or of `slots`), grown to `lengths` tokens and padded with the
        scratch block to cover `width` positions (past a row's own tokens: masked for reading, harmless for
        writing)."""
        bs = self.pool.block_size
        tables = [self.pool.grow(s.seq, n) for s, n in zip(self.active if slots is None else slots, lengths)]
        most = max(max(-(-w // bs) for w in width), max(map(len, tables)))
        return torch.tensor([t + [self.scratch] * (most - len(t)) for t in tables], device=self.device)

    def _drafts(self) -> list[list[int]]:
        """Each row's prompt-lookup draft, no longer than its reply and the context leave room for."""
        out = []
        for s in self.active:
            room = min(self.draft_tokens, s.req.max_tokens - len(s.req.tokens) - 1, self.ctx - s.length - 2)
            out.append(self.lookup.propose(s.history, room)[0] if room > 0 else [])
        return out

    def _model_drafts(self) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """Every row's draft by the draft model, batched: one pass over what each row's draft cache has not
        seen yet (the last accepted tokens), then a token a pass; with the distributions drawn from."""
        limit = self.draft.cfg.max_seq_len
        rooms = [max(0, min(self.draft_tokens, s.req.max_tokens - len(s.req.tokens) - 1, self.ctx - s.length - 2,
                            limit - s.length - 1)) if s.drafted > 0 else 0 for s in self.active]
        drafts, qs = [[] for _ in rooms], [[] for _ in rooms]
        rows = [i for i, r in enumerate(rooms) if r]
        if not rows:
            return drafts, qs
        slots, k = [self.active[i] for i in rows], max(rooms)
        feed = [s.history[s.drafted:] for s in slots]  # ends with the row's last token
        width = max(map(len, feed))
        tables = self._tables([s.length + 1 + rooms[i] for i, s in zip(rows, slots)],
                              [max(s.drafted + width, s.length + k) for s in slots], slots)
        cache = self.draft_cache.rows(tables)
        tokens = torch.tensor([f + [0] * (width - len(f)) for f in feed], device=self.device)
        starts = torch.tensor([s.drafted for s in slots], device=self.device)
        logits = self.draft(tokens, starts, cache)
        logits = logits[torch.arange(len(feed)), torch.tensor([len(f) - 1 for f in feed])]
        for j in range(k):
            for b, (i, s) in enumerate(zip(rows, slots)):
                if j < rooms[i]:
                    q = distribution(logits[b:b + 1], s.req.params, [s.history + drafts[i]])[0]
                    token = int(q.argmax()) if s.req.params.temperature == 0 else \
                        int(torch.multinomial(q, 1, generator=s.generator))
                    drafts[i].append(token)
                    qs[i].append(q)
            if j + 1 < k:
                last = torch.tensor([[drafts[i][-1]] for i in rows], device=self.device)
                at = torch.tensor([s.length + 1 + j for s in slots], device=self.device)
                logits = self.draft_step(last, at if len(rows) > 1 else int(at[0]), cache, None)[:, -1]
        return drafts, qs

    def _fail_all(self, exc: Exception):
        for slot in self.active:
            self._release([slot.seq])
            self._fail(slot.req, exc)
        self.active.clear()

    def _verify_step(self, drafts: list[list[int]], qs: list[list[torch.Tensor]] | None = None):
        """Every row's last token and its draft in one forward (rows padded to the longest draft); each row
        keeps the drafted tokens the model agrees with and one of its own (speculative.py's verify)."""
        width = 1 + max(map(len, drafts))
        tokens = torch.tensor([[s.last] + d + [0] * (width - 1 - len(d)) for s, d in zip(self.active, drafts)],
                              device=self.device)
        starts = torch.tensor([s.length for s in self.active], device=self.device)
        tables = self._tables([s.length + 1 + len(d) for s, d in zip(self.active, drafts)],
                              [s.length + width for s in self.active])
        try:
            with self._rows([s.req.adapter for s in self.active]):
                logits = self.model(tokens, starts, self.cache.rows(tables))
        except Exception as exc:
            self._fail_all(exc)
            return
        m = self.metrics
        m.decode_steps += 1
        m.batch_size_sum += len(self.active)
        for i, (slot, draft) in enumerate(zip(self.active, drafts)):
            try:
                new = verify(logits[i, :1 + len(draft)], draft, qs[i] if qs else [None] * len(draft),
                             slot.req.params, slot.history, slot.generator)
            except Exception as exc:
                slot.finish, slot.error = "error", exc
                continue
            m.speculative_rounds += 1 if draft else 0
            m.speculative_drafted += len(draft)
            m.speculative_accepted += len(new) - 1
            if draft and qs:  # the draft's cache holds the row's last token and its drafts but the last, as
                slot.drafted = slot.length + 1 + min(len(new) - 1, len(draft) - 1)  # far as they stand
            for j, token in enumerate(new):
                slot.length += 1
                self._accept(slot, token, logits[i, j:j + 1])
                if slot.finish is not None:
                    break
        self._retire_finished()

    def _rows(self, adapters: list[int]):
        return adapter_rows(adapters) if self.adapters else contextlib.nullcontext()

    def _release(self, seqs: list[Sequence]):
        for seq in seqs:
            self.pool.release(seq)

    def _fail(self, req: Request, exc: Exception):
        req.finish_reason = "error"
        self.metrics.requests_failed += 1
        req.emit("error", exc)

    def _accept(self, slot: "_Slot", token: int, logits: torch.Tensor):
        req = slot.req
        if req.cancelled:
            slot.finish = "cancelled"
            return
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if token in self.tok.eos_ids:
            slot.finish = "stop"
            text, _ = slot.stops.push(slot.decoder.flush())
            slot.emit_text(text + slot.stops.flush())
            return
        if slot.guide is not None:
            try:
                slot.guide.accept(token)
            except CamelidError as exc:
                slot.finish, slot.error = "error", exc
                return
        if req.logprobs is not None:
            req.emit("token", token_logprobs(logits, [token], req.logprobs)[0])
        slot.last = token
        slot.history.append(token)
        req.tokens.append(token)
        self.metrics.generated_tokens += 1
        text, hit = slot.stops.push(slot.decoder.push(token))
        slot.emit_text(text)
        if hit:
            slot.finish = "stop"
        elif (slot.guide is not None and slot.guide.done) or len(req.tokens) >= req.max_tokens \
                or slot.length >= self.ctx:
            slot.finish = "stop" if slot.guide is not None and slot.guide.done else "length"
            text, hit = slot.stops.push(slot.decoder.flush())
            slot.emit_text(text if hit else text + slot.stops.flush())

    def _retire_finished(self):
        still = []
        for slot in self.active:
            if slot.finish is None:
                still.append(slot)
                continue
            if slot.finish != "error" and self.prefix_cache:  # kept for requests that begin the same way
                self.pool.commit(slot.seq, slot.history[:slot.length])
            self._release([slot.seq])
            if slot.finish == "error":
                self._fail(slot.req, slot.error)
            else:
                self._finish_request(slot.req, slot.finish)
        self.active = still

    def _finish_request(self, req: Request, reason: str):
        req.finish_reason = reason
        m = self.metrics
        if reason == "cancelled":
            m.requests_cancelled += 1
        else:
            m.requests_finished += 1
            m.latency_seconds_sum += time.perf_counter() - req.created
            if req.first_token_at is not None:
                m.ttft_seconds_sum += req.first_token_at - req.created
        req.emit("done", reason)


def _result(future):
    """(the masks, None) or (None, the exception) of a mask computation (None: there was none)."""
    if future is None:
        return None, None
    try:
        return future.result(), None
    except Exception as exc:
        return None, exc


@dataclass
class _Prefill:
    """A request whose prompt is being prefilled, `done` tokens of it so far (its n > 1 copies with it)."""
    req: Request
    seqs: list[Sequence]  # the request's, then each copy's
    done: int
    logits: list = field(default_factory=list)  # every chunk's, where the prompt is scored
    drafted: int = 0  # prompt tokens the draft model has seen

    @property
    def group(self) -> list[Request]:
        return [self.req] + self.req.copies


class _Slot:
    def __init__(self, req: Request, seq: Sequence, tok, generator):
        self.req = req
        self.seq = seq
        self.history = list(req.prompt)
        self.decoder = tok.stream(req.prompt)
        self.stops = StopStrings(req.stop)
        self.generator = generator
        self.length = 0  # tokens in this row of the cache
        self.drafted = 0  # of them, those the draft model's cache holds too
        self.last = 0
        self.finish: str | None = None
        self.error: Exception | None = None
        self.guide: Guide | None = None

    def emit_text(self, text: str):
        if text:
            self.req.emit("text", text)
