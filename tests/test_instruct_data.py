"""Instruction data: the four formats, conversion, token-level loss masks, Vicuna splitting, show-mask."""

import json
import subprocess
import sys

import pytest

from camelid.data.instruct import Skipped, convert, load_conversations, read_conversations
from camelid.data.masking import IGNORE, MaskStats, mask_conversation, show_mask
from camelid.errors import CamelidError
from camelid.tokenizer.chat_template import render_chat
from camelid.tokenizer.tokenizer import load_tokenizer_file

from conftest import SHARED

TOKENIZERS = {"llama2-sentencepiece": SHARED / "tokenizers" / "llama2_tokenizer.model",
              "gpt2-bpe": SHARED / "tokenizers" / "gpt2_tokenizer.json"}
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And a number?"}, {"role": "assistant", "content": "Forty-two, naturally."}]


def test_reads_the_shared_datasets():
    alpaca = load_conversations(SHARED / "instruct" / "alpaca_5000.json")
    assert len(alpaca) == 4998  # two records have an empty output, reported and skipped
    where, first = alpaca[0]
    assert where.endswith("alpaca_5000.json:1 (record 1)") and first[0]["input"].startswith("Sentence 1")
    sharegpt = load_conversations(SHARED / "chat" / "sharegpt_dummy_conversation.json")
    assert len(sharegpt) == 500 and sharegpt[0][1][0] == {"role": "user", "content": "Who are you?"}
    messages = load_conversations(SHARED / "chat" / "messages_sft_demo.jsonl")  # content given as text parts
    assert messages[0][1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": messages[0][1][1]["content"]}]
    assert messages[0][1][1]["content"].startswith("Hello! I am")


def test_malformed_records_are_reported_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "mixed.json"
    path.write_text('[\n{"instruction": "Say hi", "output": "Hi"},\n{"instruction": "No answer"},\n'
                    '{"instruction": "x", "context": "c", "response": "Dolly"},\n'
                    '{"conversations": [{"from": "robot", "value": "?"}]},\n'
                    '{"messages": [{"role": "assistant", "content": "first"}]}\n]')
    skipped = Skipped()
    got = list(read_conversations(path, skipped=skipped))
    assert [w for w, _ in got] == [f"{path}:2 (record 1)", f"{path}:4 (record 3)"]
    assert got[1][1][0] == {"role": "user", "content": "x", "input": "c"}  # Dolly's context is Alpaca's input
    assert skipped.total == 3
    err = capsys.readouterr().err
    assert f"skipping {path}:3 (record 2): missing field 'output'" in err
    assert f"{path}:5 (record 4): conversations[0] has no known 'from'" in err
    assert f"{path}:6 (record 5): turns must alternate" in err
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{not json\n')
    with pytest.raises(CamelidError, match="bad.jsonl:2: invalid JSON"):
        load_conversations(tmp_path / "bad.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(CamelidError, match="empty.json: no usable records"):
        load_conversations(tmp_path / "empty.json")


def test_convert_round_trips_and_refuses_what_a_format_cannot_hold(tmp_path):
    src = SHARED / "instruct" / "alpaca_en_demo.json"
    assert convert(src, tmp_path / "m.jsonl", "messages")["written"] == 999
    assert convert(tmp_path / "m.jsonl", tmp_path / "s.json", "sharegpt")["written"] == 999
    original = json.loads(src.read_text())
    # Through messages the input travels inside the user turn, as Alpaca's own data writes it.
    back = json.loads((tmp_path / "s.json").read_text())
    assert back[0]["conversations"][1]["value"] == original[0]["output"]
    convert(src, tmp_path / "a.json", "alpaca")
    assert json.loads((tmp_path / "a.json").read_text()) == [
        {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in original]
    result = convert(SHARED / "chat" / "sharegpt_dummy_conversation.json", tmp_path / "d.json", "dolly")
    assert result["written"] < 500 and "turns do not fit the single-turn dolly format" in " ".join(result["skipped"])


@pytest.mark.parametrize("tokenizer_name", list(TOKENIZERS))
@pytest.mark.parametrize("template", ["alpaca", "vicuna", "llama2", "chatml"])
def test_mask_token_by_token(tokenizer_name, template):
    tok = load_tokenizer_file(TOKENIZERS[tokenizer_name])
    conversation = CONVERSATION[1:] if template == "alpaca" else CONVERSATION
    stats = MaskStats()
    [sample] = mask_conversation(tok, template, conversation, stats=stats)
    specials = tok.special_tokens_map
    full = render_chat(template, conversation, specials, add_generation_prompt=False)
    # The tokens are exactly the whole conversation's tokenization (what inference would see)...
    assert stats.boundary_merges == 0 and sample.ids == tok.encode(full, bos=False)
    # ...the first prompt is exactly what `camelid chat` feeds before the first reply...
    first_trained = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
    prompt = render_chat(template, conversation[:-3], specials, add_generation_prompt=True)
    assert sample.ids[:first_trained] == tok.encode(prompt, bos=False)
    # ...and the trained tokens, run by run, are each reply and its end of turn, nothing else.
    runs, run = [], []
    for tid, label in zip(sample.ids, sample.labels):
        if label != IGNORE:
            assert label == tid
            run.append(tid)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    end = {"alpaca": specials["eos_token"], "vicuna": specials["eos_token"], "llama2": specials["eos_token"],
           "chatml": "<|im_end|>"}[template]
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert len(runs) == 2
    for reply, run in zip(replies, runs):
        text = "".join(tok.special_text(t) if t in tok.eos_ids else tok.decode([t]) for t in run)
        assert reply.split(",")[0] in text and end in text
        assert tok.eos_ids[0] in run or template == "chatml"


def test_train_on_prompt_and_long_conversations_split_between_turns():
    tok = load_tokenizer_file(TOKENIZERS["llama2-sentencepiece"])
    [whole] = mask_conversation(tok, "vicuna", CONVERSATION, train_on_prompt=True)
    assert all(label != IGNORE for label in whole.labels)
    long = CONVERSATION[:1] + [{"role": "user", "content": f"Question {i}?"} if j == 0 else
                               {"role": "assistant", "content": f"Answer number {i}."}
                               for i in range(12) for j in range(2)]
    stats = MaskStats()
    pieces = mask_conversation(tok, "vicuna", long, max_len=60, stats=stats)
    assert len(pieces) > 2 and stats.truncated == 0
    assert all(len(p.ids) <= 60 and p.ids[0] == tok.bos_id for p in pieces)
    text = "".join(show_mask(tok, p, colour=False) for p in pieces)
    for i in range(12):  # every answer is trained exactly once, each piece keeps the system prompt
        assert text.count(f"Answer number {i}.") == 1
    assert text.count("SYSTEM") == 0 and text.count("You are terse.") == len(pieces)
    [cut] = mask_conversation(tok, "vicuna", [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "word " * 200}], max_len=50)
    assert cut.truncated and len(cut.ids) == 50


def test_show_mask_cli(tmp_path):
    run = [sys.executable, "-m", "camelid", "data", "show-mask", str(SHARED / "instruct" / "alpaca_en_demo.json"),
           "--template", "alpaca", "--tokenizer", str(TOKENIZERS["llama2-sentencepiece"]), "--samples", "1",
           "--max-len", "1024"]
    ok = subprocess.run(run, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "### Response:⟦" in ok.stdout and "</s>⟧" in ok.stdout
    assert "999 samples -> 999 training sequences of at most 1024 tokens" in ok.stdout
    bad = subprocess.run(run[:-1] + ["4"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "camelid: error: --max-len must be at least 8"
    bad = subprocess.run(run[:7] + ["nonsense"] + run[8:], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown chat template 'nonsense'" in bad.stderr


def test_search_and_the_datasette_saved_query(tmp_path, monkeypatch):
    import asyncio

    from datasette.app import Datasette

    from camelid.data.explore import build_db, datasette_metadata, search

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = SHARED / "instruct" / "alpaca_5000.json"
    hits = search(data, "haiku", limit=50)
    assert hits and all("haiku" in (h["instruction"] + h["input"] + h["output"]).lower() for h in hits)
    like = search(data, "capital of France", limit=100, substring=True)
    assert like and all("capital of france" in (h["instruction"] + " " + h["input"] + " " + h["output"]).lower()
                        for h in like)
    with pytest.raises(CamelidError, match="search query '\"open': unterminated string"):
        search(data, '"open')
    db = build_db(data)
    assert db.parent == tmp_path / "cache" / "camelid" / "data" and build_db(data) == db  # cached

    async def saved_query():
        ds = Datasette([str(db)], metadata=datasette_metadata(db))
        response = await ds.client.get(f"/{db.stem}/search.json?search=capital+of+France&_shape=array")
        return response.status_code, response.json()

    status, rows = asyncio.run(saved_query())
    assert status == 200 and [r["id"] for r in rows] == [h["id"] for h in like]
