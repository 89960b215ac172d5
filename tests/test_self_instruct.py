"""Self-Instruct: Alpaca's prompt, parsing and filters, against a stub OpenAI-compatible endpoint; resumable."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from camelid.errors import CamelidError
from camelid.train.self_instruct import (
    encode_prompt,
    endpoint_client,
    parse_tasks,
    read_seed_tasks,
    rouge_l,
    rouge_tokens,
    self_instruct,
    task_problem,
)

from conftest import REPO

DATA = REPO / "camelid" / "train" / "self_instruct_data"
SEEDS = read_seed_tasks(DATA / "seed_tasks.jsonl")

COMPLETION = (" Suggest three names for a bakery that sells only sourdough bread.\n4. Input:\n<noinput>\n"
              "4. Output:\nRise & Shine, The Crusty Loaf, Wild Yeast Bakery.\n\n###\n"
              "5. Instruction: Draw a picture of a cat sitting on a fence.\n5. Input:\n<noinput>\n5. Output:\nNo.\n\n###\n"
              f"6. Instruction: {SEEDS[0]['instruction']}\n6. Input:\n<noinput>\n6. Output:\nOats.\n\n###\n"
              "7. Instruction: this one has no numbered fields\n\n###\n"
              "8. Instruction: Classify the sentiment of this movie review as positive or negative.\n8. Input:\n"
              "The plot was thin but the acting carried it.\n8. Output:\nPositive.\n\n###\n"
              "9. Instruction: Summarize the paragraph in one")


def test_rouge_l_and_the_prompt():
    assert rouge_l(["a", "b", "c", "d"], ["a", "c", "d", "e"]) == pytest.approx(0.75)
    assert rouge_l(rouge_tokens("Hello, World!"), rouge_tokens("hello world")) == 1.0
    assert len(SEEDS) == 175
    prompt = encode_prompt((DATA / "prompt.txt").read_text(), SEEDS[:3])
    assert prompt.startswith("You are asked to come up with a set of 20 diverse task instructions.")
    assert "###\n1. Instruction: " in prompt and "3. Output:\n" in prompt and prompt.endswith("###\n4. Instruction:")


def test_parse_and_filter():
    from collections import Counter

    dropped = Counter()
    tasks = parse_tasks(COMPLETION, "length", 4, dropped)
    assert dropped == {"malformed": 1, "cut_off": 1}
    assert [t["instruction"][:20] for t in tasks] == ["Suggest three names ", "Draw a picture of a ", SEEDS[0]["instruction"][:20],
                                                      "Classify the sentime"]
    assert tasks[0]["input"] == "" and tasks[3]["input"].startswith("The plot")
    assert [task_problem(t) for t in tasks] == [None, "blocklist", None, None]
    assert task_problem({"instruction": "Too short", "output": "x"}) == "length"
    assert task_problem({"instruction": "Write a program that sorts numbers in Python", "output": "x"}) == "write_a_program"
    assert task_problem({"instruction": "¿Qué hora es en Madrid ahora mismo?", "output": "x"}) == "non_english"


class Stub(BaseHTTPRequestHandler):
    prompts: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.prompts.append(body)
        reply = json.dumps({"choices": [{"text": COMPLETION, "finish_reason": "length"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_end_to_end_against_an_openai_style_endpoint_and_resume(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        complete = endpoint_client(url, "stub", 512)
        out = tmp_path / "not" / "yet" / "generated.json"  # a folder that does not exist yet is created
        report = self_instruct(complete, DATA / "seed_tasks.jsonl", DATA / "prompt.txt", out, num_instructions=5,
                               requests_limit=2)
        kept = json.loads(out.read_text())
        # Request 1 keeps the bakery and the review tasks; request 2 repeats them, so ROUGE-L drops both.
        assert [t["instruction"][:8] for t in kept] == ["Suggest ", "Classify"]
        assert report == {"requests": 2, "kept": 2, "dropped": {"cut_off": 2, "malformed": 2, "blocklist": 2,
                                                                "similar": 4}}
        assert Stub.prompts[0]["model"] == "stub" and Stub.prompts[0]["prompt"].endswith("4. Instruction:")
        again = self_instruct(complete, DATA / "seed_tasks.jsonl", DATA / "prompt.txt", out, num_instructions=5,
                              requests_limit=1)
        assert again["requests"] == 3 and again["kept"] == 2 and again["dropped"]["similar"] == 7
    finally:
        server.shutdown()
    with pytest.raises(CamelidError, match="cannot connect"):
        endpoint_client(url, "stub", 16, timeout=2)("hello")
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(CamelidError, match="seeds.jsonl:1: not a seed task"):
        read_seed_tasks(tmp_path / "seeds.jsonl")
