"""Continuous batching for an encoder-decoder (T5): the same queue, admission, sampling, stop strings, grammars
and metrics as engine.py, over a different cache.

A request's prompt is read by the encoder in one pass (bidirectional attention cannot be split into chunks;
prompts admitted together share one padded pass), which also computes every decoder block's cross-attention
keys and values; its reply then joins the running rows, each decoding from T5's start token. Rows keep their
own caches (their encoder outputs differ in length) and are stacked by model/t5.py's merge_caches, the
self-attention keys aligned at their newest position, each time the running rows change; between changes the
steps extend the stacked cache itself. The block pool only accounts for memory here (a request's prompt and
reply): nothing is stored in its blocks, so there is no prefix cache and no speculation. A request that asks
for its prompt's log-probabilities is refused before it gets here (the encoder gives none).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from camelid.errors import CamelidError
from camelid.formats.loaded import LoadedModel
from camelid.generate.constrained import Guide, allowed_tokens
from camelid.generate.kv_blocks import BlockPool
from camelid.generate.sampling import make_generator, sample
from camelid.model.kv_cache import kv_value_bytes
from camelid.model.memory import human_bytes, kv_cache_bytes, machine_memory
from camelid.model.t5 import Seq2SeqCache, merge_caches, split_cache
from camelid.serve.engine import KV_TYPE_OF, Engine, KVBudget, _Prefill, _Slot


class Seq2SeqEngine(Engine):
    def __init__(self, lm: LoadedModel, max_batch: int = 8, max_queue: int = 64, kv: KVBudget | None = None,
                 ctx_size: int | None = None, prefill_chunk: int = 256, prefix_cache: bool = True,
                 lookup=None, draft_tokens: int = 4, draft=None):
        if lookup is not None or draft is not None:
            raise CamelidError("an encoder-decoder model (T5) is served without --lookup or --draft")
        kv = kv or KVBudget()
        if kv.kv_type not in (None, KV_TYPE_OF[lm.model.dtype]):
            raise CamelidError(f"--kv-type {kv.kv_type}: an encoder-decoder model (T5) keeps its keys and values "
                               "in the model's dtype")
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.ctx = min(ctx_size or lm.config.max_seq_len, lm.config.max_seq_len)  # the prompt's, and the reply's
        self.pool, nbytes = _ledger(self.model, kv, max_batch, self.ctx)
        self.cache = SimpleNamespace(nbytes=nbytes)  # what /metrics and --max-model-memory count
        self.prefill_chunk, self.prefix_cache = prefill_chunk, False
        self.lookup = self.draft = self.draft_cache = None
        self.adapters, self.decode = False, self.model
        self.vocab_width, self.device = lm.config.vocab_size, self.model.device
        self.start_token = lm.config.extra.get("decoder_start_token_id", 0)
        self.eos = self.tok.eos_ids[0] if self.tok.eos_ids else None
        self._batch, self._batch_steps = None, 0  # (the rows, their stacked cache), and steps taken on it
        self._start_engine("camelid-seq2seq-engine")

    def fits(self, prompt: int, max_tokens: int) -> str | None:
        asks = f"the request has {prompt} prompt tokens and asks for {max_tokens} more"
        if max(prompt + (self.eos is not None), max_tokens) > self.ctx:
            return f"this model reads and writes at most {self.ctx} tokens each; {asks}"
        if self.pool.blocks_for(prompt + 1 + max_tokens) > self.pool.n_blocks:
            return (f"the server's KV cache holds {self.pool.n_blocks * self.pool.block_size} tokens "
                    f"(--kv-memory); {asks}")
        return None

    def _admit(self, req) -> list | None:
        """Blocks for the prompt and the reply after the decoder's start token, none of them shared."""
        return self.pool.admit(req.prompt, len(req.prompt) + 1 + req.max_tokens, reuse=False, copies=len(req.copies))

    def _prefill(self, budget: int | None):
        """Encode the admitted prompts: one between two decode steps while rows are running, else all of them,
        in one padded batch (one at a time if that fails, so that a failing request takes no other down)."""
        if budget is None:
            jobs = list(self.prefilling)
            self.prefilling.clear()
        else:
            jobs = [self.prefilling.popleft()] if self.prefilling else []
        jobs = [job for job in jobs if not self._all_cancelled(job)]
        caches = None
        if len(jobs) > 1:
            try:
                caches = self._encode([job.req.prompt for job in jobs])
            except Exception:  # the failing prompt is found below, one at a time
                caches = None
        for i, job in enumerate(jobs):
            try:
                self._start_rows(job, caches[i] if caches else self._encode([job.req.prompt])[0])
            except Exception as exc:
                self._release(job.seqs)
                for r in job.group:
                    self._fail(r, exc)

    def _all_cancelled(self, job: _Prefill) -> bool:
        if not all(r.cancelled for r in job.group):
            return False
        self._release(job.seqs)
        for r in job.group:
            self._finish_request(r, "cancelled")
        return True

    def _encode(self, prompts: list[list[int]]) -> list[Seq2SeqCache]:
        """Each prompt's cache (ending in EOS, as T5's tokenizers end what they encode), from one encoder pass
        over them padded at the end; each row keeps its own positions' keys and values."""
        prompts = [p + [self.eos] if self.eos is not None and p[-1] != self.eos else p for p in prompts]
        longest = max(map(len, prompts))
        src = torch.zeros(len(prompts), longest, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(src, dtype=torch.bool)
        for i, p in enumerate(prompts):
            src[i, :len(p)], mask[i, :len(p)] = torch.tensor(p, device=self.device), True
        batch = self.model.encode(src, mask)
        self.metrics.prefill_chunks += 1
        self.metrics.prefilled_tokens += sum(map(len, prompts))
        if len(prompts) == 1:
            return [batch]
        return [Seq2SeqCache([tuple(t[i:i + 1, :, :len(p)].contiguous() for t in kv) for kv in batch.cross_kv],
                             batch.key_mask[i:i + 1, ..., :len(p)].contiguous()) for i, p in enumerate(prompts)]

    def _start_rows(self, job: _Prefill, cache: Seq2SeqCache):
        """The request's rows (its n choices share the encoder's output) join the running ones."""
        for member, seq in zip(job.group, job.seqs):
            if member.cancelled or member.max_tokens == 0:
                self._release([seq])
                self._finish_request(member, "cancelled" if member.cancelled else "length")
                continue
            slot = _Slot(member, seq, self.tok, make_generator(member.params.seed, self.device))
            # the reply is the decoder's whole text: penalties and streaming see it alone, as transformers does
            slot.history, slot.decoder, slot.last = [], self.tok.stream(), self.start_token
            slot.cache = Seq2SeqCache(cache.cross_kv, cache.key_mask)
            if member.constraint is not None:
                slot.guide = Guide(member.constraint, self.tok)
                if slot.guide.error:
                    self._release([seq])
                    self._fail(member, slot.guide.error)
                    continue
            self.active.append(slot)

    def _step(self):
        """One token for every running row, in one pass through the decoder."""
        tokens = torch.tensor([[s.last] for s in self.active], device=self.device)
        try:
            logits = self.model(tokens, self._batch_cache())[:, -1]
            self._batch_steps += 1
        except Exception as exc:  # the batch's forward failed: no row's cache can be trusted
            self._batch = None
            self._fail_all(exc)
            return
        rows = self.active
        self.metrics.decode_steps += 1
        self.metrics.batch_size_sum += len(rows)
        guides = [s.guide for s in self.active]
        allowed = allowed_tokens(guides, self.vocab_width) if any(guides) else None
        for i, slot in enumerate(self.active):
            slot.length += 1
            if slot.guide is not None and slot.guide.error:
                slot.finish, slot.error = "error", slot.guide.error
                continue
            try:
                row = None if allowed is None else allowed[i:i + 1]
                token = sample(logits[i:i + 1], slot.req.params, [slot.history], slot.generator, row).item()
            except Exception as exc:
                slot.finish, slot.error = "error", exc
                continue
            self._accept(slot, token, logits[i:i + 1])
        self._retire_finished()

    def _batch_cache(self) -> Seq2SeqCache:
        """The running rows' caches as one batch, stacked only when the rows change: until then each step
        appends to the batch's own keys and values, which go back to the rows' caches when it is taken apart."""
        slots = list(self.active)
        if self._batch is not None and self._batch[0] == slots:
            return self._batch[1]
        if self._batch is not None and len(self._batch[0]) > 1:
            split_cache(self._batch[1], [s.cache for s in self._batch[0]], self._batch_steps)
        batch = merge_caches([s.cache for s in slots]) if len(slots) > 1 else slots[0].cache
        self._batch, self._batch_steps = (slots, batch), 0
        return batch


def _ledger(model, kv: KVBudget, slots: int, ctx: int) -> tuple[BlockPool, int]:
    """The positions the running requests may hold (the prompt's cross-attention keys and values, the reply's
    self-attention ones), as a pool of blocks for admission only, and its size in bytes."""
    per_token = kv_cache_bytes(model.cfg, 1, kv_value_bytes(KV_TYPE_OF[model.dtype])) // 2  # one stack's
    tokens = kv.memory // per_token if kv.memory else kv.tokens or slots * 2 * ctx
    n_blocks = max(1, tokens // kv.block_size)
    size = n_blocks * kv.block_size * per_token
    if model.device.type == "cpu" and size > machine_memory()[1]:
        raise CamelidError(f"keys and values for {n_blocks * kv.block_size} positions need {human_bytes(size)}, "
                           "more than this machine's free memory (lower --kv-memory, --ctx-size or --parallel)")
    return BlockPool(n_blocks, kv.block_size), size
