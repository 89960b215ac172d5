"""camelid answer / judge / leaderboard: FastChat's prompts, parsing and swap rules, with fake judges."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from camelid.errors import CamelidError
from camelid.eval import judge
from camelid.eval.answer import sampling_for
from camelid.eval.leaderboard import leaderboard
from camelid.eval.questions import load_answers, load_questions, load_references

REPO = Path(__file__).resolve().parents[1]
SINGLE_V1 = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing "
    "a short explanation. Be as objective as possible. After providing your explanation, you must rate the response "
    "on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "camelid", *args], capture_output=True, text=True, cwd=cwd)


def answer(qid, model, turns):
    return {"question_id": qid, "answer_id": "x", "model_id": model, "choices": [{"index": 0, "turns": turns}],
            "tstamp": 0}


def fake_answers(questions, models=("alpha", "beta")):
    return {m: {q["question_id"]: answer(q["question_id"], m, [f"{m} says {'!' * (k + 1)}" * (1 + i)
                                                              for i in range(len(q["turns"]))])
                for q in questions} for k, m in enumerate(models)}


@pytest.fixture(scope="module")
def mt_bench():
    return load_questions("mt_bench")


def test_question_sets_and_answer_temperatures(mt_bench):
    vicuna = load_questions("vicuna")
    assert len(mt_bench) == 80 and all(len(q["turns"]) == 2 for q in mt_bench)
    assert len(vicuna) == 80 and all(len(q["turns"]) == 1 for q in vicuna)
    assert {k: sampling_for(k, 0).temperature for k in ("writing", "math", "stem", "generic")} == \
        {"writing": 0.7, "math": 0.0, "stem": 0.1, "generic": 0.7}
    assert sampling_for("roleplay", 0).top_k == 50 and sampling_for("roleplay", 0).top_p == 1.0


def test_prompts_are_fastchats_templates_filled_verbatim(mt_bench):
    prompts = judge.load_judge_prompts()
    refs = load_references(None, "mt_bench")
    pick = [q for q in mt_bench if q["question_id"] in (81, 111)]
    matches = judge.make_matches(pick, fake_answers(pick, ("m",)), refs, prompts)
    assert [(m.question["question_id"], m.turn, m.prompt["name"]) for m in matches] == [
        (81, 1, "single-v1"), (81, 2, "single-v1-multi-turn"), (111, 1, "single-math-v1"),
        (111, 2, "single-math-v1-multi-turn")]
    a = fake_answers(pick, ("m",))["m"]
    system, user = judge.fill_prompt(matches[0], [a[81]])
    assert system == "You are a helpful assistant."
    assert user == SINGLE_V1.format(question=pick[0]["turns"][0], answer="m says !")
    system, user = judge.fill_prompt(matches[3], [a[111]])
    assert system.startswith("Please act as an impartial judge") and "answer to the second question" in system
    assert user.startswith("<|The Start of Reference Answer|>\n\n### User:\n" + pick[1]["turns"][0]
                           + "\n\n### Reference answer:\n" + refs[111]["choices"][0]["turns"][0])
    assert user.endswith("### Assistant A:\nm says !m says !\n\n<|The End of Assistant A's Conversation with User|>")


def test_rating_and_verdict_parsing():
    assert judge.parse_rating("fine. Rating: [[8]]") == 8
    assert judge.parse_rating("I give [[7.5]] and later [[3]]") == 7.5
    assert judge.parse_rating("Rating: [6]") == 6
    assert judge.parse_rating("a nine out of ten") == -1
    assert [judge.parse_verdict(t) for t in ("[[B]] then [[A]]", "so [[B]]", "[[C]]", "A is better")] == \
        ["A", "B", "tie", "error"]


def test_single_grading_averages_turns_and_counts_errors(mt_bench, tmp_path):
    pick = mt_bench[:3]
    answers = fake_answers(pick)
    matches = judge.make_matches(pick, answers, {}, judge.load_judge_prompts())

    def ask(system, user):
        if "beta says" in user and "### Assistant A" in user:
            return "Turn two is muddled."  # no rating: an error, not a score
        return "Rating: [[9]]" if "alpha says" in user else "Rating: [[4]]"

    rows = judge.judge_matches(ask, "fake", matches, answers, tmp_path / "j.jsonl", progress=False)
    table = judge.single_scores(rows)
    assert table["alpha"] == {"turn_1": 9, "turn_2": 9, "score": 9, "judged": 6, "errors": 0}
    assert table["beta"] == {"turn_1": 4, "turn_2": None, "score": 4, "judged": 3, "errors": 3}
    assert list(rows[0]) == ["question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"]
    assert rows[0]["judge"] == ["fake", "single-v1"]


def test_pairwise_is_judged_both_ways_and_disagreement_is_a_tie(mt_bench, tmp_path):
    pick = mt_bench[:4]
    answers = fake_answers(pick, ("alpha", "beta", "gamma"))
    prompts = judge.load_judge_prompts()

    def first_seen(system, user):
        return "[[A]]"  # pure position bias: every pair must come out a tie

    matches = judge.make_matches(pick, answers, {}, prompts, "pairwise-all")
    rows = judge.judge_matches(first_seen, "biased", matches, answers, tmp_path / "a.jsonl", progress=False)
    table = judge.pairwise_rates(rows)
    assert all(r["tie"] == 16 and r["win"] == r["loss"] == 0 and r["win_rate_adjusted"] == 0.5
               for r in table.values())
    assert list(rows[0])[:6] == ["question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge"]

    def longer(system, user):
        if "gamma" in user:
            return "cannot decide"  # errors are dropped from the rates
        a = user.split("Assistant A")[-2] if "### Assistant A" in user else user.split("Assistant A's Answer]")[1]
        b = user.split("Assistant B")[-2] if "### Assistant B" in user else user.split("Assistant B's Answer]")[1]
        return "[[A]]" if a.count("!") > b.count("!") else "[[B]]"

    matches = judge.make_matches(pick, answers, {}, prompts, "pairwise-baseline", "alpha")
    rows = judge.judge_matches(longer, "fair", matches, answers, tmp_path / "b.jsonl", progress=False)
    table = judge.pairwise_rates(rows, baseline="alpha")
    assert table["beta"] == {"win": 8, "loss": 0, "tie": 0, "errors": 0, "win_rate": 1.0, "loss_rate": 0.0,
                             "win_rate_adjusted": 1.0}
    assert table["gamma"]["errors"] == 8 and table["gamma"]["win_rate"] is None and "alpha" not in table
    assert {(r["g1_winner"], r["g2_winner"]) for r in rows if r["model_1"] == "beta"} == {("model_1", "model_1")}


def test_judging_resumes_without_asking_again(mt_bench, tmp_path):
    pick = mt_bench[:2]
    answers = fake_answers(pick)
    matches = judge.make_matches(pick, answers, {}, judge.load_judge_prompts())
    calls = []

    def ask(system, user):
        calls.append(user)
        if len(calls) == 3:
            raise CamelidError("connection lost")
        return "[[5]]"

    with pytest.raises(CamelidError):
        judge.judge_matches(ask, "j", matches, answers, tmp_path / "j.jsonl", progress=False)
    rows = judge.judge_matches(ask, "j", matches, answers, tmp_path / "j.jsonl", progress=False)
    assert len(rows) == 8 and len(calls) == 3 + 6 and all(r["score"] == 5 for r in rows)


class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append((self.path, body))
        user = body["messages"][-1]["content"]
        text = "garbled" if "### Assistant A" in user else "Rating: [[6]]"
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
        too_long = "[Question]\nDraft a professional email" in user
        if too_long:
            data = json.dumps({"error": {"message": "this model's maximum context length is 8 tokens"}}).encode()
        self.send_response(400 if too_long else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_answer_then_judge_through_an_openai_endpoint(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = cli("answer", str(REPO / "models" / "stories260K"), "--limit", "2", "--max-new-tokens", "8",
                  "--threads", "1", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        answers = [json.loads(line) for line in (tmp_path / "answers/mt_bench/stories260K.jsonl").open()]
        assert [a["question_id"] for a in answers] == [81, 82] and all(len(a["choices"][0]["turns"]) == 2
                                                                          for a in answers)
        assert set(answers[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        questions = tmp_path / "q.jsonl"
        questions.write_text("".join(line + "\n" for line in
                                     (REPO / "camelid/eval/judge_data/mt_bench_questions.jsonl").read_text()
                                     .splitlines()[:2]))
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = cli("judge", "answers/mt_bench/stories260K.jsonl", "--questions", str(questions), "--judge-url", url,
                  "--judge-model", "fake-gpt", "--api-key", "k", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "|stories260K|6.0000||6.0000|1|3|" in out.stdout
        assert "3 judgments had no verdict" in out.stderr
        path, body = FakeOpenAI.requests[0]
        assert path == "/v1/chat/completions" and body["temperature"] == 0 and body["max_tokens"] == 2048
        assert body["model"] == "fake-gpt" and body["messages"][0]["role"] == "system"
        lines = [json.loads(line) for line in (tmp_path / "judgments/fake-gpt_single.jsonl").open()]
        assert len(lines) == 4 and sum(r["judgment"].startswith("$ERROR$ HTTP 400") for r in lines) == 1 and (tmp_path / "judgments/fake-gpt_single.png").stat().st_size > 1000
        seen = len(FakeOpenAI.requests)
        again = cli("judge", "answers/mt_bench/stories260K.jsonl", "--questions", str(questions), "--judge-url",
                    url, "--judge-model", "fake-gpt", cwd=tmp_path)
        assert again.returncode == 0 and len(FakeOpenAI.requests) == seen
    finally:
        server.shutdown()


def test_a_local_model_can_judge_and_its_unparsable_replies_are_errors(mt_bench, tmp_path):
    from camelid.eval.judge_clients import local_judge
    from camelid.formats.load import load_model

    pick = [q for q in mt_bench if q["question_id"] == 81]
    answers = fake_answers(pick, ("m",))
    matches = judge.make_matches(pick, answers, {}, judge.load_judge_prompts())[:1]
    ask = local_judge(load_model(REPO / "models" / "stories260K"), max_tokens=16)
    rows = judge.judge_matches(ask, "stories", matches, answers, tmp_path / "j.jsonl", progress=False)
    assert rows[0]["score"] == -1 and judge.single_scores(rows)["m"]["errors"] == 1


@pytest.mark.parametrize("setup,args,message", [
    ("missing", ["--judge-url", "http://127.0.0.1:9"], "model 'beta': no answer to question 82"),
    ("badline", ["--judge-url", "http://127.0.0.1:9"], "b.jsonl:2: not valid JSON"),
    ("nofield", ["--judge-url", "http://127.0.0.1:9"], "b.jsonl:1: answer record has no 'choices'"),
    ("ok", ["--judge-url", "http://127.0.0.1:9", "--mode", "pairwise-baseline", "--baseline", "zeta"],
     "--baseline 'zeta': no answers from it"),
    ("ok", ["--judge-url", "http://127.0.0.1:9", "--questions", "nope.jsonl"], "--questions nope.jsonl: no such file"),
    ("ok", ["--judge-url", "http://127.0.0.1:9"], "cannot connect"),
])
def test_bad_judge_input_is_one_line(tmp_path, mt_bench, setup, args, message):
    pick = mt_bench[:2]
    answers = fake_answers(pick)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in pick))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers["alpha"].values()))
    b = [json.dumps(a) for a in answers["beta"].values()]
    b = {"missing": b[:1], "badline": [b[0], "{oops", b[1]], "nofield": ['{"question_id": 81, "model_id": "beta"}'],
         "ok": b}[setup]
    (tmp_path / "b.jsonl").write_text("\n".join(b) + "\n")
    args = ["--questions", str(questions), *args] if "--questions" not in args else args
    out = cli("judge", "a.jsonl", "b.jsonl", *args, cwd=tmp_path)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "judgments" / "gpt-4_single.md").exists()


def results_file(path, model, arc, hs, mmlu, tqa, extra=None):
    results = {"arc_challenge": {"acc,none": arc - 0.02, "acc_norm,none": arc}, "hellaswag": {"acc_norm,none": hs},
               "mmlu": {"acc,none": mmlu + 0.01, "acc_macro,none": mmlu}, "mmlu_anatomy": {"acc,none": 0.9},
               "truthfulqa_mc2": {"acc,none": tqa}, **(extra or {})}
    path.write_text(json.dumps({"results": results, "config": {"model": f"/models/{model}/"}}))
    return str(path)


def test_leaderboard_table_average_and_chart(tmp_path):
    a = results_file(tmp_path / "a.json", "small", 0.25, 0.30, 0.26, 0.45)
    b = results_file(tmp_path / "b.json", "big", 0.50, 0.70, 0.40, 0.40, {"perplexity": {"word_perplexity,none": 9.5}})
    lm_eval_style = tmp_path / "c.json"
    lm_eval_style.write_text(json.dumps({"results": {"arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.55,
                                                                  "alias": "arc_easy"}},
                                         "config": {"model": "hf", "model_args": "pretrained=EleutherAI/pythia-70m"}}))
    columns, rows = leaderboard([a, b, str(lm_eval_style)])
    assert columns == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "arc_easy", "perplexity", "average"]
    assert list(rows) == ["big", "small", "pythia-70m"]
    assert rows["big"]["average"][1] == pytest.approx(50.0) and rows["small"]["mmlu"] == ("acc_macro", 26.0)
    assert rows["pythia-70m"]["arc_easy"] == ("acc_norm", pytest.approx(55.0)) and "average" not in rows["pythia-70m"]
    out = cli("leaderboard", a, b, "--out", str(tmp_path / "board"))
    assert out.returncode == 0, out.stderr
    assert "|big|50.00|70.00|40.00|40.00|9.50|50.00|" in out.stdout
    assert (tmp_path / "board.png").stat().st_size > 1000 and (tmp_path / "board.md").exists()
    (tmp_path / "bad.json").write_text("{\"results\": 3}")
    out = cli("leaderboard", a, str(tmp_path / "bad.json"))
    assert out.returncode == 1 and "bad.json: no 'results' object" in out.stderr and "Traceback" not in out.stderr


def test_answers_files_group_by_model(tmp_path, mt_bench):
    answers = fake_answers(mt_bench[:2])
    path = tmp_path / "both.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for m in answers.values() for a in m.values()))
    loaded = load_answers([str(path)])
    assert sorted(loaded) == ["alpha", "beta"] and sorted(loaded["beta"]) == [81, 82]
