"""Pretraining: shards, schedules, config errors, exact resumption after SIGKILL and SIGTERM, and DDP/FSDP
under torchrun matching a single process."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from camelid.data.corpus import read_texts
from camelid.data.shards import TokenShards
from camelid.data.tokenize import tokenize_corpus
from camelid.errors import CamelidError, Preempted
from camelid.formats.load import load_model
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams
from camelid.model.config import ModelConfig
from camelid.model.transformer import Transformer
from camelid.tokenizer.train import train_tokenizer
from camelid.train.config import TrainConfig, load_train_config
from camelid.train.distributed import Cluster
from camelid.train.loop import param_groups
from camelid.train.schedule import lr_at
from camelid.train.trainer import _train, train

from conftest import REPO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare):
    root = tmp_path_factory.mktemp("corpus")
    text = shakespeare[:150_000]
    (root / "shakespeare.txt").write_text(text)
    tok = train_tokenizer(read_texts([root / "shakespeare.txt"]), root / "tok", vocab_size=320)
    tokenize_corpus([str(root / "shakespeare.txt")], tok, root / "data", val_fraction=0.1, workers=1)
    return root, tok


def make_config(root, tok, out, **over):
    cfg = dict(out_dir=str(out), data=str(root / "data" / "train"), val_data=str(root / "data" / "val"),
               tokenizer=str(tok), model=dict(dim=32, n_layers=2, n_heads=2, ffn_dim=64, dropout=0.1),
               seq_len=32, micro_batch=4, grad_accum=2, max_steps=200, lr=3e-3, min_lr=3e-4, warmup_steps=10,
               log_every=1, eval_every=50, eval_batches=2, ckpt_every=5, keep_last=2, threads=2, seed=7)
    cfg.update(over)
    return cfg


def write_yaml(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(log: Path) -> dict:
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in map(json.loads, log.read_text().splitlines())}


def test_shards_are_reproducible_and_shifted(corpus):
    root, _ = corpus
    shards = TokenShards(root / "data" / "train")
    x1, y1 = shards.batch(40, 4, 16, seed=3)
    x2, y2 = shards.batch(40, 4, 16, seed=3)
    assert (x1 == x2).all() and (x1[:, 1:] == y1[:, :-1]).all()
    assert not (shards.batch(44, 4, 16, seed=3)[0] == x1).all()


def test_schedules():
    cfg = TrainConfig(data="x", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, decay_every=50, decay_gamma=0.5)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    cfg.schedule = "cosine"
    assert lr_at(10, cfg, 110) == pytest.approx(1.0) and lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    cfg.schedule = "step"
    assert (lr_at(59, cfg, 110), lr_at(60, cfg, 110), lr_at(109, cfg, 110), lr_at(110, cfg, 110)) == (1.0, 0.5, 0.5, 0.25)
    cfg.schedule = "exponential"
    assert lr_at(35, cfg, 110) == pytest.approx(0.5 ** 0.5)
    # warmup as a share of the run (fine-tuning's default): 10% of 110 steps is 11
    cfg = TrainConfig(data="x", lr=1.0, warmup_steps=0, warmup_ratio=0.1, schedule="constant")
    assert lr_at(0, cfg, 110) == pytest.approx(1 / 11) and lr_at(10, cfg, 110) == lr_at(11, cfg, 110) == 1.0
    # warmup_steps, when given, overrides warmup_ratio, as in transformers' Trainer
    cfg = load_train_config(None, ["data=x", "warmup_steps=5", "warmup_ratio=0.1", "schedule=constant", "lr=1"])
    assert lr_at(4, cfg, 110) == lr_at(5, cfg, 110) == 1.0 and lr_at(3, cfg, 110) == pytest.approx(0.8)


def test_no_weight_decay_on_norms_and_biases():
    model = Transformer(ModelConfig(arch="gpt2", vocab_size=50, dim=16, n_layers=1, n_heads=2, ffn_dim=32,
                                    norm="layernorm", activation="gelu", gated_mlp=False, positions="learned",
                                    qkv_bias=True, mlp_bias=True, tie_embeddings=True))
    model.tie_weights()
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_sigkill_then_resume_gives_the_same_losses_bit_for_bit(corpus, tmp_path):
    root, tok = corpus
    reference = tmp_path / "reference"
    train(TrainConfig(**make_config(root, tok, reference)))
    killed = tmp_path / "killed"
    cfg_path = write_yaml(tmp_path / "killed.yaml", make_config(root, tok, killed))
    proc = subprocess.Popen([sys.executable, "-m", "camelid.cli", "pretrain", "--config", str(cfg_path)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    newest = max(int(p.stem.split("_")[1]) for p in (killed / "checkpoints").glob("step_*.pt"))
    assert newest < 200, "the run finished before it could be killed"
    train(TrainConfig(**make_config(root, tok, killed)), resume="auto")
    ref, got = losses(reference / "log.jsonl"), losses(killed / "log.jsonl")
    assert sorted(got) == list(range(1, 201))
    assert got == ref  # every step's loss (and validation loss), exactly
    assert (killed / "loss.png").exists() and (killed / "model" / "camelid.json").exists()


def test_resume_auto_before_any_checkpoint_starts_a_fresh_log(corpus, tmp_path):
    root, tok = corpus
    out = tmp_path / "run"
    train(TrainConfig(**make_config(root, tok, out, max_steps=3, ckpt_every=100, val_data="")))
    shutil.rmtree(out / "checkpoints")  # killed before its first checkpoint, its log kept
    train(TrainConfig(**make_config(root, tok, out, max_steps=4, ckpt_every=100, val_data="")), resume="auto")
    assert sorted(losses(out / "log.jsonl")) == [1, 2, 3, 4]  # not 1, 2, 3, 1, 2, 3, 4


def test_sigterm_checkpoints_the_current_step_and_stops(corpus, tmp_path):
    root, tok = corpus
    out = tmp_path / "run"
    cfg_path = write_yaml(tmp_path / "c.yaml", make_config(root, tok, out, max_steps=100000, ckpt_every=100000))
    proc = subprocess.Popen([sys.executable, "-m", "camelid.cli", "pretrain", "--config", str(cfg_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    # Not 0: a job runner must not read a preempted run as a finished one.
    assert proc.returncode == Preempted.EXIT_CODE and "resume with --resume auto" in stderr
    last_logged = max(losses(out / "log.jsonl"))
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == [f"step_{last_logged:08d}.pt"]


def test_trained_model_generates(corpus, tmp_path):
    root, tok = corpus
    folder = train(TrainConfig(**make_config(root, tok, tmp_path / "run", max_steps=60)))
    log = losses(tmp_path / "run" / "log.jsonl")
    assert log[60][0] < log[1][0] - 1.0  # it learned something
    lm = load_model(folder)
    text = generate(lm, ["ROMEO:"], 20, SamplingParams(temperature=0.8, seed=1))[0].text
    assert len(text) > 10


def test_config_errors(corpus, tmp_path):
    root, tok = corpus
    with pytest.raises(CamelidError, match="unknown key 'learning_rate'"):
        load_train_config(write_yaml(tmp_path / "a.yaml", {"data": "x", "learning_rate": 1}))
    with pytest.raises(CamelidError, match="invalid YAML at line 2"):
        (tmp_path / "b.yaml").write_text("data: x\n  misindented: 1\n")
        load_train_config(tmp_path / "b.yaml")
    with pytest.raises(CamelidError, match="schedule must be one of"):
        load_train_config(None, ["data=x", "schedule=sawtooth"])
    with pytest.raises(CamelidError, match="compile_mode must be one of default, max-autotune-no-cudagraphs"):
        load_train_config(None, ["data=x", "compile_mode=fastest"])
    with pytest.raises(CamelidError, match="use key=value"):
        load_train_config(None, ["data"])
    cfg = load_train_config(None, ["data=x", "model.dim=64", "lr=1e-3", "max_steps=2e3"])
    assert cfg.model == {"dim": 64} and cfg.lr == 1e-3 and cfg.max_steps == 2000
    with pytest.raises(CamelidError, match="micro_batch must be an integer, got 'eight'"):
        load_train_config(None, ["data=x", "micro_batch=eight"])
    # resuming with another model's checkpoint
    out = tmp_path / "run"
    train(TrainConfig(**make_config(root, tok, out, max_steps=5)))
    other = make_config(root, tok, out, max_steps=10)
    other["model"] = dict(other["model"], dim=48)
    with pytest.raises(CamelidError, match="checkpoint of another model"):
        train(TrainConfig(**other), resume="auto")


def test_empty_corpus_and_bad_inputs(corpus, tmp_path):
    root, tok = corpus
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CamelidError, match="corpus is empty"):
        tokenize_corpus([str(tmp_path / "empty.txt")], tok, tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CamelidError, match="bad.jsonl:2"):
        tokenize_corpus([str(tmp_path / "bad.jsonl")], tok, tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "good.txt").write_text("Hello there.\n\nGeneral Kenobi.")
    report = tokenize_corpus([str(tmp_path / "latin1.txt"), str(tmp_path / "good.txt")], tok, tmp_path / "o2",
                             val_fraction=0.0, workers=1)
    assert report["train"]["documents"] == 2
    with pytest.raises(CamelidError, match="no index.json"):
        TokenShards(tmp_path)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one(corpus, tmp_path, mode):
    root, tok = corpus
    common = dict(model=dict(dim=32, n_layers=2, n_heads=2, ffn_dim=64, dropout=0.0), max_steps=6, micro_batch=2,
                  grad_accum=4, eval_every=3, eval_batches=4, ckpt_every=3, threads=1, sample_every=6, sample_tokens=4)
    train(TrainConfig(**make_config(root, tok, tmp_path / "one", **common)))
    cfg_path = write_yaml(tmp_path / "two.yaml", make_config(root, tok, tmp_path / "two", **common))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "camelid", "pretrain", "--config", str(cfg_path)] + (["--fsdp"] if mode == "fsdp" else []),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = losses(tmp_path / "one" / "log.jsonl"), losses(tmp_path / "two" / "log.jsonl")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-5, abs=1e-6)
    assert two[6][1] == pytest.approx(one[6][1], rel=1e-5)
    last = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[-1])
    assert isinstance(last["sample"], str)  # sampling runs through the wrapped (DDP or sharded) model
    # The checkpoint holds the whole model, whatever the sharding: it resumes in one process.
    single = load_model(tmp_path / "two" / "model")
    reference = load_model(tmp_path / "one" / "model")
    for (name, a), b in zip(single.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_samples_are_logged_and_a_mismatched_tokenizer_is_refused(corpus, tmp_path):
    root, tok = corpus
    out = tmp_path / "run"
    train(TrainConfig(**make_config(root, tok, out, max_steps=4, sample_every=2, sample_prompt="ROMEO:",
                                    sample_tokens=8)))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    samples = [r["sample"] for r in rows if "sample" in r]
    assert len(samples) == 2 and all(isinstance(s, str) and s for s in samples)
    other = train_tokenizer(iter(["a completely different corpus " * 50]), tmp_path / "other", vocab_size=300)
    with pytest.raises(CamelidError, match="not the tokenizer the shards"):
        train(TrainConfig(**make_config(root, tok, tmp_path / "x", tokenizer=str(other))))
    with pytest.raises(CamelidError, match="nope.pt: no such checkpoint"):
        train(TrainConfig(**make_config(root, tok, tmp_path / "y")), resume=str(tmp_path / "nope.pt"))
    with pytest.raises(CamelidError, match="grad_accum 3 must be a multiple of the number of processes"):
        _train(TrainConfig(**make_config(root, tok, tmp_path / "z", grad_accum=3)), None, Cluster(0, 2),
               torch.device("cpu"))


def test_sweep_finds_the_better_learning_rate_and_prunes(corpus, tmp_path):
    from camelid.train.sweep import sweep

    root, tok = corpus
    recipe = write_yaml(tmp_path / "recipe.yaml", make_config(root, tok, tmp_path / "unused", ckpt_every=1000))
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: categorical, choices: [0.003, 0.0000001]}\n"
                     "warmup_steps: {type: int, low: 0, high: 5}\n")
    result = sweep(str(recipe), ["model.dropout=0.0"], tmp_path / "sweep", trials=6, steps=20, space_path=str(space))
    assert result["best_params"]["lr"] == 0.003
    assert result["trials"] == 6 and result["pruned"] >= 1
    best = load_train_config(tmp_path / "sweep" / "best.yaml")  # a valid recipe for the full run
    assert best.lr == 0.003 and best.model["dropout"] == 0.0
    rows = (tmp_path / "sweep" / "trials.csv").read_text().splitlines()
    assert len(rows) == 7 and "pruned" in "".join(rows)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    # Running again adds trials to the same study.
    assert sweep(str(recipe), [], tmp_path / "sweep", trials=1, steps=20, space_path=str(space))["trials"] == 7
    (tmp_path / "bad.yaml").write_text("learning_rate: {type: float, low: 0.1, high: 1}\n")
    with pytest.raises(CamelidError, match="bad.yaml: unknown key 'learning_rate'"):
        sweep(str(recipe), [], tmp_path / "s2", trials=1, steps=5, space_path=str(tmp_path / "bad.yaml"))


def test_compiled_training_matches_eager(corpus, tmp_path):
    root, tok = corpus
    common = dict(model=dict(dim=32, n_layers=2, n_heads=2, ffn_dim=64, dropout=0.0), max_steps=4, eval_every=4,
                  ckpt_every=2)
    train(TrainConfig(**make_config(root, tok, tmp_path / "eager", **common)))
    train(TrainConfig(**make_config(root, tok, tmp_path / "compiled", compile=True, **common)))
    eager, compiled = losses(tmp_path / "eager" / "log.jsonl"), losses(tmp_path / "compiled" / "log.jsonl")
    for step in eager:
        assert compiled[step][0] == pytest.approx(eager[step][0], rel=1e-4)
    # The compiled optimizer keeps its learning rate as a tensor; the checkpoint still resumes.
    train(TrainConfig(**make_config(root, tok, tmp_path / "compiled", compile=True, **dict(common, max_steps=5))),
          resume="auto")
    assert max(losses(tmp_path / "compiled" / "log.jsonl")) == 5
