"""Perplexity: lm-eval's rolling windows exactly, log-likelihoods against transformers, llama.cpp's chunks."""

import math
import random
import subprocess
import sys

import pytest
import torch

from camelid.eval.perplexity import document_loglikelihood, harness_perplexity, llamacpp_perplexity, rolling_windows
from camelid.formats.load import export_hf, load_model

from conftest import REPO


@pytest.fixture(scope="module")
def text(shakespeare):
    return shakespeare[:1500]


def test_windows_match_lm_eval_and_predict_every_token_once():
    # The reference table of lm-eval's get_rolling_token_windows + make_disjoint_window (max_length 4).
    assert rolling_windows(list(range(10)), 99, 4) == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]),
                                                       ([5, 6, 7], [8, 9])]
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(100) for _ in range(rng.randint(1, 40))]
        max_len = rng.randint(1, 12)
        windows = rolling_windows(tokens, 999, max_len)
        assert [t for _, t in windows for t in t] == tokens
        assert all(len(c) + len(t) - 1 <= max_len for c, t in windows)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers as tf

    lm = load_model(REPO / "models" / "stories260K")
    folder = tmp_path_factory.mktemp("hf")
    export_hf(lm, folder)
    return lm, tf.AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_document_loglikelihood_equals_transformers(models, text):
    lm, hf = models
    tokens = lm.tokenizer.encode(text[:400], bos=False)
    ll, n = document_loglikelihood(lm, text[:400])
    ids = [lm.tokenizer.bos_id] + tokens
    ref = hf_logprobs(hf, ids[:-1]).gather(-1, torch.tensor(tokens)[:, None]).sum().item()
    assert n == len(tokens) and ll == pytest.approx(ref, abs=1e-3)
    metrics = harness_perplexity(lm, [text[:400], text[400:900]], max_len=32)
    assert metrics["documents"] == 2 and metrics["bits_per_byte"] == pytest.approx(
        math.log2(metrics["byte_perplexity"]), rel=1e-9)


def test_llamacpp_protocol_equals_transformers_on_its_chunks(models, text):
    lm, hf = models
    result = llamacpp_perplexity(lm, text, n_ctx=64)
    tokens = lm.tokenizer.encode(text, bos=True)
    chunks = len(tokens) // 64
    assert result["chunks"] == chunks and result["tokens_scored"] == chunks * 31
    nll = []
    for i in range(chunks):
        chunk = [lm.tokenizer.bos_id] + tokens[i * 64 + 1:(i + 1) * 64]
        lp = hf_logprobs(hf, chunk)
        nll += [-lp[j - 1, chunk[j]].item() for j in range(33, 64)]
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_eval_cli(tmp_path, text):
    (tmp_path / "doc.txt").write_text(text[:300])
    run = [sys.executable, "-m", "camelid", "eval", str(REPO / "models" / "stories260K"), "--data",
           str(tmp_path / "doc.txt")]
    ok = subprocess.run(run + ["--tasks", "perplexity", "--output", str(tmp_path / "r.json")], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    import json

    results = json.loads((tmp_path / "r.json").read_text())
    assert results["results"]["perplexity"]["word_perplexity,none"] > 1
    bad = subprocess.run(run + ["--tasks", "hellawsag"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown task 'hellawsag' (available: perplexity, arc_easy" in bad.stderr
    assert "Traceback" not in bad.stderr
