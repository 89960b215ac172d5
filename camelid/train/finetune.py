"""Instruction tuning, the way Stanford Alpaca and Vicuna did it: full fine-tuning or LoRA, with the loss
only on what the model must learn to say.

Samples are rendered with the chat template `camelid chat` uses and masked on tokens
(`camelid.data.masking`), optionally packed several to a row (`camelid.data.packing`). The data order is a
function of (seed, epoch), so a run resumed mid-epoch continues at the same sample. The result is a camelid
model folder that records the template and stop strings it was trained with; a LoRA run also writes the
adapter in PEFT's layout."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.data.corpus import is_validation
from camelid.data.instruct import Skipped, load_conversations
from camelid.data.masking import IGNORE, MaskStats, mask_conversation
from camelid.data.packing import Row, collate, pack_samples, unpacked_rows
from camelid.errors import CamelidError, Preempted
from camelid.formats.load import load_model, save_native
from camelid.formats.loaded import LoadedModel
from camelid.formats.peft import load_adapter, save_adapter
from camelid.model.lora import LoRAConfig, add_lora, merge_lora
from camelid.model.quant import QUANTIZED, QuantSpec
from camelid.tokenizer.chat_template import resolve_template
from camelid.train.checkpoint import LOG, checkpoint_to_resume, prepare_run_folder, truncate_log, write_checkpoint
from camelid.train.config import FinetuneConfig
from camelid.train.distributed import (
    Cluster,
    close_cluster,
    full_trainable_state,
    gather,
    init_cluster,
    load_full_trainable_state,
    no_sync,
    reshard,
    sum_across,
    wrap,
)
from camelid.train.schedule import lr_at
from camelid.train.trainer import param_groups, plot_loss


def build_rows(cfg: FinetuneConfig, lm: LoadedModel, template: str) -> tuple[list[Row], list[Row], dict]:
    """Masked (and packed) training and validation rows, plus counts for the log."""
    skipped, stats = Skipped(), MaskStats()
    records = load_conversations(cfg.data, cfg.format or None, skipped)
    if cfg.val_data:
        train_records, val_records = records, load_conversations(cfg.val_data, cfg.format or None, skipped)
    else:
        key = [json.dumps(c, sort_keys=True) for _, c in records]
        train_records = [r for r, k in zip(records, key) if not is_validation(k, cfg.val_fraction)]
        val_records = [r for r, k in zip(records, key) if is_validation(k, cfg.val_fraction)]

    def rows(items):
        samples = [s for _, conversation in tqdm(items, desc="masking", unit="sample", disable=None)
                   for s in mask_conversation(lm.tokenizer, template, conversation, cfg.max_len, cfg.train_on_prompt,
                                              stats)]
        return pack_samples(samples, cfg.max_len) if cfg.pack else unpacked_rows(samples)

    train_rows, val_rows = rows(train_records), rows(val_records)
    if not train_rows:
        raise CamelidError(f"{cfg.data}: no sample has a token to train on")
    info = {"samples": stats.samples, "sequences": stats.pieces, "truncated": stats.truncated,
            "trained_tokens": stats.trained_tokens, "tokens": stats.tokens, "boundary_merges": stats.boundary_merges,
            "skipped_records": skipped.total, "train_rows": len(train_rows), "val_rows": len(val_rows)}
    return train_rows, val_rows, info


def batch_rows(rows: list[Row], step: int, global_batch: int, seed: int) -> list[Row]:
    """The rows of a step: epoch e is permutation(seed, e) of all rows, and steps walk through it."""
    n = len(rows)
    out = []
    for k in range(step * global_batch, (step + 1) * global_batch):
        epoch, i = divmod(k, n)
        out.append(rows[_order(n, seed, epoch)[i]])
    return out


_ORDERS: dict = {}


def _order(n: int, seed: int, epoch: int) -> list[int]:
    if (n, seed, epoch) not in _ORDERS:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _ORDERS.clear()
        _ORDERS[(n, seed, epoch)] = order
    return _ORDERS[(n, seed, epoch)]


def finetune(cfg: FinetuneConfig, resume: str | None = None) -> Path | None:
    """Tune; returns the model folder (None on ranks other than the main one); a signal stops the run after a
    checkpoint with `Preempted` (resumable with resume="auto").
    Under torchrun each rank runs this with DDP: ranks split each step's micro-batches, so the global batch
    and the losses are those of one process."""
    cfg.validate()
    cluster, device = init_cluster(cfg.device)
    finished = False
    try:
        folder = _finetune(cfg, resume, cluster, device)
        finished = True
        return folder
    finally:
        close_cluster(cluster, finished)


def _finetune(cfg: FinetuneConfig, resume: str | None, cluster: Cluster, device: torch.device) -> Path | None:
    import signal

    if cfg.grad_accum % cluster.world:
        raise CamelidError(f"grad_accum {cfg.grad_accum} must be a multiple of the number of processes "
                           f"({cluster.world}) so the global batch stays micro_batch x grad_accum")
    out = Path(cfg.out_dir)
    prepare_run_folder(out, cluster.main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Full fine-tuning keeps fp32 master weights; LoRA's base is frozen, so it can stay in the compute dtype.
    # QLoRA quantizes the base tensor by tensor as it loads: the float model never sits in memory whole.
    qlora = QuantSpec(cfg.quantize_base, cfg.quantize_group, "float") if cfg.quantize_base else None
    lm = load_model(cfg.base, str(device), cfg.dtype if cfg.method == "lora" else "fp32", quantize=qlora)
    template = cfg.template or lm.template
    if template == "raw":
        raise CamelidError(f"template: {cfg.base} has no chat template; set one (alpaca, vicuna, chatml, llama2, "
                           "llama3 or Jinja source)")
    _, stop = resolve_template(template)
    train_rows, val_rows, info = build_rows(cfg, lm, template)
    if cluster.main:
        print(f"finetune: {info['samples']} samples -> {info['train_rows']} training rows "
              f"({info['trained_tokens']} of {info['tokens']} tokens trained, {info['truncated']} truncated)")
    model = lm.model
    _check_frozen_base(model, cfg)
    model.train().requires_grad_(cfg.method == "full")  # loading prepares a model for inference: frozen
    model.activation_checkpointing = cfg.activation_checkpointing
    torch.manual_seed(cfg.seed)  # the same adapter initialisation on every rank
    if cfg.method == "lora":
        add_lora(model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets)))
    wrapped = wrap(model, cluster, cfg.fsdp, device)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}  # FSDP's shards, once wrapped
    # Compiled, elementwise chains are fused and only what backward needs is kept: less activation memory.
    forward = torch.compile(wrapped, dynamic=True) if cfg.compile else wrapped
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")
    torch.manual_seed(cfg.seed + cluster.rank)  # dropout differs between ranks
    global_batch = cfg.micro_batch * cfg.grad_accum
    max_steps = max(1, math.ceil(len(train_rows) * cfg.epochs / global_batch))
    schedule = _Schedule(cfg, max_steps)
    step = _resume(out, resume, wrapped, trainable, optimizer, cfg, cluster) if resume else 0
    log_path = out / LOG
    if step == 0 and cluster.main:  # a fresh start, also `--resume auto` before the first checkpoint
        log_path.unlink(missing_ok=True)
        (out / "loss.png").unlink(missing_ok=True)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "fp16" else None  # fp16 gradients underflow
    local_micro = list(range(cluster.rank, cfg.grad_accum, cluster.world))
    stop_signal = {"signal": None}
    previous = {s: signal.signal(s, lambda signum, _f: stop_signal.update(signal=signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=max_steps, initial=step, desc=f"finetune ({cfg.method})", unit="step",
               disable=None if cluster.main else True)
    stopped, log = False, None
    try:
        log = open(log_path, "a") if cluster.main else None
        while step < max_steps and not stopped:
            t0 = time.perf_counter()
            lr = lr_at(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = batch_rows(train_rows, step, global_batch, cfg.seed)
            n_trained = sum(t != IGNORE for r in rows for t in r.targets)
            total, tokens = torch.zeros((), device=device), 0  # summed on the device: no sync per micro-batch
            for i, m in enumerate(local_micro):
                batch = {k: v.to(device) for k, v in
                         collate(rows[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]).items()}
                with no_sync(wrapped, cfg.fsdp, sync=i == len(local_micro) - 1):
                    # Summed over trained tokens, divided by those of the whole global batch: every token
                    # weighs the same whatever micro-batch (or rank: DDP averages, hence x world) it landed in.
                    loss = sft_loss(forward, batch, amp_dtype) / max(n_trained, 1)
                    scaled = loss * cluster.world
                    (scaler.scale(scaled) if scaler else scaled).backward()
                total += loss.detach()
                tokens += batch["inputs"].numel()
            total, tokens = sum_across(total.item(), cluster, device), int(sum_across(tokens, cluster, device))
            if scaler:
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.grad_clip or float("inf"))
            norm = norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "epoch": round(step * global_batch / len(train_rows), 3), "loss": total,
                      "lr": lr, "grad_norm": norm,
                      "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}
            # under FSDP every rank runs the (collective) forward; under DDP rank 0 alone
            if (cluster.main or cfg.fsdp) and val_rows and (step % cfg.eval_every == 0 or step == max_steps):
                record["val_loss"] = evaluate(model, val_rows, cfg, device, amp_dtype)
                reshard(model)
            # Every rank must agree to stop at the same step: the checkpoint gathers every rank's RNG.
            stopped = sum_across(float(stop_signal["signal"] is not None), cluster, device) > 0
            if log and (step % cfg.log_every == 0 or "val_loss" in record or step == max_steps):
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if step % cfg.ckpt_every == 0 or step == max_steps or stopped:
                _save(out, step, wrapped, trainable, optimizer, cfg, cluster)
                if cluster.main:
                    plot_loss(log_path, out / "loss.png")
    finally:
        bar.close()
        if log:
            log.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        raise Preempted(f"stopped by a signal at step {step} after a checkpoint; resume with --resume auto")
    sharded = cfg.fsdp and cluster.world > 1
    if sharded:  # collective: rank 0 gathers the trained weights into an unsharded copy
        params, _ = full_trainable_state(wrapped, None, trainable)
        lm.model = model = wrapped = forward = optimizer = None
        model = _unsharded(cfg, params) if cluster.main else None
    if not cluster.main:
        return None
    model.eval().requires_grad_(False)
    if cfg.method == "lora":
        adapter = save_adapter(model, out / "adapter", cfg.base)
        if cfg.quantize_base and not sharded:  # merge into the float weights the quantized copy was made from
            lm.model = model = wrapped = forward = optimizer = None
            model = load_adapter(load_model(cfg.base, "cpu", cfg.dtype).model, adapter)
        merge_lora(model)
    save_native(LoadedModel(model.cpu(), lm.tokenizer, template, stop), out / "model", template, stop,
                force=True)  # the run's own output
    return out / "model"


def _unsharded(cfg: FinetuneConfig, params: dict):
    """The tuned model in one piece on the CPU, from the base and the gathered trained weights. Under QLoRA the
    base is the float one the quantized copy was made from, which the adapter is merged into."""
    model = load_model(cfg.base, "cpu", cfg.dtype if cfg.method == "lora" else "fp32").model
    if cfg.method == "lora":
        add_lora(model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets)))
    unexpected = model.load_state_dict(params, strict=False).unexpected_keys
    if unexpected:  # the same base and config made both: a mismatch is a bug, not bad input
        raise RuntimeError(f"gathered weights the model does not have: {unexpected[:3]}")
    return model


def _check_frozen_base(model, cfg: FinetuneConfig) -> None:
    """A quantized base (a camelid int4 folder, a GGUF file, or QLoRA's) can only be trained through LoRA."""
    if cfg.method == "full" and any(isinstance(m, QUANTIZED) for m in model.modules()):
        raise CamelidError(f"base: {cfg.base} is quantized, so its weights cannot be trained; use method: lora")


def sft_loss(model, batch: dict, amp_dtype=None) -> torch.Tensor:
    """Summed cross-entropy over the trained tokens; logits are computed for those positions only."""
    trained = batch["targets"] != IGNORE
    device_type = batch["inputs"].device.type
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(batch["inputs"], segment_ids=batch.get("segments"), logits_at=trained)
    return F.cross_entropy(logits.float(), batch["targets"][trained], reduction="sum")


class _Schedule:
    """The pretraining schedule's inputs, with warmup given as a share of the run."""

    def __init__(self, cfg: FinetuneConfig, max_steps: int):
        self.lr, self.min_lr, self.schedule = cfg.lr, cfg.min_lr, cfg.schedule
        self.decay_every, self.decay_gamma = cfg.decay_every, cfg.decay_gamma
        self.max_steps = max_steps
        self.warmup_steps = math.ceil(cfg.warmup_ratio * max_steps)


@torch.no_grad()
def evaluate(model, rows: list[Row], cfg: FinetuneConfig, device, amp_dtype) -> float:
    """Mean loss per trained token over the validation rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), cfg.micro_batch):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + cfg.micro_batch]).items()}
        total += sft_loss(model, batch, amp_dtype).item()
        count += int((batch["targets"] != IGNORE).sum())
    model.train()
    return total / max(count, 1)


def _save(out: Path, step: int, model, trainable: dict, optimizer, cfg: FinetuneConfig, cluster: Cluster):
    """Only what changes is saved (for LoRA, megabytes instead of the whole base model). Collective: shards are
    gathered (FSDP) and every rank's RNG state is kept; rank 0 writes the file."""
    import dataclasses

    params, optimizer_state = full_trainable_state(model, optimizer, trainable)
    rng = gather(torch.get_rng_state(), cluster)
    if not cluster.main:
        return
    state = {"step": step, "trainable": params, "optimizer": optimizer_state, "rng": rng,
             "config": dataclasses.asdict(cfg)}
    write_checkpoint(out, step, state, cfg.keep_last)


def _resume(out: Path, resume: str, model, trainable: dict, optimizer, cfg: FinetuneConfig,
            cluster: Cluster) -> int:
    def same_run(path: Path, state: dict):
        saved = state.get("trainable") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or set(saved) != set(trainable) or any(  # an FSDP shard's shape is the
                saved[n].shape != p.shape for n, p in trainable.items()):  # whole tensor's
            raise CamelidError(f"{path}: a checkpoint of another model or method")

    found = checkpoint_to_resume(resume, out, same_run)
    if found is None:
        return 0
    path, state = found
    load_full_trainable_state(model, optimizer, trainable, state["trainable"], state["optimizer"], str(path))
    if len(state["rng"]) == cluster.world:  # with another world size the data order is the same, dropout is not
        torch.set_rng_state(state["rng"][cluster.rank])
    if cluster.main:
        truncate_log(out / LOG, state["step"])
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]
