"""Task prompts as lm-eval builds them (golden strings from its documentation), the shared data readers,
the prefix-shared scoring against transformers, metrics, results files, and bad input."""

import json
import subprocess
import sys

import pytest
import torch

from camelid.eval import data
from camelid.eval.harness import EvalSettings, evaluate, item_metrics, mean_stderr, pooled_stderr
from camelid.eval.loglikelihood import Request, encode_pair, loglikelihoods
from camelid.eval.tasks import Item, hellaswag_preprocess, load_task, prompts
from camelid.formats.load import export_hf, load_model

from conftest import REPO, SHARED, run_main

EVAL = SHARED / "eval"

MMLU_5SHOT = """The following are multiple choice questions (with answers) about abstract algebra.

Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.
A. 0
B. 1
C. 2
D. 3
Answer: B

Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.
A. True, True
B. False, False
C. True, False
D. False, True
Answer: B

Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The symmetric group S_10 has 10 elements.
A. True, True
B. False, False
C. True, False
D. False, True
Answer: C

Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup of an abelian group is abelian.
A. True, True
B. False, False
C. True, False
D. False, True
Answer: A

Find the characteristic of the ring 2Z.
A. 0
B. 3
C. 12
D. 30
Answer: A

Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.
A. 0
B. 4
C. 2
D. 6
Answer:"""


def test_mmlu_five_shot_prompt_is_lm_evals_string():
    [task] = load_task("mmlu_abstract_algebra", EVAL)
    (item, prompt), = prompts(task, 5, limit=1)
    assert prompt == MMLU_5SHOT
    assert item.choices == ["A", "B", "C", "D"] and item.gold == 1
    assert len(load_task("mmlu", EVAL)) == 57


def test_hellaswag_preprocessing_and_llamacpp_file():
    assert hellaswag_preprocess(" How to x [title] Do it [step] now  ok ") == "How to x. Do it now ok"
    [task] = load_task("hellaswag", EVAL)
    assert len(task.items) == 10042
    first = task.items[0]
    assert first.query == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices[0] == "is using wrap to wrap a pair of skis." and first.gold == 3


def test_truthfulqa_from_the_csv():
    mc1, = load_task("truthfulqa_mc1", EVAL)
    mc2, = load_task("truthfulqa_mc2", EVAL)
    assert len(mc1.items) == len(mc2.items) == 817
    q = mc2.items[0]
    assert q.query.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert q.query.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: What happens to you if you eat "
                            "watermelon seeds?\nA:")
    assert q.labels[:5] == [1] * 5 and q.labels[-1] == 0 and mc1.items[0].gold == 0


def test_fewshot_sampling_is_seeded_and_never_shows_the_item_itself():
    items = [Item(f"q{i}", ["a", "b"], 0, doc={"i": i}) for i in range(6)]
    from camelid.eval.tasks import TaskSet

    task = TaskSet("t", items, items, exclude_self=True)
    a = prompts(task, 5, seed=1)
    assert a == prompts(task, 5, seed=1) and a != prompts(task, 5, seed=2)
    for item, prompt in a:
        assert prompt.count("\n\n") == 5 and f"{item.query} a\n\n" not in prompt
    v1 = prompts(task, 2, sampler="leaderboard-v1")
    assert [i.query for i, _ in v1] != [i.query for i in items]  # the old harness shuffled the documents


def test_metrics_match_lm_evals_definitions():
    item = Item("q", ["a", "bbbbbbbb"], 1)
    assert item_metrics(("acc", "acc_norm"), item, [-2.0, -3.0]) == {"acc": 0.0, "acc_norm": 1.0}
    assert item_metrics(("acc",), Item("q", ["x", "y"], 0), [-1.0, -1.0])["acc"] == 1.0  # ties: the first
    mc2 = item_metrics(("acc",), Item("q", ["t", "f", "t"], 0, labels=[1, 0, 1]), [-1.0, -2.0, -3.0])
    p = torch.tensor([-1.0, -2.0, -3.0]).softmax(0)
    assert mc2["acc"] == pytest.approx(float(p[0] + p[2]))
    mean, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and se == pytest.approx(float(torch.tensor([1.0, 0, 1, 1]).std() / 2))
    # pooled over groups equals the stderr of all items together
    a, b = [1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0, 0.0]
    assert pooled_stderr([mean_stderr(a)[1], mean_stderr(b)[1]], [3, 5]) == pytest.approx(mean_stderr(a + b)[1], rel=0.05)


@pytest.fixture(scope="module")
def stories():
    return load_model(REPO / "models" / "stories260K")


def test_encode_pair_moves_trailing_space_and_handles_empty_context(stories):
    tok = stories.tokenizer
    ctx, cont = encode_pair(tok, "Once upon a time ", "there")
    whole = tok.encode("Once upon a time there", bos=False)
    assert ctx == tok.encode("Once upon a time", bos=False) and ctx + cont == whole
    assert encode_pair(tok, "", "Lily")[0] == [tok.bos_id]


def test_shared_context_scores_equal_transformers_row_by_row(stories, tmp_path):
    import transformers as tf

    export_hf(stories, tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reqs = [Request("Once upon a time, there was a", c) for c in [" girl", " big dog named Max", " tree"]]
    reqs += [Request("Tom went to the park. ", "He saw a cat."), Request("", "Lily liked to play."),
             Request("The sun was hot and the birds", " sang and sang")]
    for batch_tokens in (16, 4096):  # one row a batch, and all rows in one padded batch
        got = loglikelihoods(stories, reqs, max_len=12, batch_tokens=batch_tokens)
        for r, (ll, greedy) in zip(reqs, got):
            ctx, cont = encode_pair(stories.tokenizer, r.context, r.continuation)
            inp = (ctx + cont)[-13:][:-1]  # lm-eval's left truncation to max_length + 1
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([inp])).logits[0].float(), -1)[len(inp) - len(cont):]
            assert ll == pytest.approx(lp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)
            assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())


def test_results_and_samples_files(stories, tmp_path):
    results, samples = evaluate(stories, EvalSettings(["hellaswag", "mmlu"], str(EVAL), num_fewshot=1, limit=2))
    assert set(results["groups"]) == {"mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"}
    assert results["n-samples"]["hellaswag"] == {"original": 10042, "effective": 2}
    row = results["results"]["hellaswag"]
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(row)
    group = results["groups"]["mmlu"]
    accs = [results["results"][s]["acc,none"] for s in results["group_subtasks"]["mmlu"]]
    assert group["acc_macro,none"] == pytest.approx(sum(accs) / 57)
    assert len(samples["hellaswag"]) == 2 and len(samples["hellaswag"][0]["resps"]) == 4
    out = subprocess.run([sys.executable, "-m", "camelid", "eval", str(REPO / "models" / "stories260K"),
                          "--tasks", "hellaswag,truthfulqa_mc2", "--data-dir", str(EVAL), "--limit", "2",
                          "--output", str(tmp_path / "r.json"), "--log-samples"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "|hellaswag|1.0|none|0|acc_norm|" in out.stdout
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["results"]["truthfulqa_mc2"]["alias"] == "truthfulqa_mc2"
    assert len(list(tmp_path.glob("samples_hellaswag_*.jsonl"))) == 1


def cli(*args):
    return run_main(*args)


@pytest.mark.parametrize("setup,args,message", [
    (None, ["--tasks", "winogrande"], "unknown task 'winogrande'"),
    (None, ["--tasks", "mmlu_cooking"], "unknown MMLU subject 'cooking'"),
    ("empty", ["--tasks", "arc_easy"], "no ARC-Easy test data"),
    ("bad_csv", ["--tasks", "mmlu"], "test/anatomy_test.csv:1: expected 6 columns"),
    ("bad_json", ["--tasks", "arc_challenge"], "test.jsonl: record 0: missing column 'answerKey'"),
    ("bad_hs", ["--tasks", "hellaswag"], "is not a whole number of 6-line HellaSwag tasks"),
])
def test_bad_eval_input_is_one_line(tmp_path, setup, args, message):
    d = tmp_path / "data"
    d.mkdir()
    if setup == "bad_csv":
        (d / "test").mkdir()
        (d / "test" / "anatomy_test.csv").write_text("What?,a,b\n")
    elif setup == "bad_json":
        (d / "ARC-Challenge").mkdir()
        (d / "ARC-Challenge" / "test.jsonl").write_text(json.dumps({"question": "q", "choices": {}}) + "\n")
    elif setup == "bad_hs":
        (d / "hellaswag_val_full.txt").write_text("ctx\n0\na\nb\n")
    out = cli("eval", str(REPO / "models" / "stories260K"), "--data-dir", str(d if setup else EVAL), *args)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_eval_needs_its_inputs():
    out = cli("eval", str(REPO / "models" / "stories260K"), "--tasks", "hellaswag")
    assert out.returncode != 0 and "needs --data-dir" in out.stderr
    assert data.find(EVAL, ["**/nothing-*.parquet"]) == []
