"""Perplexity two ways.

`harness`: lm-evaluation-harness's `loglikelihood_rolling` (what its wikitext task reports): each document
is scored on its own in disjoint windows of the model's length, the first token conditioned on a prefix
token (BOS, or EOS when the tokenizer has none), every token predicted exactly once; word perplexity, byte
perplexity and bits per byte count the document's words and UTF-8 bytes. Document tokens carry no BOS of
their own, as in lm-eval up to v0.4.9 and for every GPT-2/NeoX-style tokenizer.

`llamacpp`: llama.cpp's `perplexity`: the whole text tokenized at once, cut into n_ctx chunks whose first
token becomes BOS (when the vocabulary has one), only the second half of each chunk scored, token-level PPL.
The two protocols give different numbers by design; say which one you quote."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.errors import CamelidError


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows as lm-eval's get_rolling_token_windows + make_disjoint_window with
    context_len 1: the model reads (context + continuation)[:-1] and scores the continuation."""
    windows = []
    first = min(max_len, len(tokens))
    windows.append(([prefix_token], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        context = tokens[max(0, end - max_len - 1):end - 1]
        windows.append((context[:len(context) - (n - 1)], tokens[end - n:end]))
        predicted += n
    return windows


@torch.inference_mode()
def continuation_logprobs(model, context: list[int], continuation: list[int]) -> torch.Tensor:
    """log p of each continuation token given everything before it (logits only where scored)."""
    device = model.device
    ids = torch.tensor([(context + continuation)[:-1]], device=device)
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[0, -len(continuation):] = True
    logits = model(ids, logits_at=at).float()
    targets = torch.tensor(continuation, device=device)
    return F.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def document_loglikelihood(lm, text: str, max_len: int | None = None) -> tuple[float, int]:
    """(summed natural-log likelihood, tokens scored) of one document, lm-eval's rolling way."""
    tok = lm.tokenizer
    tokens = tok.encode(text, bos=False)
    if not tokens:
        return 0.0, 0
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_ids[0]
    windows = rolling_windows(tokens, prefix, max_len or lm.config.max_seq_len)
    return sum(float(continuation_logprobs(lm.model, c, t).sum()) for c, t in windows), len(tokens)


def harness_perplexity(lm, documents: list[str], max_len: int | None = None) -> dict:
    """lm-eval's wikitext metrics (word/byte perplexity, bits per byte) plus token perplexity and bits per
    character, over whole documents."""
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise CamelidError("perplexity: no text to score (the data is empty)")
    ll = words = nbytes = chars = ntokens = 0
    for doc in tqdm(documents, desc="perplexity", unit="doc", disable=None):
        doc_ll, n = document_loglikelihood(lm, doc, max_len)
        ll += doc_ll
        ntokens += n
        words += len(re.split(r"\s+", doc))
        nbytes += len(doc.encode("utf-8"))
        chars += len(doc)
    return {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
            "bits_per_byte": -ll / nbytes / math.log(2), "bits_per_char": -ll / chars / math.log(2),
            "token_perplexity": math.exp(-ll / max(ntokens, 1)), "documents": len(documents), "tokens": ntokens}


@torch.inference_mode()
def llamacpp_perplexity(lm, text: str, n_ctx: int = 512) -> dict:
    """llama.cpp's protocol: n_ctx chunks, first token BOS, second half scored; PPL with llama.cpp's ±."""
    tok = lm.tokenizer
    tokens = tok.encode(text, bos=tok.add_bos)
    if n_ctx > lm.config.max_seq_len:
        raise CamelidError(f"--ctx {n_ctx} is longer than the model's context {lm.config.max_seq_len}")
    n_chunk = len(tokens) // n_ctx
    if n_chunk == 0:
        raise CamelidError(f"perplexity: the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    first = n_ctx // 2
    nll = []
    for i in tqdm(range(n_chunk), desc="perplexity (llama.cpp)", unit="chunk", disable=None):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        if tok.add_bos and tok.bos_id is not None:
            chunk = [tok.bos_id] + chunk[1:]
        nll.append(-continuation_logprobs(lm.model, chunk[:first + 1], chunk[first + 1:]))
    nll = torch.cat(nll).double()
    ppl = math.exp(float(nll.mean()))
    spread = math.sqrt(float(nll.var(unbiased=False)) / max(len(nll) - 1, 1)) * ppl
    return {"perplexity": ppl, "plus_minus": spread, "chunks": n_chunk, "tokens_scored": len(nll), "n_ctx": n_ctx}


def evaluate_perplexity(lm, data: list[str], protocol: str = "harness", max_len: int | None = None,
                        n_ctx: int = 512) -> dict:
    """Perplexity of `lm` on text/JSONL files (a file or a record is a document), in lm-eval's results layout."""
    from camelid.data.corpus import read_corpus

    documents = [d.text for d in read_corpus(data)]
    if protocol == "harness":
        metrics = harness_perplexity(lm, documents, max_len)
    elif protocol == "llamacpp":
        metrics = llamacpp_perplexity(lm, "\n\n".join(documents), n_ctx)
    else:
        raise CamelidError(f"protocol {protocol!r}: use harness or llamacpp")
    return {"results": {"perplexity": {f"{k},none": v for k, v in metrics.items()}},
            "config": {"model": lm.source, "protocol": protocol, "data": list(map(str, data)), "max_length": max_len,
                       "ctx": n_ctx if protocol == "llamacpp" else None},
            "n-samples": {"perplexity": {"original": len(documents), "effective": len(documents)}},
            "versions": {"perplexity": 1.0}, "n-shot": {"perplexity": 0}, "higher_is_better": {"perplexity": {}},
            "group_subtasks": {}}
