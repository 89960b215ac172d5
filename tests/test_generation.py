"""Sampling semantics, stop handling, streaming and the context policy."""

import io

import pytest
import torch

from camelid.chat.repl import chat_loop
from camelid.errors import CamelidError
from camelid.formats.load import load_model
from camelid.generate.generate import Completion, StopStrings, generate, stream
from camelid.generate.sampling import SamplingParams, apply_penalties, sample

from conftest import REPO


@pytest.fixture(scope="module")
def lm():
    return load_model(REPO / "models" / "stories260K")


def test_repeat_penalty_follows_llama_cpp():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(logits, [[0, 1, 1]], SamplingParams(repeat_penalty=2.0))
    # positive logits are divided, negative ones multiplied, each seen token once however often it appeared
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    out = apply_penalties(logits, [[0, 1, 1]], SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    assert out.tolist() == [[1.25, -3.25, 1.0, 0.5]]


def test_truncation_samplers():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = lambda p: {sample(logits, p, [[]], gen).item() for _ in range(300)}  # noqa: E731
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert draws(SamplingParams(**{**base, "top_k": 2})) == {0, 1}
    assert draws(SamplingParams(**{**base, "top_p": 0.8})) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draws(SamplingParams(**{**base, "top_p": 0.81})) == {0, 1, 2}
    assert draws(SamplingParams(**{**base, "min_p": 0.25})) == {0, 1, 2}  # 0.15 >= 0.25 * 0.5
    assert draws(SamplingParams(**{**base, "min_p": 0.31})) == {0, 1}
    assert draws(SamplingParams(temperature=0)) == {0}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=1.5), dict(top_p=0), dict(top_k=-1),
                                 dict(min_p=2), dict(repeat_penalty=0)])
def test_invalid_sampling_parameters(bad):
    with pytest.raises(CamelidError, match="invalid sampling parameter"):
        SamplingParams(**bad)


def test_seed_reproducible_and_top_k_1_is_greedy(lm):
    p = SamplingParams(temperature=1.0, seed=42)
    a = generate(lm, ["Once upon a time"], 30, p)[0].text
    assert a == generate(lm, ["Once upon a time"], 30, p)[0].text
    assert a != generate(lm, ["Once upon a time"], 30, SamplingParams(temperature=1.0, seed=43))[0].text
    greedy = generate(lm, ["Once upon a time"], 30, SamplingParams.greedy())[0].text
    assert generate(lm, ["Once upon a time"], 30, SamplingParams(temperature=1.0, top_k=1, seed=1))[0].text == greedy


def test_stop_strings_end_generation_and_are_not_shown(lm):
    full = generate(lm, ["Once upon a time"], 60, SamplingParams.greedy())[0]
    assert "Lily" in full.text and full.finish_reason == "length"
    cut = generate(lm, ["Once upon a time"], 60, SamplingParams.greedy(), stop=["Lily"])[0]
    assert cut.text == full.text[:full.text.index("Lily")] and cut.finish_reason == "stop"
    pieces = list(stream(lm, "Once upon a time", 60, SamplingParams.greedy(), stop=["Lily"]))
    assert "".join(pieces) == cut.text


def test_stop_string_split_across_tokens_is_held_back():
    s = StopStrings(["</answer>"])
    assert s.push("yes </ans") == ("yes ", False)
    assert s.push("wer> more") == ("", True)
    s = StopStrings(["###"])
    assert s.push("a #") == ("a ", False)
    assert s.push("b") == ("#b", False)


def test_eos_stops_and_streaming_matches_batch(lm):
    # stories260K ends a story with BOS (id 1), which llama2.c treats as end of text.
    completion = Completion()
    text = "".join(stream(lm, "The end.", 400, SamplingParams(temperature=1.0, seed=0), completion=completion))
    assert text == completion.text
    assert completion.finish_reason in ("stop", "length")
    batch = generate(lm, ["Once upon a time", "Tom had a dog", "The sun"], 40, SamplingParams.greedy())
    single = [generate(lm, [p], 40, SamplingParams.greedy())[0].text for p in ["Once upon a time", "Tom had a dog",
                                                                                "The sun"]]
    assert [c.text for c in batch] == single


def test_context_policy(lm):
    long_prompt = "Once upon a time " * 200
    with pytest.raises(CamelidError, match="the model's context is 512"):
        generate(lm, [long_prompt], 10, SamplingParams.greedy())
    # Generation stops at the context end, reported as "length", never by dropping prompt tokens.
    ids = lm.tokenizer.encode("Once upon a time " * 100)
    c = generate(lm, [ids], 1000, SamplingParams(temperature=1.0, seed=0))[0]
    assert len(ids) + len(c.tokens) <= 512


def test_chat_repl_keeps_history_and_commands(lm):
    lines = iter(["Hello", "/system Tell short stories.", "Tell me more", "/reset", "/bogus", "/exit"])
    out = io.StringIO()
    seen = []
    original = lm.tokenizer.encode

    def spy(text, bos=None):
        seen.append(text)
        return original(text, bos)

    lm.tokenizer.encode = spy
    try:
        chat_loop(lm, SamplingParams(temperature=0.0), 20, template="chatml", read=lambda _: next(lines), out=out)
    finally:
        lm.tokenizer.encode = original
    text = out.getvalue()
    assert "(system prompt set)" in text and "(conversation cleared)" in text and "unknown command /bogus" in text
    assert text.count("prompt tokens cached]") == 2  # the second turn finds the first in the KV session
    second = [s for s in seen if "Tell me more" in s][0]
    assert second.startswith("<|im_start|>system\nTell short stories.<|im_end|>")
    assert "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n" in second
