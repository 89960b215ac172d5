"""Log-likelihoods of continuations, computed the way lm-evaluation-harness computes them.

lm-eval reads each (context, continuation) request in a row of its own, so a question with four choices
reads its context four times. camelid puts a context and all of its continuations in one row: the
continuations follow the context one after another, each at the positions it would have alone, seeing the
context and itself but not its siblings. The log-likelihoods are the same (tested against transformers and
lm-eval); the context is read once, and rows of many questions are batched by length."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from camelid.data.shared_prefix import batch_layout, shared_row
from camelid.errors import CamelidError


@dataclass
class Request:
    context: str
    continuation: str


def prefix_token(tok) -> int:
    """What an empty context is replaced by: BOS when the vocabulary has one, else EOS (lm-eval's HF backend)."""
    if tok.bos_id is not None:
        return tok.bos_id
    if not tok.eos_ids:
        raise CamelidError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return tok.eos_ids[0]


def encode_pair(tok, context: str, continuation: str, bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair: trailing whitespace moves from the context to the continuation, the
    concatenation is encoded, and it is split where the context's own tokens end. `bos` adds the
    tokenizer's BOS to both encodings (lm-eval >= 0.4.10 with a tokenizer that adds one by default)."""
    if not context:
        prefix = prefix_token(tok)
        cont = tok.encode(continuation, bos=False)
        return ([prefix], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, bos=bos)
    ctx = tok.encode(context, bos=bos)
    return ctx, whole[len(ctx):]


def truncate(ctx: list[int], cont: list[int], max_len: int) -> tuple[int, ...]:
    """The context the model actually sees: lm-eval keeps the last max_len + 1 tokens of context +
    continuation and feeds all but the last."""
    if not cont:
        raise CamelidError("a continuation encodes to no tokens")
    if len(cont) > max_len:
        raise CamelidError(f"a continuation of {len(cont)} tokens is longer than the model's context {max_len}")
    whole = (ctx + cont)[-(max_len + 1):]
    return tuple(whole[:len(whole) - len(cont)])


@torch.inference_mode()
def score_rows(model, rows: list[tuple], conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, is_greedy) of every continuation of every row, in one forward pass."""
    device = model.device
    tokens, layout = batch_layout(rows, device)
    want = torch.zeros(tokens.shape, dtype=torch.bool)
    for b, row in enumerate(rows):
        for idx in row[3]:
            want[b, idx] = True
    logprobs = torch.log_softmax(model(tokens, layout=layout, logits_at=want.to(device)).float(), dim=-1).cpu()
    index = (want.flatten().cumsum(0) - 1).view(want.shape)  # (b, t) -> row of `logprobs`
    out = []
    for b, row in enumerate(rows):
        results = []
        for cont, where in zip(conts[b], row[3]):
            lp = logprobs[index[b, where]]
            target = torch.tensor(cont)
            ll = float(lp.gather(-1, target[:, None]).sum())
            results.append((ll, bool((lp.argmax(-1) == target).all())))
        out.append(results)
    return out


def loglikelihoods(lm, requests: list[Request], bos: bool = False, max_len: int | None = None,
                   batch_tokens: int = 4096, progress: bool = True, truncated: list | None = None
                   ) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) for each request, in order. Requests whose (truncated) contexts are
    equal share a row; rows are batched longest first up to `batch_tokens` tokens a batch. The indices of
    requests whose context was cut to fit the model are appended to `truncated`."""
    max_len = max_len or lm.config.max_seq_len
    if lm.config.n_encoder_layers:
        return _seq2seq_loglikelihoods(lm, requests, max_len, batch_tokens, progress, truncated)
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, r in enumerate(requests):
        ctx, cont = encode_pair(lm.tokenizer, r.context, r.continuation, bos)
        seen = truncate(ctx, cont, max_len)
        if truncated is not None and len(seen) < len(ctx):
            truncated.append(i)
        groups.setdefault(seen, []).append((i, cont))
    rows = sorted(((ctx, members, shared_row(ctx, [c for _, c in members])) for ctx, members in groups.items()),
                  key=lambda g: -len(g[2][0]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood", unit="req", disable=None if progress else True)
    start = 0
    while start < len(rows):
        width = len(rows[start][2][0])
        end = start + max(1, batch_tokens // max(width, 1))
        batch = rows[start:end]
        scored = score_rows(lm.model, [g[2] for g in batch], [[c for _, c in g[1]] for g in batch])
        for (_, members, _), row_scores in zip(batch, scored):
            for (i, _), score in zip(members, row_scores):
                results[i] = score
        bar.update(sum(len(g[1]) for g in batch))
        start = end
    bar.close()
    return results


def encode_seq2seq_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's encoder-decoder pair: trailing whitespace moves to the continuation, the context is encoded as
    the tokenizer writes a text for the encoder (T5's: ending in EOS), the continuation alone without it."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:  # an empty context stands as lm-eval's prefix token
        return [prefix_token(tok)], tok.encode(continuation, bos=False)
    return tok.encode(context, bos=False) + tok.eos_ids[:1], tok.encode(continuation, bos=False)


@torch.inference_mode()
def _seq2seq_loglikelihoods(lm, requests, max_len, batch_tokens, progress, truncated) -> list[tuple[float, bool]]:
    """An encoder-decoder's: each context is encoded once, for all of its continuations, which the decoder
    reads from its start token; a context longer than the model's keeps its last max_len tokens, as lm-eval's."""
    model = lm.model
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, r in enumerate(requests):
        ctx, cont = encode_seq2seq_pair(lm.tokenizer, r.context, r.continuation)
        if not cont:
            raise CamelidError("a continuation encodes to no tokens")
        if truncated is not None and len(ctx) > max_len:
            truncated.append(i)
        groups.setdefault(tuple(ctx[-max_len:]), []).append((i, cont))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    start = model.cfg.extra.get("decoder_start_token_id", 0)
    for ctx, members in tqdm(groups.items(), desc="loglikelihood", unit="context", disable=None if progress else True):
        for chunk in range(0, len(members), max(1, batch_tokens // max(len(ctx), 1))):
            part = members[chunk:chunk + max(1, batch_tokens // max(len(ctx), 1))]
            width = max(len(c) for _, c in part)
            cache = model.encode(torch.tensor([ctx] * len(part), device=model.device))
            dec = torch.tensor([[start] + c[:-1] + [0] * (width - len(c)) for _, c in part], device=model.device)
            logprobs = torch.log_softmax(model(dec, cache, keep_cache=False), dim=-1).cpu()
            for row, (i, cont) in enumerate(part):
                lp, target = logprobs[row, :len(cont)], torch.tensor(cont)
                results[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return results
