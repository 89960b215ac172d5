"""Speculative decoding: greedy output token for token equal to plain decoding, with prompt lookup and with a
draft model; with sampling, the joint distribution of the first tokens equals the model's own, computed
exactly, for both drafters (a chi-square test over thousands of seeded draws)."""


import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats.load import load_model
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams, distribution
from camelid.generate.speculative import DraftModel, PromptLookup, Speculation, speculative_tokens
from camelid.model.config import ModelConfig
from camelid.model.transformer import Transformer

from conftest import REPO

MODEL = REPO / "models" / "stories260K"
REPEAT = ("Once upon a time there was a little girl named Lily. She loved to play outside in the sun. "
          "Once upon a time there was a little")


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def tiny(seed, vocab=6):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, max_seq_len=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
    return model


@pytest.mark.parametrize("drafter", ["lookup", "draft-model", "random-draft"])
def test_greedy_output_is_plain_greedy_token_for_token(lm, drafter):
    g = SamplingParams(temperature=0.0, repeat_penalty=1.3)  # penalties follow the accepted history too
    for prompt in (REPEAT, "Tom had a big dog"):
        plain = generate(lm, [prompt], 120, g)[0]
        make = {"lookup": lambda: PromptLookup(3),
                "draft-model": lambda: DraftModel(load_model(MODEL).model, lm.config.vocab_size, g),
                "random-draft": lambda: DraftModel(_random_like(lm.model), lm.config.vocab_size, g)}[drafter]
        spec = Speculation(make(), 4)
        fast = generate(lm, [prompt], 120, g, speculation=spec)[0]
        assert fast.tokens == plain.tokens and fast.text == plain.text and fast.finish_reason == plain.finish_reason
        assert spec.stats.rounds < len(plain.tokens) or drafter == "random-draft"


def _random_like(model):
    torch.manual_seed(5)
    other = Transformer(ModelConfig(**{**model.cfg.__dict__, "n_layers": 1})).eval()
    return other


@pytest.mark.parametrize("drafter", ["lookup", "draft-model"])
def test_sampled_output_has_the_models_own_distribution(drafter):
    target, params = tiny(0), SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    prompt = [1, 2, 1, 2, 1]  # repeats, so prompt lookup drafts
    with torch.no_grad():  # the exact joint distribution of the first two tokens
        first = distribution(target(torch.tensor([prompt]))[:, -1], params, [prompt])[0]
        exact = {}
        for a in range(6):
            second = distribution(target(torch.tensor([prompt + [a]]))[:, -1], params, [prompt + [a]])[0]
            for b in range(6):
                exact[(a, b)] = float(first[a] * second[b])
    counts = dict.fromkeys(exact, 0)
    draft_model = tiny(1)
    trials = 3000
    for seed in range(trials):
        p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        maker = PromptLookup(2) if drafter == "lookup" else DraftModel(draft_model, 6, p, seed=10_000 + seed)
        out = [t[0] for t in speculative_tokens(target, prompt, 2, p, maker, draft_tokens=2)]
        counts[tuple(out)] += 1
    chi2 = sum((counts[o] - trials * q) ** 2 / (trials * q) for o, q in exact.items() if trials * q >= 5)
    dof = sum(trials * q >= 5 for q in exact.values()) - 1
    # the 0.999 quantile of chi-square is below dof + 4.5 sqrt(2 dof) for these degrees of freedom
    assert chi2 < dof + 4.5 * (2 * dof) ** 0.5, (chi2, dof)


def test_a_biased_acceptance_would_be_caught():
    """The test above can fail: accepting every draft token (no rejection) moves the distribution."""
    target, params = tiny(0), SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    prompt = [1, 2, 1, 2, 1]
    with torch.no_grad():
        first = distribution(target(torch.tensor([prompt]))[:, -1], params, [prompt])[0]
    drafted = PromptLookup(2).propose(prompt, 1)[0][0]  # lookup always proposes this token first
    assert float(first[drafted]) < 0.9  # so always accepting it would be far from the model's distribution


def test_prompt_lookup_and_draft_model_settings():
    lookup = PromptLookup(3)
    assert lookup.propose([5, 6, 7, 8, 5, 6, 7], 2) == ([8, 5], [None, None])
    assert lookup.propose([1, 2, 3], 2) == ([], [])
    with pytest.raises(CamelidError, match="same tokenizer"):
        DraftModel(tiny(0, vocab=7), 6, SamplingParams())
    with pytest.raises(CamelidError, match="n_min"):
        PromptLookup(1, 2)


def test_generate_cli_speculates_and_reports(tmp_path, capsys):
    from camelid.cli import main

    base = ["generate", str(MODEL), REPEAT, "-n", "60", "--temperature", "0"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--lookup"], ["--draft", str(MODEL)]):
        assert main(base + extra + ["--stats"]) == 0
        run = capsys.readouterr()
        assert run.out == plain
        assert "accepted" in run.err
    assert main(base + ["--lookup", "--json-schema", '{"type": "object"}']) == 1
    assert "speculative decoding" in capsys.readouterr().err
