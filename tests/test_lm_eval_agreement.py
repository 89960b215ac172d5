"""camelid eval against lm-evaluation-harness itself: lm-eval's own task YAMLs (ARC, HellaSwag, MMLU,
TruthfulQA mc1/mc2) pointed at local files, lm-eval's HF backend on the same model. Prompts must be the
same strings, every request's log-likelihood equal within 1e-4, and the accuracies identical."""

import pytest

from camelid.eval.harness import EvalSettings, evaluate
from camelid.formats.load import export_hf, load_model

from conftest import REPO

pytest.importorskip("lm_eval")
from lm_eval_local import run_lm_eval, tiny_gpt2, write_local_tasks  # noqa: E402

SHOTS = {"arc_easy": 3, "hellaswag": 2, "mmlu_abstract_algebra": 2, "truthfulqa_mc1": 0, "truthfulqa_mc2": 0}


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    return write_local_tasks(tmp_path_factory.mktemp("eval"), SHOTS)


@pytest.mark.parametrize("model,add_bos", [("stories260K", False), ("stories260K", True), ("gpt2", False)])
def test_prompts_loglikelihoods_and_accuracies_equal_lm_eval(local_data, tmp_path, model, add_bos, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    d, tasks = local_data
    folder = tmp_path / "hf"
    if model == "gpt2":
        tiny_gpt2(folder)
        lm = load_model(folder)
    else:
        lm = load_model(REPO / "models" / "stories260K")
        export_hf(lm, folder)
    theirs = run_lm_eval(folder, tasks, SHOTS, add_bos)
    ours, samples = evaluate(lm, EvalSettings(list(SHOTS), str(d), bos=add_bos, shots=SHOTS, batch_tokens=700))
    worst = 0.0
    for task in SHOTS:
        ref = sorted(theirs["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
        got = samples[task]
        assert len(ref) == len(got)
        for r, g in zip(ref, got):
            args = r["arguments"]
            pairs = [[a["arg_0"], a["arg_1"]] for a in args.values()] if isinstance(args, dict) else [list(a) for a in args]
            assert pairs == g["arguments"], task
            for (ll, greedy), resp in zip(g["resps"], r["resps"]):
                ref_ll, ref_greedy = resp[0]
                worst = max(worst, abs(ll - float(ref_ll)))
                assert ll == pytest.approx(float(ref_ll), abs=1e-4), task
                assert greedy == ref_greedy
        ref_metrics = theirs["results"][f"local_{task}"]
        for key, value in ours["results"][task].items():
            if key.endswith(",none") and "stderr" not in key:
                assert value == pytest.approx(ref_metrics[key], abs=1e-6), (task, key)
    assert worst < 1e-4
    if model == "gpt2":  # its 128-token context cuts the few-shot prompts, as lm-eval cuts them
        assert ours["results"]["hellaswag"]["truncated_requests"] > 0
