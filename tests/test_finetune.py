"""Instruction tuning: LoRA and full fine-tuning of the bundled stories260K model on real Alpaca records,
exact mid-epoch resume, the model folder's template, merge, and bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats.load import load_model
from camelid.formats.peft import load_adapter, read_adapter_config
from camelid.model.lora import merge_lora
from camelid.train.config import FinetuneConfig
from camelid.train.finetune import batch_rows, finetune

from conftest import REPO, SHARED

BASE = REPO / "models" / "stories260K"
IDS = torch.tensor([[1, 40, 300, 22, 9, 87, 200, 13]])


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca40.json"
    path.write_text(json.dumps(json.loads((SHARED / "instruct" / "alpaca_en_demo.json").read_text())[:40]))
    return path


def config(data, out, **over):
    base = dict(base=str(BASE), data=str(data), template="alpaca", max_len=128, epochs=2, micro_batch=4,
                grad_accum=2, lr=3e-3, out_dir=str(out), log_every=1, eval_every=4, ckpt_every=2, val_fraction=0.1,
                threads=2, seed=3)
    base.update(over)
    return FinetuneConfig(**base)


def log(out):
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_lora_learns_and_writes_adapter_and_model(alpaca, tmp_path):
    folder = finetune(config(alpaca, tmp_path / "run", method="lora", lora_rank=4, lora_targets=["q_proj", "v_proj"]))
    losses = log(tmp_path / "run")
    first, last = losses[1][0], losses[max(losses)][0]
    assert last < first - 0.3, (first, last)
    meta = json.loads((folder / "camelid.json").read_text())
    assert meta["chat"] == {"template": "alpaca", "stop": ["### Instruction:"]}
    assert read_adapter_config(tmp_path / "run" / "adapter").targets == ["q_proj", "v_proj"]
    # The saved model is the base with the adapter merged, and so is `camelid merge`.
    tuned = load_model(folder).model
    base = load_model(BASE).model
    merge_lora(load_adapter(base, tmp_path / "run" / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(tuned(IDS), base(IDS), atol=1e-5, rtol=0)
        assert not torch.allclose(tuned(IDS), load_model(BASE).model(IDS), atol=1e-3)
    merged = tmp_path / "merged"
    run = subprocess.run([sys.executable, "-m", "camelid", "merge", str(BASE), str(tmp_path / "run" / "adapter"),
                          str(merged), "--template", "alpaca"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged).model(IDS), tuned(IDS), atol=1e-5, rtol=0)


def test_resume_mid_epoch_continues_at_the_same_sample(alpaca, tmp_path):
    reference = tmp_path / "reference"
    finetune(config(alpaca, reference, method="full", lr=1e-3))
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for ckpt in (resumed / "checkpoints").glob("*.pt"):
        ckpt.unlink()
    shutil.copy(reference / "checkpoints" / sorted(p.name for p in (reference / "checkpoints").glob("*.pt"))[0],
                resumed / "checkpoints")
    finetune(config(alpaca, resumed, method="full", lr=1e-3, keep_last=10), resume="auto")
    assert log(resumed) == log(reference)


def test_data_order_walks_epochs_reproducibly():
    rows = list(range(10))
    first = [batch_rows(rows, s, 4, seed=1) for s in range(5)]
    assert sorted(first[0] + first[1] + first[2][:2]) == rows  # epoch 0 sees every row once
    assert first == [batch_rows(rows, s, 4, seed=1) for s in range(5)]
    assert first != [batch_rows(rows, s, 4, seed=2) for s in range(5)]


def test_finetune_bad_input(alpaca, tmp_path):
    with pytest.raises(CamelidError, match="has no chat template; set one"):
        finetune(config(alpaca, tmp_path / "a", template=""))
    with pytest.raises(CamelidError, match="LoRA target module 'attn' does not exist"):
        finetune(config(alpaca, tmp_path / "b", method="lora", lora_targets=["attn"]))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(CamelidError, match="empty.json: no usable records"):
        finetune(config(tmp_path / "empty.json", tmp_path / "c"))
    finetune(config(alpaca, tmp_path / "d", method="lora", epochs=0.2))
    with pytest.raises(CamelidError, match="a checkpoint of another model or method"):
        finetune(config(alpaca, tmp_path / "d", method="full", epochs=0.2), resume="auto")
    run = subprocess.run([sys.executable, "-m", "camelid", "finetune", "base=x", f"data={alpaca}", "lora_rank=two"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip() == "camelid: error: command line: lora_rank must be an integer, got 'two'"


def test_bf16_lora_keeps_the_base_in_bf16_and_the_adapter_in_fp32(alpaca, tmp_path):
    from safetensors.torch import load_file

    folder = finetune(config(alpaca, tmp_path / "run", method="lora", dtype="bf16", epochs=0.5, lora_rank=2))
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained
    assert load_file(str(folder / "model.safetensors"))["layers.0.attn.wqkv.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_qlora_trains_over_a_quantized_base_and_merges_into_the_float_one(alpaca, tmp_path, bits):
    from camelid.model.quant import QUANTIZED

    run = config(alpaca, tmp_path / "q", method="lora", lora_rank=4, quantize_base=bits, quantize_group=32)
    plain = config(alpaca, tmp_path / "p", method="lora", lora_rank=4)
    folder = finetune(run)
    finetune(plain)
    q, p = log(tmp_path / "q"), log(tmp_path / "p")
    assert q[max(q)][0] < q[1][0] - 0.3, q  # it learns
    assert q[1][0] != p[1][0] and abs(q[1][0] - p[1][0]) < 0.05 * p[1][0]  # over a close, quantized copy
    # The saved model is the float base with the adapter merged: what `camelid merge` makes of it.
    tuned = load_model(folder).model
    assert not any(isinstance(m, QUANTIZED) for m in tuned.modules())
    base = merge_lora(load_adapter(load_model(BASE).model, tmp_path / "q" / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(tuned(IDS), base(IDS), atol=1e-5, rtol=0)


def test_qlora_bad_input(alpaca, tmp_path):
    with pytest.raises(CamelidError, match="quantize_base needs method lora"):
        finetune(config(alpaca, tmp_path / "a", quantize_base="int4"))
    with pytest.raises(CamelidError, match="quantize_base must be int8 or int4"):
        finetune(config(alpaca, tmp_path / "b", method="lora", quantize_base="nf4"))
    quantized = tmp_path / "int4-base"
    done = subprocess.run([sys.executable, "-m", "camelid", "quantize", str(BASE), str(quantized), "--mode", "int4"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(CamelidError, match="is quantized, so its weights cannot be trained; use method: lora"):
        finetune(config(alpaca, tmp_path / "c", base=str(quantized)))


@pytest.mark.parametrize("method,fsdp,extra", [("lora", False, {}), ("full", False, {}), ("full", True, {}),
                                               ("lora", True, {"dtype": "bf16"}), ("lora", True, {"quantize_base": "int4"})])
def test_two_processes_give_the_losses_of_one(alpaca, tmp_path, method, fsdp, extra):
    """torchrun over gloo, DDP or FSDP (fp32 adapters over a bf16 base: units of one dtype; QLoRA: quantized
    buffers stay whole): each rank takes half of every step's micro-batches. FSDP also resumes."""
    over = dict(method=method, lora_rank=4, lora_dropout=0.0, epochs=2, threads=1, lr=1e-3, quantize_group=32, **extra)
    finetune(config(alpaca, tmp_path / "one", **over))
    two_cfg = config(alpaca, tmp_path / "two", **over)
    args = [f"{k}={getattr(two_cfg, k)}" for k in ("base", "data", "template", "max_len", "epochs", "micro_batch",
                                                    "grad_accum", "lr", "out_dir", "log_every", "eval_every",
                                                    "ckpt_every", "val_fraction", "threads", "seed", *over)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "camelid", "finetune", *args, *["--fsdp"] * fsdp]
    run = subprocess.run(torchrun, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) >= 3
    logs = [(tmp_path / run / "log.jsonl").read_text().splitlines() for run in ("one", "two")]
    norms = [{r["step"]: r["grad_norm"] for r in map(json.loads, lines)} for lines in logs]
    rel = 1e-2 if extra.get("dtype") == "bf16" else 1e-5  # bf16 sums in another order
    for step in one:  # AdamW hides a gradient's scale from the losses; the logged norm does not
        assert norms[1][step] == pytest.approx(norms[0][step], rel=max(rel, 1e-4))
        assert two[step][0] == pytest.approx(one[step][0], rel=rel)
        assert (two[step][1] is None) == (one[step][1] is None)
        if one[step][1] is not None:
            assert two[step][1] == pytest.approx(one[step][1], rel=rel)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "two" / "model").model(IDS).float(),
                                   load_model(tmp_path / "one" / "model").model(IDS).float(),
                                   atol=1e-4 if rel < 1e-3 else 5e-2, rtol=0)
    if fsdp:  # resumed from the checkpoint before the last, the sharded run redoes its steps exactly
        from camelid.train.checkpoint import list_checkpoints

        def records():
            return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                    for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]

        before = records()
        kept = list_checkpoints(tmp_path / "two")
        kept[-1].unlink()
        run = subprocess.run(torchrun + ["--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"resumed from {kept[-2]}" in run.stdout and records() == before
