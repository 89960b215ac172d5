"""Several models behind one server (loaded on first use, the least recently used idle one unloaded) and LoRA
adapters served per request: rows of one batch apply different adapters, each reply equal to the reply of
the adapter merged into the model, decoded alone."""

import copy
import threading

import httpx
import pytest
import torch

from camelid.formats.load import load_model
from camelid.formats.peft import load_adapter, save_adapter
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams
from camelid.model.lora import LoRAConfig, add_lora, lora_layers, merge_lora
from camelid.serve.app import ServerConfig, create_app
from camelid.serve.models import Served

from test_serve import MODEL, post, wait_ready

PROMPTS = ["Once upon a time", "Tom had a big dog", "The sun was hot"]


def serve(served, **config):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(served, ServerConfig(served[0].name, max_batch=4, **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{port}", app


def stop(server, thread):
    server.should_exit = True
    thread.join(timeout=10)


def complete(base, model, prompt, n=8):
    r = post(base, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def greedy(lm, prompt, n=8):
    return generate(lm, [prompt], n, SamplingParams.greedy())[0].text


def test_several_models_load_on_first_use_and_the_idle_lru_one_is_unloaded():
    server, thread, base, app = serve([Served("a", lambda: load_model(MODEL)), Served("b", lambda: load_model(MODEL))],
                                      max_models=1)
    try:
        wait_ready(base)
        pool = app.state.camelid["pool"]
        listed = httpx.get(f"{base}/v1/models").json()["data"]
        assert [(m["id"], m["loaded"]) for m in listed] == [("a", True), ("b", False)]
        want = greedy(load_model(MODEL), "Once")
        assert complete(base, "b", "Once") == want  # b loads, a (idle) is unloaded: one model at a time
        assert [m.name for m in pool.loaded()] == ["b"]
        assert complete(base, "", "Once") == want and [m.name for m in pool.loaded()] == ["a"]
        r = post(base, "/v1/completions", {"model": "c", "prompt": "x"})
        assert r.status_code == 404 and "'a', 'b'" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "model"
        r = post(base, "/v1/chat/completions", {"model": "b", "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "b"
    finally:
        stop(server, thread)


def test_a_model_that_fails_to_load_is_a_503_for_its_requests_only():
    def broken():
        raise RuntimeError("weights are gone")

    server, thread, base, _ = serve([Served("a", lambda: load_model(MODEL)), Served("bad", broken)])
    try:
        wait_ready(base)
        r = post(base, "/v1/completions", {"model": "bad", "prompt": "x"})
        assert r.status_code == 503 and "weights are gone" in r.json()["error"]["message"], r.text
        assert complete(base, "a", "Once")
        assert httpx.get(f"{base}/health").status_code == 200
    finally:
        stop(server, thread)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two random LoRA adapters of stories260K (different ranks and targets), saved as PEFT folders."""
    out = []
    for i, (rank, targets) in enumerate(((4, ["q_proj", "v_proj"]), (8, ["o_proj", "down_proj"]))):
        lm = load_model(MODEL)
        add_lora(lm.model, LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=targets))
        torch.manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(lm.model).values():
                for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                    p.normal_(0, 0.3)
        folder = tmp_path_factory.mktemp(f"adapter{i}")
        save_adapter(lm.model, folder)
        out.append(folder)
    return out


def test_requests_for_different_adapters_decode_in_one_batch(adapters):
    served = [Served("stories", lambda: load_model(MODEL), [("one", str(adapters[0])), ("two", str(adapters[1]))])]
    merged = {"stories": load_model(MODEL)}
    for name, folder in (("one", adapters[0]), ("two", adapters[1])):
        merged[name] = load_model(MODEL)
        merge_lora(load_adapter(merged[name].model, folder))
    want = {(m, p): greedy(merged[m], p) for m in merged for p in PROMPTS}
    assert want[("one", PROMPTS[0])] != want[("stories", PROMPTS[0])] != want[("two", PROMPTS[0])]
    server, thread, base, app = serve(served)
    try:
        wait_ready(base)
        engine = app.state.camelid["engine"]
        steps = []
        original = engine.decode

        def counting(tokens, *rest):
            steps.append(tokens.shape[0])
            return original(tokens, *rest)

        engine.decode = counting
        jobs = [(m, p) for p in PROMPTS for m in ("stories", "one", "two")]
        got = {}

        def run(job):
            got[job] = complete(base, *job)

        threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == want
        assert max(steps) > 1  # rows of different adapters shared decode steps
        listed = {m["id"]: m["parent"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
        assert listed == {"stories": None, "one": "stories", "two": "stories"}
        emb = post(base, "/v1/embeddings", {"model": "one", "input": "The cat"}).json()["data"][0]["embedding"]
        base_emb = post(base, "/v1/embeddings", {"input": "The cat"}).json()["data"][0]["embedding"]
        assert emb != base_emb
    finally:
        stop(server, thread)


def test_an_adapter_for_another_base_fails_the_load_with_its_reason(adapters, tmp_path):
    from conftest import make_hf_model

    make_hf_model("llama", tmp_path / "other")
    from camelid.formats import hf as hf_format
    from camelid.formats.load import build_model

    cfg, sd = hf_format.load_hf_folder(tmp_path / "other")
    other = build_model(cfg, sd, str(tmp_path / "other"))
    stories = load_model(MODEL)
    lm = copy.copy(stories)
    lm.model = other
    server, thread, base, app = serve([Served("x", lambda: lm, [("one", str(adapters[0]))])])
    try:
        for _ in range(300):
            if app.state.camelid["loaded"].is_set():
                break
            threading.Event().wait(0.05)
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and "different base model" in health.json()["error"]
    finally:
        stop(server, thread)


def test_serve_reads_names_paths_and_folders_of_models(tmp_path):
    import argparse
    import shutil

    from camelid.cli import _served_models
    from camelid.errors import CamelidError

    shutil.copytree(MODEL, tmp_path / "zoo" / "small")
    shutil.copytree(MODEL, tmp_path / "zoo" / "tiny")
    (tmp_path / "zoo" / "notes.txt").write_text("not a model")
    args = argparse.Namespace(model=str(MODEL), more_models=[f"alt={MODEL}", str(tmp_path / "zoo")], name=None)
    assert [n for n, _ in _served_models(args)] == ["stories260K", "alt", "small", "tiny"]
    args.name = "main"
    assert _served_models(args)[0] == ("main", str(MODEL))
    (tmp_path / "empty").mkdir()
    for bad, needle in ((str(tmp_path / "empty"), "neither a model nor a folder of models"),
                        (str(tmp_path / "nowhere"), "no such file")):
        with pytest.raises(CamelidError, match=needle):
            _served_models(argparse.Namespace(model=bad, more_models=[], name=None))


def test_adapters_load_and_unload_at_run_time(adapters, tmp_path):
    server, thread, base, app = serve([Served("stories", lambda: load_model(MODEL))], allow_adapter_loading=True)
    try:
        wait_ready(base)
        plain = complete(base, "stories", PROMPTS[0])
        r = post(base, "/v1/load_lora_adapter", {"lora_name": "one", "lora_path": str(adapters[0])})
        assert r.status_code == 200, r.text
        merged = load_model(MODEL)
        merge_lora(load_adapter(merged.model, adapters[0]))
        assert complete(base, "one", PROMPTS[0]) == greedy(merged, PROMPTS[0]) != plain
        assert complete(base, "stories", PROMPTS[0]) == plain
        lm = load_model(MODEL)  # an adapter whose matrices fit another base
        add_lora(lm.model, LoRAConfig(rank=4, targets=["q_proj"]))
        foreign = tmp_path / "foreign"
        save_adapter(lm.model, foreign)
        config = foreign / "adapter_model.safetensors"
        from safetensors.torch import load_file, save_file

        tensors = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in load_file(str(config)).items()}
        save_file(tensors, str(config))
        for body, status, needle in (
                ({"lora_name": "one", "lora_path": str(adapters[1])}, 400, "already served"),
                ({"lora_name": "bad", "lora_path": str(tmp_path / "none")}, 400, "no such adapter folder"),
                ({"lora_name": "bad", "lora_path": str(tmp_path)}, 400, "not a PEFT adapter folder"),
                ({"lora_name": "bad", "lora_path": str(foreign)}, 400, "different base model")):
            r = post(base, "/v1/load_lora_adapter", body)
            assert r.status_code == status and needle in r.json()["error"]["message"], r.text
        assert complete(base, "one", PROMPTS[0]) == greedy(merged, PROMPTS[0])  # the failed loads left nothing
        assert complete(base, "stories", PROMPTS[0]) == plain
        assert post(base, "/v1/unload_lora_adapter", {"lora_name": "one"}).status_code == 200
        assert post(base, "/v1/completions", {"model": "one", "prompt": "x"}).status_code == 404
        assert post(base, "/v1/unload_lora_adapter", {"lora_name": "one"}).status_code == 404
    finally:
        stop(server, thread)
    server, thread, base, app = serve([Served("stories", lambda: load_model(MODEL))])
    try:
        wait_ready(base)
        r = post(base, "/v1/load_lora_adapter", {"lora_name": "one", "lora_path": str(adapters[0])})
        assert r.status_code == 403 and "--allow-adapter-loading" in r.json()["error"]["message"]
    finally:
        stop(server, thread)


def test_an_adapter_in_use_is_not_unloaded(adapters):
    import time

    from camelid.serve.engine import Request

    served = [Served("stories", lambda: load_model(MODEL), [("one", str(adapters[0]))])]
    server, thread, base, app = serve(served, allow_adapter_loading=True)
    try:
        wait_ready(base)
        engine = app.state.camelid["engine"]
        # a request of adapter 1 whose consumer is slow (20 ms an event), so it is mid-decode for seconds
        engine.submit(Request([1], SamplingParams.greedy(), 400, [], emit=lambda *_: time.sleep(0.02), adapter=1))
        for _ in range(3000):
            if engine.running == 1:
                break
            time.sleep(0.01)
        r = post(base, "/v1/unload_lora_adapter", {"lora_name": "one"})
        assert r.status_code == 409 and "running" in r.json()["error"]["message"], r.text
        assert "one" in {m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
    finally:
        stop(server, thread)
