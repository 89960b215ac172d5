"""Preference tuning end to end on the bundled stories260K model: the data formats and their bad records, the
masks (one code path with SFT), DPO/IPO/ORPO/SimPO/KTO runs that learn, the stored reference and exact
resumption, reward models (and their refusal as a policy), RLHF with GRPO and RLOO, and the CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from camelid.data.masking import IGNORE, mask_conversation
from camelid.data.preference import PreferenceStats, read_preferences, reply_tokens, tokenize_pairs
from camelid.errors import CamelidError
from camelid.formats.load import load_model
from camelid.train.config import FinetuneConfig, RLHFConfig
from camelid.train.finetune import finetune
from camelid.train.preference import Item, pack, reply_logps
from camelid.train.rlhf import group_advantages, rlhf

from conftest import REPO, SHARED

BASE = REPO / "models" / "stories260K"
GOOD = ["The cat sat in the sun and was happy.", "Tim ran to the park with his dog.", "Lily and Ben shared a toy.",
        "The bird sang a song in the tree."]
BAD = ["dog dog dog dog dog", "zzz qqq xxx", "no no no no", "sun sun sun sun"]


def write(path, records):
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref")
    records = [{"prompt": f"Tell me a story about {topic}.", "chosen": GOOD[i % 4], "rejected": BAD[(i + 1) % 4]}
               for i, topic in enumerate(["a cat", "a dog", "a toy", "a bird", "the sun", "a park", "a tree", "Tim"])]
    return write(folder / "pairs.json", records)


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kto")
    records = [{"messages": [{"role": "user", "content": f"Story {i}?"},
                             {"role": "assistant", "content": (GOOD if i % 2 else BAD)[i % 4]}], "label": bool(i % 2)}
               for i in range(8)]
    return write(folder / "kto.json", records)


def config(data, out, **over):
    base = dict(base=str(BASE), data=str(data), template="alpaca", max_len=160, epochs=4, micro_batch=2, grad_accum=2,
                lr=3e-3, out_dir=str(out), log_every=1, eval_every=100, ckpt_every=2, threads=2, seed=3, beta=0.5)
    base.update(over)
    return FinetuneConfig(**base)


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_every_pair_format_reads_to_the_same_pair(tmp_path):
    conversational = [{"role": "user", "content": "Hi"}]
    records = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},  # TRL standard
        {"prompt": conversational, "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},  # TRL conversational
        {"chosen": conversational + [{"role": "assistant", "content": "Hello!"}],
         "rejected": conversational + [{"role": "assistant", "content": "Go away."}]},  # implicit prompt
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello!"},
         "rejected": {"from": "gpt", "value": "Go away."}},  # ShareGPT (LLaMA-Factory)
    ]
    stats = PreferenceStats()
    got = read_preferences(write(tmp_path / "p.json", records), False, stats)
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [(conversational, "Hello!", "Go away.")] * 4
    assert stats.skipped.total == 0


def test_bad_records_are_named_and_skipped(tmp_path, capsys):
    records = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"},
               {"prompt": "Hi", "chosen": "  ", "rejected": "No."},
               {"prompt": "Hi", "chosen": "Yes."},
               {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
               {"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
               "not an object",
               {"prompt": "Hi", "chosen": "Fine.", "rejected": "Bad."}]
    stats = PreferenceStats()
    got = read_preferences(write(tmp_path / "p.json", records), False, stats)
    assert len(got) == 1 and stats.skipped.total == 6
    err = capsys.readouterr().err
    for reason in ("the chosen and rejected replies are the same", "the chosen reply is empty",
                   "needs 'chosen' and 'rejected'", "the prompt must end with a user turn",
                   "'chosen' must be one assistant message", "not a JSON object"):
        assert reason in err
    assert "p.json:1 (record 1)" in err
    with pytest.raises(CamelidError, match="no usable preference pairs"):
        read_preferences(write(tmp_path / "none.json", records[:2]), False, PreferenceStats())


def test_the_shared_demo_files_read_whole():
    stats = PreferenceStats()
    assert len(read_preferences(SHARED / "preference" / "dpo_en_demo.json", False, stats)) == 300
    kto = read_preferences(SHARED / "preference" / "kto_en_demo.json", True, stats)
    assert len(kto) == 300 and sum(e.desirable for e in kto) == 150 and stats.skipped.total == 0


def test_a_reply_is_masked_exactly_as_sft_masks_it():
    tok = load_model(BASE).tokenizer
    prompt = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."},
              {"role": "user", "content": "Another one."}]
    ids, reply = reply_tokens(tok, "vicuna", prompt, "The end.")
    sample, = mask_conversation(tok, "vicuna", prompt + [{"role": "assistant", "content": "The end."}])
    assert sample.ids == ids + reply
    # SFT trains every assistant turn; a preference loss reads the last reply only
    assert sample.labels[len(ids):] == reply and any(label != IGNORE for label in sample.labels[:len(ids)])


def test_the_shared_prompt_row_gives_each_replys_own_log_probability():
    model = load_model(BASE).model
    items = [Item([1, 40, 300, 22], [[9, 87, 2], [13, 2]]), Item([1, 77], [[5, 6, 7, 2], [8, 2]])]
    with torch.no_grad():
        logps, counts, _ = reply_logps(model, pack(items))
        for j, (it, reply) in enumerate((item, r) for item in items for r in item.replies):
            alone = torch.log_softmax(model(torch.tensor([it.prompt + reply])), -1)[0]
            expected = alone[len(it.prompt) - 1:-1].gather(-1, torch.tensor(reply)[:, None]).sum()
            torch.testing.assert_close(logps[j], expected, atol=1e-5, rtol=0)
            assert counts[j] == len(reply)


@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "simpo"])
def test_lora_preference_tuning_learns_to_prefer_the_chosen(pairs, tmp_path, method):
    out = tmp_path / method
    folder = finetune(config(pairs, out, method=method, lora=True, lora_rank=8, val_data=str(pairs), eval_every=2,
                             lora_targets=["q_proj", "v_proj", "o_proj"], beta=2.0 if method == "simpo" else 0.5))
    rows = log(out)
    val = [r for r in rows if "val_loss" in r]  # held-out pairs (here the same ones): the loss and the rewards
    assert len(val) == 4 and "val_ppl" not in val[-1]
    assert val[-1]["val_reward_accuracy"] == 1.0 and val[-1]["val_reward_margin"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    assert rows[-1]["reward_accuracy"] == 1.0
    assert {"reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"} <= set(rows[-1])
    assert (out / "loss.png").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "reference_logps.safetensors").exists()  # LoRA: the base with the adapter off
    tuned = load_model(folder)
    assert tuned.template == "alpaca"


def test_full_dpo_stores_its_reference_and_resumes_exactly(pairs, tmp_path):
    reference = tmp_path / "reference"
    finetune(config(pairs, reference, method="dpo", lr=1e-3, val_fraction=0.3, eval_every=3))
    assert (reference / "reference_logps.safetensors").exists()
    assert (reference / "reference_logps_val.safetensors").exists()  # full fine-tuning: held-out pairs' too
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for ckpt in (resumed / "checkpoints").glob("*.pt"):
        ckpt.unlink()
    first = sorted(p.name for p in (reference / "checkpoints").glob("*.pt"))[0]
    shutil.copy(reference / "checkpoints" / first, resumed / "checkpoints")
    finetune(config(pairs, resumed, method="dpo", lr=1e-3, val_fraction=0.3, eval_every=3, keep_last=10),
             resume="auto")
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log(reference)]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log(resumed)] == strip
    assert strip[-1]["reward_accuracy"] == 1.0


def test_kto_learns_from_unpaired_labels(kto_data, tmp_path):
    out = tmp_path / "kto"
    finetune(config(kto_data, out, method="kto", lora=True, lora_rank=8, precompute_ref=True, epochs=6))
    rows = log(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["reward_desirable"] > rows[-1]["reward_undesirable"]
    assert "kl" in rows[-1] and (out / "reference_logps.safetensors").exists()


def test_a_reward_model_ranks_pairs_and_is_refused_as_a_policy(pairs, tmp_path):
    out = tmp_path / "rm"
    folder = finetune(config(pairs, out, method="reward", epochs=6))
    rows = log(out)
    assert rows[-1]["reward_accuracy"] == 1.0 and rows[-1]["loss"] < rows[0]["loss"]
    rm = load_model(folder)
    assert rm.config.score_head
    with pytest.raises(CamelidError, match="a reward model"):
        finetune(config(pairs, tmp_path / "again", base=str(folder), method="dpo", lora=True))
    run = subprocess.run([sys.executable, "-m", "camelid", "generate", str(folder), "Once"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "a reward model" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_rlhf_tunes_the_policy_against_the_reward_model(pairs, tmp_path, method):
    rm = finetune(config(pairs, tmp_path / "rm", method="reward", epochs=2))
    out = tmp_path / method
    folder = rlhf(RLHFConfig(policy=str(BASE), reward_model=str(rm), data=str(pairs), template="alpaca",
                             method=method, group_size=3, max_new_tokens=12, max_prompt_len=120, micro_batch=2,
                             grad_accum=2, epochs=1, lr=1e-3, out_dir=str(out), threads=2, lora=method == "grpo"))
    rows = log(out)
    assert len(rows) == 2 and all({"reward", "kl", "reply_tokens"} <= set(r) for r in rows)
    assert all(0 < r["reply_tokens"] <= 12 for r in rows)
    tuned, base = load_model(folder).model, load_model(BASE).model
    with torch.no_grad():
        assert not torch.allclose(tuned(torch.tensor([[1, 40, 300]])), base(torch.tensor([[1, 40, 300]])))


def test_group_advantages():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    grpo = group_advantages(RLHFConfig(method="grpo"), rewards)
    torch.testing.assert_close(grpo, torch.tensor([[-1.0, 0.0, 1.0]]) / (1 + 1e-4))
    rloo = group_advantages(RLHFConfig(method="rloo"), rewards)
    torch.testing.assert_close(rloo, torch.tensor([[1 - 2.5, 2 - 2.0, 3 - 1.5]]))


def test_bad_preference_configs_are_refused(pairs, tmp_path):
    cases = [({"method": "kto", "micro_batch": 1}, "kto needs micro_batch > 1"),
             ({"method": "dpo", "label_smoothing": 0.5}, "label_smoothing must be in"),
             ({"method": "dpo", "beta": 0}, "beta must be > 0"),
             ({"method": "full", "lora": True}, "lora: true is for preference objectives"),
             ({"method": "ppo"}, "method must be one of"),
             ({"method": "dpo", "max_len": 8}, "no example fits max_len 8")]
    for over, message in cases:
        with pytest.raises(CamelidError, match=message):
            finetune(config(pairs, tmp_path / "bad", **over))
    with pytest.raises(CamelidError, match="has no score head"):
        rlhf(RLHFConfig(policy=str(BASE), reward_model=str(BASE), data=str(pairs), template="alpaca",
                        out_dir=str(tmp_path / "rl")))
    with pytest.raises(CamelidError, match="group_size must be"):
        rlhf(RLHFConfig(policy=str(BASE), reward_model=str(BASE), data=str(pairs), group_size=1))


def test_pairs_that_do_not_fit_are_counted_not_truncated(pairs):
    tok = load_model(BASE).tokenizer
    stats = PreferenceStats()
    records = read_preferences(pairs, False, stats)
    assert tokenize_pairs(tok, "alpaca", records, 40, stats) == []
    assert stats.too_long == len(records)
    cut = tokenize_pairs(tok, "alpaca", records, 40, stats, truncate=True)  # as TRL cuts: the prompt's end,
    assert len(cut) == len(records) and stats.truncated == len(records)  # each reply's start
    whole = tokenize_pairs(tok, "alpaca", records, 1000, PreferenceStats())
    for c, w in zip(cut, whole):
        assert len(c.prompt) + max(len(c.chosen), len(c.rejected)) <= 40
        assert w.prompt[-len(c.prompt):] == c.prompt and w.chosen[:len(c.chosen)] == c.chosen


def test_show_mask_cli_shows_chosen_and_rejected(pairs):
    run = subprocess.run([sys.executable, "-m", "camelid", "data", "show-mask", str(pairs), "--template", "alpaca",
                          "--tokenizer", str(BASE), "--samples", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "chosen (" in run.stdout and "rejected (" in run.stdout
    assert f"⟦{GOOD[0]}" in run.stdout and "8 records -> 8 usable within" in run.stdout


def test_finetune_cli_runs_dpo(pairs, tmp_path):
    run = subprocess.run([sys.executable, "-m", "camelid", "finetune", f"base={BASE}", f"data={pairs}",
                          "template=alpaca", "method=dpo", "lora=true", "epochs=1", "micro_batch=4",
                          f"out_dir={tmp_path / 'cli'}", "max_len=160"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "8 training and 0 validation pairs" in run.stdout and (tmp_path / "cli" / "model").is_dir()


@pytest.mark.parametrize("over,fsdp", [({"method": "dpo", "lora": True}, False), ({"method": "dpo"}, True),
                                       ({"method": "kto", "lora": True, "precompute_ref": True}, False),
                                       ({"method": "reward", "lora": True, "quantize_base": "int4"}, True)])
def test_two_processes_give_the_losses_and_rewards_of_one(pairs, kto_data, tmp_path, over, fsdp):
    """torchrun over gloo, DDP or FSDP: each rank takes half of every step's micro-batches, and the step's loss,
    gradient norm and reward statistics are those of one process."""
    data = kto_data if over["method"] == "kto" else pairs
    common = dict(lora_rank=4, lora_dropout=0.0, epochs=2, threads=1, lr=1e-3, quantize_group=32, **over)
    finetune(config(data, tmp_path / "one", **common))
    cfg = config(data, tmp_path / "two", **common)
    args = [f"{k}={getattr(cfg, k)}" for k in ("base", "data", "template", "max_len", "epochs", "micro_batch",
                                                "grad_accum", "lr", "out_dir", "log_every", "eval_every", "ckpt_every",
                                                "threads", "seed", "beta", *common)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "camelid", "finetune", *args, *["--fsdp"] * fsdp], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert len(one) == len(two) >= 3
    for a, b in zip(one, two):
        for key in set(a) - {"tokens_per_s"}:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    ids = torch.tensor([[1, 40, 300, 22]])
    with torch.no_grad():
        head = {"scores": True} if over["method"] == "reward" else {}
        torch.testing.assert_close(load_model(tmp_path / "two" / "model").model(ids, **head),
                                   load_model(tmp_path / "one" / "model").model(ids, **head), atol=1e-4, rtol=0)


def test_a_loss_that_is_not_finite_stops_the_run_with_a_message(pairs, tmp_path):
    with pytest.raises(CamelidError, match=r"step 2: the loss is nan; the step was not applied"):
        finetune(config(pairs, tmp_path / "nan", method="dpo", lr=1e20, grad_clip=0, warmup_ratio=0))


def test_orpo_stays_finite_on_a_reply_the_model_is_sure_of():
    from camelid.train.preference import log1mexp

    x = torch.tensor([0.0, -1e-30, -1e-3, -5.0], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y[2:], torch.log(1 - torch.exp(x[2:])))


def test_a_checkpoint_of_another_objective_is_refused(pairs, tmp_path):
    finetune(config(pairs, tmp_path / "run", method="dpo", lora=True, epochs=1))
    with pytest.raises(CamelidError, match="a checkpoint of method dpo, not ipo"):
        finetune(config(pairs, tmp_path / "run", method="ipo", lora=True, epochs=2), resume="auto")


def test_rlhf_resumes_exactly(pairs, tmp_path):
    """The replies of a step are sampled with a seed of (seed, step, micro-batch): a resumed run samples and
    learns what the uninterrupted one did."""
    rm = finetune(config(pairs, tmp_path / "rm", method="reward", epochs=1))

    def run(out, resume=None, **over):
        return rlhf(RLHFConfig(policy=str(BASE), reward_model=str(rm), data=str(pairs), template="alpaca",
                               group_size=2, max_new_tokens=8, max_prompt_len=120, micro_batch=2, grad_accum=1,
                               epochs=1, lr=1e-3, out_dir=str(out), threads=2, ckpt_every=2, **over), resume)

    run(tmp_path / "whole")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed)
    for ckpt in sorted((resumed / "checkpoints").glob("*.pt"))[1:]:
        ckpt.unlink()
    run(resumed, "auto", keep_last=10)
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log(tmp_path / "whole")]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log(resumed)] == strip
