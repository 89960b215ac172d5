"""`camelid serve` driven by real clients (the official openai package, httpx) over loopback."""

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from camelid.formats.load import load_model
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams
from camelid.serve.app import ServerConfig, create_app
from camelid.serve.engine import Request

from conftest import REPO

MODEL = REPO / "models" / "stories260K"
PROMPTS = ["Once upon a time", "Tom had a big dog", "The sun was hot", "Lily and Ben went to the park",
           "One day", "The cat"]


@contextlib.contextmanager
def running_server(load=None, http="auto", **config):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(load or (lambda: load_model(MODEL)), ServerConfig("stories", **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", http=http))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_ready(base, headers=None):
    for _ in range(300):
        if httpx.get(f"{base}/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("server never became ready")


@pytest.fixture(scope="module")
def server():
    with running_server() as (base, app):
        wait_ready(base)
        yield base, app


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def greedy(lm, prompt, n):
    return generate(lm, [prompt], n, SamplingParams.greedy())[0].text


def test_openai_client_completions_and_chat(server, lm):
    import openai

    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["stories"]
    c = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=30, temperature=0)
    assert c.choices[0].text == greedy(lm, "Once upon a time", 30)
    assert c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(lm.tokenizer.encode("Once upon a time")), 30)
    chat = client.chat.completions.create(model="stories", messages=[{"role": "user", "content": "Once upon a time"}],
                                          max_tokens=25, temperature=0)
    # The model's stored template is "raw": the chat prompt is BOS + the user's text.
    assert chat.choices[0].message.content == greedy(lm, "Once upon a time", 25)
    stream = client.chat.completions.create(model="stories", messages=[{"role": "user", "content": "Once upon a time"}],
                                            max_tokens=25, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == chat.choices[0].message.content and finish == "length"
    assert usage.completion_tokens == 25
    streamed = client.completions.create(model="stories", prompt="The cat", max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == greedy(lm, "The cat", 20)


def test_stop_sequences_and_seed(server, lm):
    import openai

    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused")
    full = greedy(lm, "Once upon a time", 40)
    c = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=40, temperature=0,
                                  stop=["Lily"])
    assert c.choices[0].text == full[:full.index("Lily")] and c.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model="stories", prompt="One day", max_tokens=30, temperature=1.0, seed=5)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_concurrent_requests_are_batched_and_exact(server, lm):
    base, app = server
    engine = app.state.camelid["engine"]
    steps_before, rows_before = engine.metrics.decode_steps, engine.metrics.batch_size_sum

    def complete(prompt):
        r = httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 60, "temperature": 0},
                       timeout=60)
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(complete, PROMPTS))
    assert texts == [greedy(lm, p, 60) for p in PROMPTS]
    steps = engine.metrics.decode_steps - steps_before
    rows = engine.metrics.batch_size_sum - rows_before
    assert rows / steps > 1.5  # requests really shared forward passes


@pytest.mark.parametrize("body,status,needle", [
    ('{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
    ('{"prompt": "x", "top_p": 1.5}', 400, "top_p"),
    ('{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
    ('{"prompt": "x", "n": 0}', 400, "n"),
    ('{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ('{"prompt": "x", "model": "gpt-4"}', 404, "does not exist"),
    ('{"prompt": ' + json.dumps("Once upon a time " * 200) + '}', 400, "maximum context length"),
    ('{"prompt": [1, 2, 99999]}', 400, "vocabulary"),
    ('{"prompt": "x"', 400, "not valid JSON"),
    ('[1, 2]', 400, ""),
    ('{"max_tokens": 5}', 400, "prompt"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    r = httpx.post(f"{server[0]}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_bad_chat_requests(server):
    base = server[0]
    for body, needle in (({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
                         ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
                          "max_completion_tokens")):
        r = httpx.post(f"{base}/v1/chat/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_body_size_limit():
    with running_server(max_body_bytes=2000) as (base, _):
        wait_ready(base)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and "larger than 2000" in r.json()["error"]["message"]


def test_api_key_and_health_while_loading():
    gate = threading.Event()

    def slow_load():
        gate.wait(10)
        return load_model(MODEL)

    with running_server(load=slow_load, api_key="s3cret") as (base, _):
        assert httpx.get(f"{base}/health").status_code == 503
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        wait_ready(base)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 3},
                        headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert "access-control-allow-origin" not in httpx.options(
            f"{base}/v1/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
        ).headers


def test_disconnect_cancels_generation(server):
    base, app = server
    engine = app.state.camelid["engine"]
    before = engine.metrics.requests_cancelled
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then the client goes away
    for _ in range(200):
        if engine.metrics.requests_cancelled > before and engine.running == 0:
            break
        time.sleep(0.02)
    assert engine.metrics.requests_cancelled == before + 1 and engine.running == 0


def test_full_queue_answers_429():
    with running_server(max_batch=1, max_queue=1) as (base, app):
        wait_ready(base)
        engine = app.state.camelid["engine"]
        release = threading.Event()
        # Occupy the engine's only slot with a request whose consumer blocks until released (never by a timeout:
        # on a loaded machine a timed wait ran out, the slot freed and the queue drained before the check).
        engine.submit(Request([1], SamplingParams.greedy(), 2, [], emit=lambda *_: release.wait()))
        try:
            for _ in range(3000):  # taken into the slot, not still queued (the queue's one place is for the next)
                if engine.running == 1 and engine.queue_depth == 0:
                    break
                time.sleep(0.02)
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(httpx.post, f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                     timeout=60)
                for _ in range(3000):  # a loaded machine can take seconds to get the first request queued
                    if engine.queue_depth == 1:
                        break
                    time.sleep(0.02)
                assert engine.queue_depth == 1
                r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
                release.set()
                assert queued.result().status_code == 200
        finally:
            release.set()
        metrics = httpx.get(f"{base}/metrics").text
        assert "camelid_requests_rejected_total 1" in metrics and "camelid_queue_depth 0" in metrics


def test_metrics_format(server):
    text = httpx.get(f"{server[0]}/metrics").text
    assert "# TYPE camelid_generated_tokens_total counter" in text
    assert "camelid_time_to_first_token_seconds_count" in text


def test_slow_client_does_not_block_others(server, lm):
    base = server[0]
    body = {"prompt": "Once upon a time", "max_tokens": 300, "temperature": 1.0, "stream": True}
    with httpx.Client(timeout=60) as slow_client, slow_client.stream("POST", f"{base}/v1/completions", json=body):
        # The slow client reads nothing; another request still completes normally meanwhile.
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "The cat", "max_tokens": 20, "temperature": 0},
                       timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(lm, "The cat", 20)


def test_cors_only_when_asked():
    with running_server(cors_origins=["https://my.app"]) as (base, _):
        wait_ready(base)
        r = httpx.options(f"{base}/v1/models", headers={"Origin": "https://my.app",
                                                        "Access-Control-Request-Method": "GET"})
        assert r.headers.get("access-control-allow-origin") == "https://my.app"


# ---------------------------------------------------------------- one request never harms the others


def post(base, path, body, **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{base}{path}", content=content, headers={"Content-Type": "application/json",
                                                                  **kw.pop("headers", {})}, timeout=60, **kw)


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/completions", '{"prompt": "Once", "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", '{"prompt": "Once", "seed": -9223372036854775809}', "seed"),
    ("/v1/completions", '{"prompt": "Once", "temperature": 1e-300}', "temperature"),
    ("/v1/completions", '{"prompt": "Once", "max_tokens": true}', "max_tokens"),
    ("/v1/completions", '{"prompt": "Once", "temperature": "0.5"}', "temperature"),
    ("/v1/completions", '{"prompt": "Once", "stream": "yes"}', "stream"),
    ("/v1/completions", '{"prompt": "Once \\ud800 upon"}', "not valid Unicode"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "caf\\udce9"}]}', "not valid Unicode"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "'text' must be a string"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}',
     "'text' must be a string"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image_url", '
                             '"image_url": {"url": "data:,"}}]}]}', "'image_url' is not supported"),
])
def test_client_mistakes_are_400s_and_the_engine_goes_on(server, lm, path, body, needle):
    base, app = server
    r = post(base, path, body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    ok = post(base, "/v1/completions", {"prompt": "The cat", "max_tokens": 5, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == greedy(lm, "The cat", 5)
    assert app.state.camelid["engine"].alive and httpx.get(f"{base}/health").status_code == 200


def test_completion_text_continues_the_prompt(server):
    r = post(server[0], "/v1/completions", {"prompt": "Once", "max_tokens": 3, "temperature": 0})
    assert r.json()["choices"][0]["text"] == " upon a time"  # llama2.c prints "Once upon a time"


def test_a_model_with_nan_logits_fails_its_requests_with_500_and_keeps_serving():
    def broken():
        lm = load_model(MODEL)
        lm.model.norm.weight.data.fill_(float("nan"))
        return lm

    with running_server(load=broken) as (base, app):
        wait_ready(base)
        for body in ({"prompt": "Once", "max_tokens": 3}, {"prompt": "Once", "max_tokens": 3, "temperature": 0},
                     {"prompt": "Once", "max_tokens": 3, "stream": True}):
            r = post(base, "/v1/completions", body)
            assert r.status_code == 500 and "NaN" in r.json()["error"]["message"], r.text
        assert httpx.get(f"{base}/health").status_code == 200 and app.state.camelid["engine"].alive
        assert "camelid_requests_failed_total 3" in httpx.get(f"{base}/metrics").text


def test_a_stopped_engine_is_reported_and_refused_not_hung():
    with running_server() as (base, app):
        wait_ready(base)
        engine = app.state.camelid["engine"]

        def explode(*_):
            raise RuntimeError("a bug in a callback")

        engine.submit(Request([1], SamplingParams.greedy(), 2, [], emit=explode))
        for _ in range(200):
            if not engine.alive:
                break
            time.sleep(0.02)
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and "a bug in a callback" in health.json()["error"]
        r = post(base, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"


@pytest.mark.parametrize("template,needle", [
    ("{{ messages[0]['content'] + 1 }}", "chat template failed: TypeError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than 2 s"),
    ("{{ 'x' * 1000000000 }}", "over 16777216 elements"),
])
def test_bad_model_templates_are_400s_and_never_stall_the_server(template, needle):
    def with_template():
        lm = load_model(MODEL)
        lm.template = template
        return lm

    with running_server(load=with_template) as (base, _):
        wait_ready(base)
        done = []
        with ThreadPoolExecutor(1) as pool:
            chat = pool.submit(lambda: (post(base, "/v1/chat/completions",
                                             {"messages": [{"role": "user", "content": "hi"}]}), done.append("chat"))[0])
            if "range" in template:  # while the template renders, the event loop still answers
                time.sleep(0.3)
                assert httpx.get(f"{base}/health").status_code == 200
                done.append("health")
            r = chat.result()
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert done[0] == "health" if "range" in template else True


def test_chunked_body_over_the_limit_is_413():
    with running_server(max_body_bytes=2000) as (base, _):
        wait_ready(base)

        def chunks():
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'

        r = httpx.post(f"{base}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "larger than 2000" in r.json()["error"]["message"]


def test_host_header_and_api_key_scheme():
    with running_server(api_key="s3cret") as (base, _):
        wait_ready(base)
        auth = {"Authorization": "bearer s3cret"}  # the scheme is case-insensitive
        assert httpx.get(f"{base}/v1/models", headers=auth).status_code == 200
        port = base.rsplit(":", 1)[1]
        for host, status in ((f"localhost:{port}", 200), ("evil.example", 400), (f"evil.example:{port}", 400),
                             (f"[::1]:{port}", 200)):
            r = httpx.get(f"{base}/v1/models", headers={**auth, "Host": host})
            assert r.status_code == status, (host, r.text)
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer s3cre"}).status_code == 401


@pytest.mark.parametrize("n", [1, 2])
def test_non_streaming_client_that_disconnects_is_cancelled(server, n, caplog):
    """Every choice is cancelled, and the reply the server gave up on logs nothing (an unretrieved error of
    the choices' gathering once filled the log, and a log nobody reads blocks the server)."""
    import gc

    base, app = server
    engine = app.state.camelid["engine"]
    before = engine.metrics.requests_cancelled
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0, "n": n}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        for _ in range(500):  # gone once it is generating
            if engine.running:
                break
            time.sleep(0.01)
    for _ in range(500):
        if engine.metrics.requests_cancelled >= before + n and engine.running == 0:
            break
        time.sleep(0.01)
    assert engine.metrics.requests_cancelled == before + n and engine.running == 0
    time.sleep(0.5)  # the handler returns
    gc.collect()
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]


def test_connections_whose_headers_never_finish_are_closed(monkeypatch):
    from camelid.serve import listen

    monkeypatch.setattr(listen, "HEADER_SECONDS", 0.5)
    with running_server(http=listen.HeaderTimeoutH11) as (base, _):
        wait_ready(base)
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
            s.settimeout(20)
            assert s.recv(100) == b""  # closed by the server
        assert httpx.get(f"{base}/health").status_code == 200  # complete requests are served as before


CHAT = {"messages": [{"role": "user", "content": "Once"}], "max_tokens": 3, "temperature": 0}
COMPLETION = {"prompt": "Once", "max_tokens": 3, "temperature": 0}


@pytest.mark.parametrize("path,extra,needle", [
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions: not supported"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias: not supported"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities: not supported"),
    ("/v1/chat/completions", {"store": True}, "store: not supported"),
    ("/v1/completions", {"suffix": "The end."}, "suffix: not supported"),
    ("/v1/completions", {"best_of": 3}, "best_of: not supported"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}, "extra": 1}},
     "response_format.extra"),
    ("/v1/completions", {"frobnicate": 1}, "frobnicate: not a field of the OpenAI API"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "mood": "happy"}]},
     "messages.0.mood: not a field"),
])
def test_fields_the_server_does_not_compute_are_refused_by_name_never_dropped(server, path, extra, needle):
    r = post(server[0], path, {**(CHAT if "chat" in path else COMPLETION), **extra})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_fields_that_change_nothing_pass_and_unknown_ones_pass_when_asked(server, lm):
    base = server[0]
    want = greedy(lm, "Once", 3)
    same = {"user": "u1", "metadata": {"k": "v"}, "response_format": {"type": "text"}, "logit_bias": {},
            "store": False}
    r = post(base, "/v1/completions", {**COMPLETION, **same})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
    r = post(base, "/v1/chat/completions", {**CHAT, **same, "tools": [], "parallel_tool_calls": True,
                                            "tool_choice": "none"})
    assert r.status_code == 200, r.text
    r = post(base, "/v1/completions", {**COMPLETION, "frobnicate": 1}, headers={"X-Camelid-Unknown-Fields": "ignore"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
    history = {"messages": [{"role": "user", "content": "Once"},
                            {"role": "assistant", "content": "", "tool_calls": [
                                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                            {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}]}
    assert post(base, "/v1/chat/completions", {**CHAT, **history}).status_code == 200


def test_echo_returns_the_prompt_as_sent_or_as_its_tokens_read(server, lm):
    base = server[0]
    want = greedy(lm, "Once", 3)
    assert post(base, "/v1/completions", {**COMPLETION, "echo": True}).json()["choices"][0]["text"] == "Once" + want
    ids = lm.tokenizer.encode("Once")
    text = post(base, "/v1/completions", {**COMPLETION, "prompt": ids, "echo": True}).json()["choices"][0]["text"]
    assert text == lm.tokenizer.decode(ids) + want
    with httpx.stream("POST", f"{base}/v1/completions", json={**COMPLETION, "echo": True, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Once" + want


def model_logprobs(lm, ids):
    """log-softmax of the model's logits at every position of ids (1, T) -> (T, vocab)."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids])).float(), -1)[0]


def test_completion_logprobs_are_the_models_and_add_up_to_the_text(server, lm):
    base = server[0]
    r = post(base, "/v1/completions", {**COMPLETION, "max_tokens": 6, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == 6
    prompt = lm.tokenizer.encode("Once")
    generated = generate(lm, ["Once"], 6, SamplingParams.greedy())[0].tokens
    ref = model_logprobs(lm, prompt + generated[:-1])[len(prompt) - 1:]
    for i, (t, got) in enumerate(zip(generated, lp["token_logprobs"])):
        assert got == pytest.approx(ref[i, t].item(), abs=1e-4)
        top = lp["top_logprobs"][i]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(got, abs=1e-6)  # greedy: the best is chosen
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(6)]


def test_echo_with_logprobs_scores_the_prompt_as_eval_does(server, lm):
    """What lm-eval's local-completions asks: echo, logprobs, the prompt's own tokens' log-probabilities."""
    from camelid.eval.loglikelihood import Request as LLRequest
    from camelid.eval.loglikelihood import encode_pair, loglikelihoods

    base = server[0]
    context, continuation = encode_pair(lm.tokenizer, "Once upon a time", " there was a dog")
    prompt = context + continuation
    r = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1,
                                       "temperature": 0})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(prompt)
    ref = model_logprobs(lm, prompt)
    for i in range(1, len(prompt)):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
    (ll, _), = loglikelihoods(lm, [LLRequest("Once upon a time", " there was a dog")], progress=False)
    assert sum(lp["token_logprobs"][len(context):]) == pytest.approx(ll, abs=1e-4)
    assert r.json()["choices"][0]["text"] == lm.tokenizer.decode(prompt)


def test_several_prompts_get_a_choice_each(server, lm):
    base = server[0]
    ids = lm.tokenizer.encode("The cat")
    r = post(base, "/v1/completions", {**COMPLETION, "prompt": ["Once", "Tom had"], "max_tokens": 4})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert [c["text"] for c in r.json()["choices"]] == [greedy(lm, "Once", 4), greedy(lm, "Tom had", 4)]
    r = post(base, "/v1/completions", {**COMPLETION, "prompt": [ids, ids], "max_tokens": 2})
    assert r.status_code == 200 and len({c["text"] for c in r.json()["choices"]}) == 1
    assert r.json()["usage"]["prompt_tokens"] == 2 * len(ids)


def test_chat_logprobs_streamed_and_whole_agree(server):
    base = server[0]
    body = {**CHAT, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    whole = post(base, "/v1/chat/completions", body).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == whole["message"]["content"]
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in content)
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"], abs=1e-6) for c in content)
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [c for ch in chunks for c in ((ch["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == content
    with httpx.stream("POST", f"{base}/v1/completions", json={**COMPLETION, "echo": True, "logprobs": 0,
                                                              "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens = [t for ch in chunks for t in ch["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for ch in chunks for o in ch["choices"][0]["logprobs"]["text_offset"]]
    text = "".join(ch["choices"][0]["text"] for ch in chunks)
    assert all(text[o:o + len(t)] == t for t, o in zip(tokens, offsets))


@pytest.mark.parametrize("path,extra,needle", [
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs: needs logprobs: true"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens: 0 needs echo: true"),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, "stream one prompt per request"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt.1: the prompt is empty"),
    ("/v1/completions", {"prompt": [[1, 2], [10 ** 6]]}, "prompt.1: token id out of the vocabulary"),
])
def test_bad_logprobs_and_prompt_lists_are_400s(server, path, extra, needle):
    r = post(server[0], path, {**(CHAT if "chat" in path else COMPLETION), **extra})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_lm_eval_local_completions_scores_the_server_as_camelid_eval_does(tmp_path, monkeypatch):
    """lm-evaluation-harness's own OpenAI client (`local-completions`: echo + logprobs) pointed at camelid serve,
    on a --limit slice of ARC-Easy and HellaSwag: every request's log-likelihood within 1e-4 of `camelid eval`
    on the same model, and the same accuracies."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from camelid.eval.harness import EvalSettings, evaluate
    from camelid.formats.load import export_hf

    from lm_eval_local import write_local_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    shots = {"arc_easy": 2, "hellaswag": 1}
    d, tasks = write_local_tasks(tmp_path / "eval", {**shots, "mmlu_abstract_algebra": 0, "truthfulqa_mc1": 0,
                                                     "truthfulqa_mc2": 0}, n_hellaswag=4)
    lm = load_model(MODEL)
    export_hf(lm, tmp_path / "hf")  # lm-eval counts context tokens with a transformers tokenizer
    ours, samples = evaluate(lm, EvalSettings(list(shots), str(d), shots=shots, batch_tokens=700))
    with running_server() as (base, _):
        wait_ready(base)
        args = (f"model=stories,base_url={base}/v1/completions,tokenizer={tmp_path / 'hf'},num_concurrent=1,"
                "max_retries=1,tokenized_requests=True,max_length=512")
        theirs = simple_evaluate(model="local-completions", model_args=args, tasks=[f"local_{t}" for t in shots],
                                 log_samples=True, task_manager=TaskManager(include_path=str(tasks)),
                                 num_fewshot=None)
    for task in shots:
        ref = sorted(theirs["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
        got = samples[task]
        assert len(ref) == len(got) > 0
        for r, g in zip(ref, got):
            for (ll, greedy), resp in zip(g["resps"], r["resps"]):
                assert float(resp[0][0]) == pytest.approx(ll, abs=1e-4), task
                assert resp[0][1] == greedy
        for key, value in ours["results"][task].items():
            if key.endswith(",none") and "stderr" not in key:
                assert theirs["results"][f"local_{task}"][key] == pytest.approx(value, abs=1e-6), (task, key)


def test_lm_eval_local_chat_completions_generates_what_camelid_generates(tmp_path, monkeypatch):
    """A generative task through lm-eval's `local-chat-completions` (its chat template applied, greedy, stop at
    a newline): every generation the server returns is what camelid's own greedy decoding of the same
    rendered messages gives."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from camelid.formats.load import export_hf
    from camelid.tokenizer.chat_template import render_chat, resolve_template

    from lm_eval_local import ARC, arc_rows, write_jsonl

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_jsonl(tmp_path / "qa.jsonl", arc_rows(ARC[:4]))
    task = tmp_path / "tasks" / "local_qa_gen"
    task.mkdir(parents=True)
    files = json.dumps({"data_files": {"test": str(tmp_path / "qa.jsonl")}})
    (task / "local_qa_gen.yaml").write_text(
        f"task: local_qa_gen\ndataset_path: json\ndataset_kwargs: {files}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{choices.text[0]}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 12\n"
        "metric_list:\n  - metric: exact_match\n")
    lm = load_model(MODEL)
    lm.template = "alpaca"
    export_hf(lm, tmp_path / "hf")
    with running_server(load=lambda: lm) as (base, _):
        wait_ready(base)
        args = (f"model=stories,base_url={base}/v1/chat/completions,tokenizer={tmp_path / 'hf'},num_concurrent=1,"
                "max_retries=1")
        theirs = simple_evaluate(model="local-chat-completions", model_args=args, tasks=["local_qa_gen"],
                                 log_samples=True, apply_chat_template=True,
                                 task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    template, stops = resolve_template("alpaca")
    samples = theirs["samples"]["local_qa_gen"]
    assert len(samples) == 4 and any(s["resps"][0][0].strip() for s in samples)
    for s in samples:
        args = s["arguments"]
        sent = args["gen_args_0"]["arg_0"] if isinstance(args, dict) else args[0][0]
        messages = json.loads(sent[0] if isinstance(sent, (tuple, list)) else sent)
        text = render_chat(template, messages, lm.tokenizer.special_tokens_map, add_generation_prompt=True)
        ours = generate(lm, [lm.tokenizer.encode(text, bos=False)], 12, SamplingParams.greedy(),
                        stop=["\n", *stops])[0].text
        assert s["resps"][0][0] == ours


def test_n_choices_share_one_prefill_and_seed_per_choice(server, lm):
    base, app = server
    model = app.state.camelid["engine"].model
    prefills = []
    hook = model.register_forward_pre_hook(lambda _m, args: prefills.append(args[0].shape[1]) if
                                           args[0].shape[1] > 1 else None)
    try:
        body = {**COMPLETION, "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3}
        r = post(base, "/v1/completions", body)
    finally:
        hook.remove()
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2] and len(prefills) == 1
    alone = [post(base, "/v1/completions", {**body, "n": 1, "seed": 11 + i}).json()["choices"][0]["text"]
             for i in range(3)]
    assert texts == alone and len(set(texts)) > 1  # choice i is the request seeded seed + i, from a copied cache
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(lm.tokenizer.encode("Once"))
    chat = post(base, "/v1/chat/completions", {**CHAT, "n": 2, "temperature": 0}).json()
    assert len(chat["choices"]) == 2 and chat["choices"][0]["message"] == chat["choices"][1]["message"]
    two = post(base, "/v1/completions", {**COMPLETION, "prompt": ["Once", "The cat"], "n": 2}).json()["choices"]
    assert [c["text"] for c in two] == [greedy(lm, "Once", 3)] * 2 + [greedy(lm, "The cat", 3)] * 2
    r = post(base, "/v1/completions", {**COMPLETION, "n": 500})
    assert r.status_code == 400 and "n: Input should be" in r.json()["error"]["message"], r.text
    for path, body in (("/v1/completions", {"max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3}),
                       ("/v1/chat/completions", {**CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 3})):
        body = {**(COMPLETION if "chat" not in path else {}), **body}
        whole = post(base, path, body).json()
        streamed = {}
        with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        for c in chunks[:-1]:  # the choices' chunks interleave, each with its index
            (choice,) = c["choices"]
            piece = choice["delta"].get("content") or "" if "delta" in choice else choice["text"]
            streamed[choice["index"]] = streamed.get(choice["index"], "") + piece
        texts = [c["message"]["content"] if "message" in c else c["text"] for c in whole["choices"]]
        assert [streamed[i] for i in range(3)] == texts
        assert chunks[-1]["usage"] == whole["usage"]
    r = post(base, "/v1/completions", {**COMPLETION, "n": 100})
    assert r.status_code == 400 and "n: at most" in r.json()["error"]["message"]
