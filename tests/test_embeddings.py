"""Embeddings: pooled final hidden states equal transformers' last_hidden_state pooled the same way (1e-4),
batched or alone; the server's /v1/embeddings in OpenAI's shape, with its bad input refused by name."""

import base64
import struct

import httpx
import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats import hf as hf_format
from camelid.formats.load import build_model
from camelid.generate.embed import embed

import test_serve
from conftest import make_hf_model
from test_serve import post

server, lm = test_serve.server, test_serve.lm  # the serve tests' fixtures: one server for the module

IDS = [[1, 5, 9, 20, 3], [7, 8], [4, 4, 4, 4, 4, 4, 4], [11]]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_pooled_hidden_states_equal_transformers(name, tmp_path):
    ref = make_hf_model(name, tmp_path)
    cfg, sd = hf_format.load_hf_folder(tmp_path)
    ours = build_model(cfg, sd, str(tmp_path))
    base = ref.base_model
    for pooling in ("mean", "last", "cls"):
        got = embed(ours, IDS, pooling, normalize=False, batch_size=3)  # a padded batch and a batch of one
        for row, ids in zip(got, IDS):
            with torch.no_grad():
                h = base(torch.tensor([ids])).last_hidden_state[0]
            want = {"mean": h.mean(0), "last": h[-1], "cls": h[0]}[pooling]
            torch.testing.assert_close(row, want, atol=1e-4, rtol=0)
    unit = embed(ours, IDS)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(IDS)))
    with pytest.raises(CamelidError, match="input 1: the text has no tokens"):
        embed(ours, [[1], []])
    with pytest.raises(CamelidError, match="pooling"):
        embed(ours, IDS, "max")


def test_embeddings_endpoint(server, lm):
    base = server[0]
    r = post(base, "/v1/embeddings", {"input": ["Once upon a time", "The cat"], "model": "stories"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    vectors = torch.tensor([d["embedding"] for d in body["data"]])
    want = embed(lm.model, [lm.tokenizer.encode("Once upon a time"), lm.tokenizer.encode("The cat")])
    torch.testing.assert_close(vectors, want, atol=1e-5, rtol=0)
    assert body["usage"]["prompt_tokens"] == sum(len(lm.tokenizer.encode(t)) for t in ("Once upon a time", "The cat"))
    one = post(base, "/v1/embeddings", {"input": lm.tokenizer.encode("The cat"), "encoding_format": "base64",
                                        "pooling": "last", "normalize": False}).json()["data"][0]["embedding"]
    raw = base64.b64decode(one)
    floats = torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw))
    torch.testing.assert_close(floats, embed(lm.model, [lm.tokenizer.encode("The cat")], "last", False)[0],
                               atol=1e-5, rtol=0)
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
    got = client.embeddings.create(model="stories", input="The cat").data[0].embedding
    torch.testing.assert_close(torch.tensor(got), want[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("body,needle", [
    ({"input": []}, "input: "),
    ({"input": ""}, "input: the text is empty"),
    ({"input": [[1], []]}, "input.1: the text has no tokens"),
    ({"input": [99999]}, "token id out of the vocabulary"),
    ({"input": "x", "pooling": "max"}, "pooling"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "x", "model": "gpt-9"}, "does not exist"),
    ({"input": "x" * 5000}, "more than the model's context"),
])
def test_embeddings_bad_input(server, body, needle):
    r = post(server[0], "/v1/embeddings", body)
    assert r.status_code in (400, 404) and needle in r.json()["error"]["message"], r.text
    assert httpx.get(f"{server[0]}/health").status_code == 200

