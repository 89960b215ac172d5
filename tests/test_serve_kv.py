"""The serving engine's paged KV cache: prefix reuse, a budget requests wait for, chunked prefill, and blocks
that always come back, checked against plain one-request generation."""

import threading
import time

import httpx
import pytest

from camelid.formats.load import load_model
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams
from camelid.serve.engine import Engine, KVBudget, Request, TooLong

from conftest import REPO
from test_serve import running_server, wait_ready

MODEL = REPO / "models" / "stories260K"
SYSTEM = ("Once upon a time, in a small town near the woods, there lived a kind old man who had a big red "
          "dog and a little cat. Every day they went for a walk together.")
ENDINGS = [" One day", " The dog", " The cat liked", " Then it rained and", " They saw a bird", " At night"]


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def run(engine: Engine, prompts: list[list[int]], max_tokens: int, params=None, timeout=120) -> list[Request]:
    done, requests = threading.Semaphore(0), []
    for p in prompts:
        req = Request(p, params or SamplingParams.greedy(), max_tokens, [], emit=None)
        req.emit = lambda kind, value, req=req: done.release() if kind in ("done", "error") else None
        requests.append(req)
        engine.submit(req)
    for _ in requests:
        assert done.acquire(timeout=timeout)
    return requests


def run_choices(engine: Engine, prompt: list[int], params: list, cancel_first: bool = False) -> list[Request]:
    """One request of 20 tokens with a choice for each sampling setting (n > 1: the others are its copies); the
    first cancelled before its prompt is in, if asked (the copies still run from the shared blocks)."""
    done = threading.Semaphore(0)
    group = [Request(prompt, p, 20, [], emit=lambda kind, _: done.release() if kind == "done" else None)
             for p in params]
    group[0].copies = group[1:]
    if cancel_first:
        group[0].cancel()
    engine.submit(group[0])
    for _ in group:
        assert done.acquire(timeout=60)
    return group


def wait_idle(engine: Engine):
    for _ in range(500):
        if engine.running == 0 and engine.pool.used == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"blocks still held: {engine.pool.used}")


def test_requests_sharing_a_prefix_reuse_its_blocks_and_generate_what_one_alone_does(lm):
    tok = lm.tokenizer
    prompts = [tok.encode(SYSTEM + e) for e in ENDINGS]
    expected = [generate(lm, [p], 30, SamplingParams.greedy())[0].tokens for p in prompts]
    engine = Engine(lm, max_batch=4, kv=KVBudget(block_size=8))
    try:
        first = run(engine, prompts[:1], 30)
        computed = engine.metrics.prefilled_tokens
        rest = run(engine, prompts[1:], 30)
        assert [r.tokens for r in first + rest] == expected
        # the shared story was prefilled once: the later prompts computed only their own blocks' worth
        shared = len(tok.encode(SYSTEM)) // 8 * 8
        assert engine.pool.stats.prefix_hits >= shared * len(rest)
        assert engine.metrics.prefilled_tokens - computed <= sum(len(p) for p in prompts[1:]) - shared * len(rest)
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_a_full_pool_makes_requests_wait_and_none_is_corrupted(lm):
    """Room for about two requests at a time: twelve sampled requests all finish with exactly their own
    text, and the pool is whole again afterwards."""
    tok = lm.tokenizer
    prompts = [tok.encode(e.strip()) for e in ENDINGS] * 2
    params = SamplingParams(temperature=1.0, seed=7)
    expected = [generate(lm, [p], 40, params)[0].tokens for p in prompts]
    engine = Engine(lm, max_batch=8, kv=KVBudget(tokens=112, block_size=8), prefix_cache=False)
    try:
        got = run(engine, prompts, 40, params)
        assert [r.tokens for r in got] == expected and all(r.finish_reason for r in got)
        wait_idle(engine)
        assert engine.pool.available == engine.pool.n_blocks
    finally:
        engine.shutdown()


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_steps(lm):
    tok = lm.tokenizer
    long = tok.encode(" ".join([SYSTEM] * 6))[:300]
    short = tok.encode("Tom had a big dog")
    expected = [generate(lm, [p], n, SamplingParams.greedy())[0].tokens for p, n in ((short, 60), (long, 20))]
    engine = Engine(lm, max_batch=4, prefill_chunk=32)
    try:
        steps_at = []
        streaming = Request(short, SamplingParams.greedy(), 60, [], emit=None)
        started, done = threading.Event(), threading.Semaphore(0)

        def on_short(kind, value):
            if kind == "text":
                started.set()
                steps_at.append(engine.metrics.prefill_chunks)
            if kind in ("done", "error"):
                done.release()
        streaming.emit = on_short
        engine.submit(streaming)
        assert started.wait(60)
        arriving = Request(long, SamplingParams.greedy(), 20, [],
                           emit=lambda kind, _: done.release() if kind in ("done", "error") else None)
        engine.submit(arriving)
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
        assert [streaming.tokens, arriving.tokens] == expected
        chunks = engine.metrics.prefill_chunks - 1  # the short prompt's own
        assert chunks == -(-len(long) // 32)
        # the stream went on while the long prompt came in: its tokens arrived between chunks
        assert len({n for n in steps_at if 1 < n < 1 + chunks}) >= chunks - 2
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_n_choices_share_the_prompts_blocks(lm):
    tok = lm.tokenizer
    prompt = tok.encode(SYSTEM)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    expected = [generate(lm, [prompt], 20, p)[0].tokens for p in params]
    engine = Engine(lm, max_batch=4, kv=KVBudget(block_size=8))
    try:
        group = run_choices(engine, prompt, params)
        assert [r.tokens for r in group] == expected
        assert engine.metrics.prefilled_tokens == len(prompt)  # prefilled once for the three
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_a_request_the_budget_cannot_hold_is_refused_up_front(lm):
    engine = Engine(lm, max_batch=2, kv=KVBudget(tokens=64, block_size=16), ctx_size=48)
    try:
        with pytest.raises(TooLong, match="maximum context length is 48"):
            engine.submit(Request([1] * 40, SamplingParams.greedy(), 10, [], emit=lambda *_: None))
        assert engine.fits(30, 10) is None
        small = Engine(lm, max_batch=2, kv=KVBudget(tokens=32, block_size=16))
        try:
            assert "KV cache holds 32 tokens" in small.fits(30, 10)
        finally:
            small.shutdown()
    finally:
        engine.shutdown()


def test_over_http_too_long_is_a_400_and_a_disconnect_gives_its_blocks_back():
    with running_server(kv=KVBudget(tokens=256, block_size=16)) as (base, app):
        wait_ready(base)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 300})
        assert r.status_code == 400 and "KV cache holds 256 tokens" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "context_length_exceeded"
        engine = app.state.camelid["engine"]
        body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    assert "camelid_kv_blocks_used 0" not in httpx.get(f"{base}/metrics").text
                    break  # one chunk, then the client goes away
        wait_idle(engine)
        metrics = httpx.get(f"{base}/metrics").text
        assert "camelid_kv_blocks_used 0" in metrics and "camelid_kv_blocks_reserved 0" in metrics
        assert "camelid_kv_blocks 16" in metrics


def test_speculation_in_the_batch_gives_each_request_its_plain_greedy_text(lm):
    """Prompt lookup drafts for every row; one forward verifies the batch. Greedy text is exactly plain
    decoding's, row by row, and the drafts that repeat the prompt are accepted."""
    from camelid.generate.speculative import PromptLookup

    tok = lm.tokenizer
    prompts = [tok.encode(SYSTEM + " " + SYSTEM), tok.encode("Tom had a big dog"), tok.encode(SYSTEM)]
    expected = [generate(lm, [p], 40, SamplingParams.greedy())[0].tokens for p in prompts]
    engine = Engine(lm, max_batch=4, lookup=PromptLookup(3), draft_tokens=4)
    try:
        got = run(engine, prompts, 40)
        assert [r.tokens for r in got] == expected
        m = engine.metrics
        assert m.speculative_rounds > 0 and 0 < m.speculative_accepted <= m.speculative_drafted
        assert m.decode_steps < sum(len(r.tokens) for r in got) // 1.5  # fewer passes than tokens
        wait_idle(engine)
    finally:
        engine.shutdown()


def _noisy_copy(model, scale: float):
    """The model with noise on every weight: a draft that agrees with it often, not always."""
    import copy

    import torch

    other = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * scale)
    return other


@pytest.mark.parametrize("draft", ["same-model", "noisy", "random"])
def test_a_draft_model_in_the_batch_gives_each_request_its_plain_greedy_text(lm, draft):
    """A smaller model drafts for every row (its own paged cache under the rows' block tables); one forward
    verifies the batch. Greedy text is plain decoding's, row by row, also when the prompts' blocks come from
    the prefix cache and the draft's keys and values for them must be recomputed."""
    import torch

    from camelid.model.config import ModelConfig
    from camelid.model.transformer import Transformer

    tok = lm.tokenizer
    prompts = [tok.encode(SYSTEM + " " + SYSTEM), tok.encode("Tom had a big dog"), tok.encode(SYSTEM)]
    expected = [generate(lm, [p], 40, SamplingParams.greedy())[0].tokens for p in prompts]
    if draft == "random":
        torch.manual_seed(5)
        model = Transformer(ModelConfig(**{**lm.model.cfg.__dict__, "n_layers": 1})).eval()
    else:
        model = _noisy_copy(lm.model, 0.0 if draft == "same-model" else 0.05)
    engine = Engine(lm, max_batch=4, kv=KVBudget(block_size=8), draft=model, draft_tokens=4)
    try:
        got = run(engine, prompts, 40)
        assert [r.tokens for r in got] == expected
        again = run(engine, prompts[::-1], 40)  # their blocks are cached now
        assert [r.tokens for r in again] == expected[::-1]
        m = engine.metrics
        assert m.speculative_rounds > 0 and m.speculative_accepted <= m.speculative_drafted
        if draft == "same-model":  # it proposes what the model would: every draft is accepted
            assert m.speculative_accepted == m.speculative_drafted
            assert m.decode_steps < sum(len(r.tokens) for r in got + again) // 2
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_a_draft_model_with_another_vocabulary_is_refused(lm):
    from camelid.errors import CamelidError
    from camelid.model.config import ModelConfig
    from camelid.model.transformer import Transformer

    other = Transformer(ModelConfig(**{**lm.model.cfg.__dict__, "n_layers": 1, "vocab_size": 100})).eval()
    with pytest.raises(CamelidError, match="same tokenizer"):
        Engine(lm, max_batch=2, draft=other)


@pytest.mark.parametrize("drafter", ["lookup", "draft-model"])
def test_speculation_with_sampling_draws_from_the_models_distribution(lm, drafter):
    """At temperature 1 the first two tokens after a repetitive prompt (the second one drafted and verified),
    over many seeds, are distributed as the sampler's own p(t1) p(t2 | t1) (top-k, top-p and min-p as plain
    sampling applies them): chi-square over the likeliest pairs."""
    import torch
    from scipy import stats as scipy_stats

    from camelid.generate.sampling import distribution
    from camelid.generate.speculative import PromptLookup

    tok = lm.tokenizer
    prompt = tok.encode("the cat sat. the cat sat. the cat sat. the cat")
    params = SamplingParams(temperature=1.0)
    with torch.inference_mode():
        first = distribution(lm.model(torch.tensor([prompt]))[:, -1], params, [prompt])[0]
        cells = {}
        for t1 in first.topk(3).indices.tolist():
            second = distribution(lm.model(torch.tensor([prompt + [t1]]))[:, -1], params, [prompt + [t1]])[0]
            for t2 in second.topk(3).indices.tolist():
                if first[t1] * second[t2] > 0:  # the sampler's truncation leaves fewer than three
                    cells[(t1, t2)] = float(first[t1] * second[t2])
    if drafter == "lookup":
        engine = Engine(lm, max_batch=8, lookup=PromptLookup(2), draft_tokens=3)
    else:  # a draft that disagrees often enough for rejections to matter
        engine = Engine(lm, max_batch=8, draft=_noisy_copy(lm.model, 0.1), draft_tokens=3)
    pairs = []
    try:
        for batch in range(100):
            done, reqs = threading.Semaphore(0), []
            for i in range(8):
                reqs.append(Request(prompt, SamplingParams(temperature=1.0, seed=batch * 8 + i), 3, [],
                                    emit=lambda kind, _, done=done: done.release() if kind == "done" else None))
                engine.submit(reqs[-1])
            for _ in reqs:
                assert done.acquire(timeout=60)
            pairs += [tuple(r.tokens[:2]) for r in reqs]
        m = engine.metrics
        assert 0 < m.speculative_accepted and (drafter == "lookup" or m.speculative_accepted < m.speculative_drafted)
    finally:
        engine.shutdown()
    counts = [sum(p == c for p in pairs) for c in cells]
    expected = [q * len(pairs) for q in cells.values()]
    if sum(cells.values()) < 1 - 1e-6:
        counts.append(sum(p not in cells for p in pairs))
        expected.append((1 - sum(cells.values())) * len(pairs))
    else:
        expected = [e * sum(counts) / sum(expected) for e in expected]
    assert scipy_stats.chisquare(counts, expected).pvalue > 1e-3


def test_a_cancelled_first_choice_leaves_the_other_choices_whole(lm):
    tok = lm.tokenizer
    prompt = tok.encode(SYSTEM)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2)]
    expected = generate(lm, [prompt], 20, params[1])[0].tokens
    engine = Engine(lm, max_batch=4, kv=KVBudget(block_size=8))
    try:
        group = run_choices(engine, prompt, params, cancel_first=True)
        assert group[0].finish_reason == "cancelled" and group[1].tokens == expected
        wait_idle(engine)
    finally:
        engine.shutdown()
