"""`camelid serve` with an encoder-decoder (T5): requests decoded together give each the reply transformers
gives it alone; the OpenAI endpoints answer, and what an encoder-decoder cannot do is the request's 400."""

import shutil
import threading

import httpx
import pytest
import torch
from test_serve_models import serve, stop
from test_t5 import _greedy, _vocab_folder

from camelid.formats.load import load_model
from camelid.generate.sampling import SamplingParams
from camelid.serve.engine import Request
from camelid.serve.models import Served
from camelid.serve.seq2seq_engine import Seq2SeqEngine

from conftest import SHARED
from test_serve import post, wait_ready

PROMPTS = ["Once upon a time", "Tom had a big dog and a small cat", "The sun", "Lily went to the park to play"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5") / "m"
    ref = _vocab_folder(folder, 512)
    shutil.copy(SHARED / "models" / "stories260K" / "tok512.model", folder / "spiece.model")
    return ref, folder, load_model(folder)


def _expected(ref, lm, prompt: str, n: int) -> list[int]:
    src = lm.tokenizer.encode(prompt, bos=False) + lm.tokenizer.eos_ids[:1]
    with torch.no_grad():
        return _greedy(ref, torch.tensor([src]), n, stop=set(lm.tokenizer.eos_ids))[1:]


def _run(eng, requests):
    """Submit every request before the engine's loop looks at its queue, so that they decode together."""
    done = [threading.Event() for _ in requests]
    for req, event in zip(requests, done):
        req.emit = lambda kind, value, event=event: event.set() if kind in ("done", "error") else None
    with eng._wake:
        for req in requests:
            eng.waiting.append(req)
            eng.metrics.requests_total += 1
    with eng._wake:
        eng._wake.notify()
    for event in done:
        assert event.wait(60)


def test_requests_decoded_together_reply_as_transformers_does_alone(t5):
    ref, _, lm = t5
    eng = Seq2SeqEngine(lm, max_batch=4)
    try:
        requests = [Request(lm.tokenizer.encode(p, bos=False), SamplingParams.greedy(), 4 + 3 * i, [],
                            emit=None) for i, p in enumerate(PROMPTS)]
        _run(eng, requests)
        for i, (p, req) in enumerate(zip(PROMPTS, requests)):
            assert req.finish_reason in ("stop", "length") and req.tokens == _expected(ref, lm, p, 4 + 3 * i), p
        m = eng.metrics
        assert m.batch_size_sum > m.decode_steps  # rows of different prompt and reply lengths shared steps
        assert m.requests_finished == 4 and eng.pool.used == 0
    finally:
        eng.shutdown()


def test_the_openai_endpoints_serve_a_t5(t5):
    ref, folder, lm = t5
    def short_template():  # FastChat-T5's one_shot format opens with an example longer than this tiny context
        served = load_model(folder)
        served.template = "alpaca"
        return served

    server, thread, base, _ = serve([Served("t5", short_template)])
    try:
        wait_ready(base)
        want = lm.tokenizer.decode(_expected(ref, lm, PROMPTS[1], 8))
        r = post(base, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip() == want.strip()
        assert r.json()["usage"]["completion_tokens"] <= 8

        r = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
                                                "n": 2, "temperature": 1.0, "seed": 3})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2 and r.json()["choices"][0]["message"]["role"] == "assistant"

        with httpx.stream("POST", f"{base}/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 8,
                                                                  "temperature": 0, "stream": True}) as s:
            assert s.status_code == 200
            text = "".join(__import__("json").loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                           if line.startswith("data: {"))
        assert text.strip() == want.strip()

        r = post(base, "/v1/completions", {"prompt": "Once", "max_tokens": 4, "logprobs": 2, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) >= 1
        r = post(base, "/v1/completions", {"prompt": "Once", "max_tokens": 2, "echo": True, "logprobs": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        r = post(base, "/v1/embeddings", {"input": "Once"})
        assert r.status_code == 400 and "encoder-decoder" in r.json()["error"]["message"]
        r = post(base, "/v1/completions", {"prompt": "Once " * 600, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert httpx.get(f"{base}/health").status_code == 200  # the server is still well
    finally:
        stop(server, thread)


def test_a_failing_prompt_among_others_fails_alone(t5):
    """Prompts admitted together are encoded as one batch; when that fails, each is encoded on its own, so only
    the failing request gets the error."""
    ref, _, lm = t5
    eng = Seq2SeqEngine(lm, max_batch=4)
    try:
        good = [lm.tokenizer.encode(p, bos=False) for p in PROMPTS[:2]]
        requests = [Request(good[0], SamplingParams.greedy(), 5, [], emit=None),
                    Request([5, 10 ** 6, 7], SamplingParams.greedy(), 5, [], emit=None),  # no such token
                    Request(good[1], SamplingParams.greedy(), 5, [], emit=None)]
        _run(eng, requests)
        assert [r.finish_reason for r in requests] == ["length", "error", "length"]
        assert requests[0].tokens == _expected(ref, lm, PROMPTS[0], 5)
        assert requests[2].tokens == _expected(ref, lm, PROMPTS[1], 5)
        assert eng.alive and eng.pool.used == 0
    finally:
        eng.shutdown()
