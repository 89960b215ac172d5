"""Tool-use data for fine-tuning: Glaive's function_call / observation turns and OpenAI tool messages read as
calls and results, masked so that the calls are trained and the results are not, rendered as `camelid serve`
renders the same conversation, and `camelid finetune` learning on them."""

import json

import pytest
from test_structured_output import template

from camelid.data.instruct import Skipped, load_conversations, to_conversation
from camelid.data.masking import IGNORE, mask_conversation
from camelid.formats.load import load_model
from camelid.train.config import FinetuneConfig
from camelid.train.finetune import finetune

from conftest import REPO, SHARED

GLAIVE = SHARED / "chat" / "glaive_toolcall_en_demo.json"
BASE = REPO / "models" / "stories260K"
CALL = {"name": "get_time", "arguments": {"zone": "UTC"}}
TOOLS = [{"name": "get_time", "description": "The time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def glaive():
    if not GLAIVE.exists():
        pytest.skip(f"{GLAIVE} is absent (../shared)")
    return GLAIVE


@pytest.fixture(scope="module")
def stories():
    return load_model(BASE)


def test_glaive_reads_whole_with_calls_and_results(glaive):
    skipped = Skipped()
    data = load_conversations(glaive, skipped=skipped)
    assert len(data) == 300 and not skipped.reasons
    calls = [m for _, c in data for m in c if m.get("tool_calls")]
    results = [m for _, c in data for m in c if m["role"] == "tool"]
    assert len(calls) == len(results) == 211
    assert all(isinstance(m["tool_calls"][0]["function"]["arguments"], dict) for m in calls)
    assert sum("tools" in c[0] for _, c in data) == 191


@pytest.mark.parametrize("record,needle", [
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{oops"}]},
     "not JSON"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "42"},
                        {"from": "gpt", "value": "y"}]}, "must follow a call"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tools": "[{"},
     "'tools' is not JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "a tool call needs a name"),
])
def test_bad_tool_records_are_refused_with_the_reason(record, needle):
    with pytest.raises(ValueError, match=needle):
        to_conversation(record)


def conversation():
    return to_conversation({"messages": [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                             "function": {**CALL, "arguments": json.dumps(CALL["arguments"])}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."}], "tools": TOOLS})


@pytest.mark.parametrize("name,call_text", [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'),
    ("chatml", '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}'),
])
def test_calls_are_trained_results_are_not_and_the_prompt_is_the_servers(name, call_text, stories):
    source = name if name == "chatml" else template(name)
    tok = stories.tokenizer
    sample = mask_conversation(tok, source, conversation())[0]
    trained = tok.decode([t for t, label in zip(sample.ids, sample.labels) if label != IGNORE])
    assert call_text in trained and "It is noon." in trained and "12:00" not in trained
    masked = tok.decode([t for t, label in zip(sample.ids, sample.labels) if label == IGNORE])
    assert "12:00" in masked and "get_time" in masked  # the tools' description and the result are context
    # what the server renders for the conversation up to the call is the sample's prompt, token for token
    from camelid.formats.loaded import LoadedModel

    from test_serve import post, running_server, wait_ready

    lm = LoadedModel(stories.model, tok, template=source)
    with running_server(lambda: lm) as (base, _):
        wait_ready(base)
        r = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "What time is it?"}],
                                                "tools": [{"type": "function", "function": TOOLS[0]}],
                                                "max_tokens": 1})
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    first_trained = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
    assert prompt_tokens == first_trained


def test_finetune_learns_the_calls_of_glaive(glaive, tmp_path):
    cfg = FinetuneConfig(base=str(BASE), data=str(glaive), template="chatml", max_len=256, micro_batch=4,
                         grad_accum=1, lr=3e-3, out_dir=str(tmp_path / "run"), log_every=1, eval_every=1000,
                         ckpt_every=1000, val_fraction=0.0, threads=2, seed=1, method="full", epochs=0.4)
    finetune(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.5, losses
