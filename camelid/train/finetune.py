"""Instruction tuning, the way Stanford Alpaca and Vicuna did it: full fine-tuning or LoRA, with the loss
only on what the model must learn to say; and the preference tuning that follows it (`camelid.train.preference`).

Samples are rendered with the chat template `camelid chat` uses and masked on tokens
(`camelid.data.masking`), optionally packed several to a row (`camelid.data.packing`). The data order is a
function of (seed, epoch), so a run resumed mid-epoch continues at the same sample. The result is a camelid
model folder that records the template and stop strings it was trained with; a LoRA run also writes the
adapter in PEFT's layout."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.data.corpus import is_validation
from camelid.data.instruct import Skipped, load_conversations
from camelid.data.masking import IGNORE, MaskStats, mask_conversation
from camelid.data.packing import Row, collate, collate_seq2seq, pack_samples, seq2seq_rows, unpacked_rows
from camelid.errors import CamelidError
from camelid.formats.load import load_model, save_native
from camelid.formats.loaded import LoadedModel, require_plain_positions, require_policy
from camelid.formats.peft import check_targets, load_adapter, save_adapter
from camelid.model.lora import LoRAConfig, add_lora, merge_lora
from camelid.model.quant import QUANTIZED, QuantSpec
from camelid.model.transformer import add_score_head
from camelid.tokenizer.chat_template import resolve_template
from camelid.train import preference
from camelid.train.config import FinetuneConfig
from camelid.train.distributed import Cluster, full_trainable_state, load_full_trainable_state, wrap
from camelid.train.loop import Job, autocast, autocast_dtype, in_cluster, make_optimizer, start_run, train_loop


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
        if lm.config.n_encoder_layers:  # the prompt to the encoder, each reply to the decoder: nothing to pack
            return seq2seq_rows(samples, lm.tokenizer.eos_ids[0] if lm.tokenizer.eos_ids else None)
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
    checkpoint with `Preempted` (resumable with resume="auto"). Under torchrun each rank runs this."""
    cfg.validate()
    return in_cluster(_finetune, cfg, resume)


def _finetune(cfg: FinetuneConfig, resume: str | None, cluster: Cluster, device: torch.device) -> Path | None:
    out = start_run(cfg, cluster)
    # Full fine-tuning keeps fp32 master weights; LoRA's base is frozen, so it can stay in the compute dtype.
    # QLoRA quantizes the base tensor by tensor as it loads: the float model never sits in memory whole.
    qlora = QuantSpec(cfg.quantize_base, cfg.quantize_group, "float") if cfg.quantize_base else None
    lm = require_policy(load_model(cfg.base, str(device), cfg.dtype if cfg.uses_lora else "fp32", quantize=qlora),
                        cfg.base)
    require_plain_positions(lm, cfg.base, "fine-tuning")
    if lm.config.n_encoder_layers and (cfg.objective != "sft" or cfg.fsdp):
        raise CamelidError(f"base: {cfg.base} is an encoder-decoder (T5), which trains with the sft objective, "
                           "full or LoRA (no preference objectives or FSDP yet)")
    template = cfg.template or lm.template
    if template == "raw":
        raise CamelidError(f"template: {cfg.base} has no chat template; set one (alpaca, vicuna, chatml, llama2, "
                           "llama3 or Jinja source)")
    _, stop = resolve_template(template)
    if cfg.objective == "sft":
        train_rows, val_rows, info = build_rows(cfg, lm, template)
        if cluster.main:
            print(f"finetune: {info['samples']} samples -> {info['train_rows']} training rows "
                  f"({info['trained_tokens']} of {info['tokens']} tokens trained, {info['truncated']} truncated)")
    else:
        train_items, val_items = preference.build_items(cfg, lm, template, cluster.main)
    model = lm.model
    _check_frozen_base(model, cfg)
    model.train().requires_grad_(not cfg.uses_lora)  # loading prepares a model for inference: frozen
    model.activation_checkpointing = cfg.activation_checkpointing
    torch.manual_seed(cfg.seed)  # the same adapter initialisation on every rank
    if cfg.uses_lora:
        lora = LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets))
        lora.validate()
        check_targets(model.cfg, lora.targets)  # the adapter is written at the end: refuse now, not then
        add_lora(model, lora)
    if cfg.method == "reward":  # a new head, trained with the adapter or with all weights
        add_score_head(model).score.requires_grad_(True)
    if cfg.objective == "sft":
        wrapped = wrap(model, cluster, cfg.fsdp, device)
        job = sft_job(cfg, wrapped, model, train_rows, val_rows, cluster, device)
    else:
        refs = preference.references(cfg, model, train_items, val_items, out, device, cluster)
        wrapped = wrap(model, cluster, cfg.fsdp, device)
        job = preference.preference_job(cfg, wrapped, model, train_items, val_items, refs, cluster, device)
    train_loop(job, cfg, cluster, device, out, resume)
    sharded = cfg.fsdp and cluster.world > 1
    if sharded or (cfg.quantize_base and cfg.method == "reward"):  # rank 0 gathers the trained weights (collective)
        params, _ = full_trainable_state(wrapped, None, trainable_parameters(model))
        lm.model = model = wrapped = job = None
        model = _unsharded(cfg, params) if cluster.main else None
    if not cluster.main:
        return None
    model.eval().requires_grad_(False)
    if cfg.uses_lora:
        if cfg.method != "reward":  # PEFT's causal-LM adapter has no place for a reward model's new head
            adapter = save_adapter(model, out / "adapter", cfg.base)
            if cfg.quantize_base and not sharded:  # merge into the float weights the quantized copy came from
                lm.model = model = wrapped = job = None
                model = load_adapter(load_model(cfg.base, "cpu", cfg.dtype).model, adapter)
        merge_lora(model)
    save_native(LoadedModel(model.cpu(), lm.tokenizer, template, stop), out / "model", template, stop,
                force=True)  # the run's own output
    return out / "model"


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """By name; once FSDP has wrapped the model, its shards."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def sft_job(cfg: FinetuneConfig, wrapped, model, train_rows: list[Row], val_rows: list[Row], cluster: Cluster,
            device: torch.device) -> Job:
    """The masked next-token objective over (packed) rows, for the training loop. Only what trains is saved
    in a checkpoint (for LoRA, megabytes instead of the whole base model)."""
    trainable = trainable_parameters(model)
    # Compiled, elementwise chains are fused and only what backward needs is kept: less activation memory.
    forward = torch.compile(wrapped, dynamic=True, mode=cfg.compile_mode) if cfg.compile else wrapped
    optimizer, optimizer_step = make_optimizer(model, cfg, device)
    torch.manual_seed(cfg.seed + cluster.rank)  # dropout differs between ranks
    amp_dtype = autocast_dtype(cfg.dtype)
    global_batch = cfg.micro_batch * cfg.grad_accum
    max_steps = max(1, math.ceil(len(train_rows) * cfg.epochs / global_batch))

    def micro_batches(step: int, micro: list[int]) -> list:
        rows = batch_rows(train_rows, step, global_batch, cfg.seed)
        n_trained = sum(t != IGNORE for r in rows for t in r.targets)
        return [(batched(model, rows[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]), n_trained) for m in micro]

    def loss(item) -> tuple[torch.Tensor, int]:
        # Summed over trained tokens, divided by those of the whole global batch: every token weighs the same
        # whatever micro-batch (or rank) it landed in.
        rows, n_trained = item
        batch = {k: v.to(device) for k, v in rows.items()}
        return sft_loss(forward, batch, amp_dtype) / max(n_trained, 1), batch["inputs"].numel()

    def report(record: dict):
        record["epoch"] = round(record["step"] * global_batch / len(train_rows), 3)

    def evaluate() -> float | None:  # under FSDP every rank runs the (collective) forward; under DDP rank 0 alone
        return evaluate_rows(model, val_rows, cfg, device, amp_dtype) if cluster.main or cfg.fsdp else None

    save, check, load = trainable_state_io(cfg, wrapped, optimizer, trainable)
    return Job(f"finetune ({cfg.method})", wrapped, optimizer, max_steps, micro_batches, loss, save, check, load,
               evaluate=evaluate if val_rows else None, report=report, optimizer_step=optimizer_step)


def trainable_state_io(cfg, wrapped, optimizer, trainable: dict) -> tuple:
    """A job's (save, check, load): only what trains is kept (for LoRA, megabytes instead of the whole base),
    and a checkpoint of another model or method is refused."""
    def save() -> dict:
        params, optimizer_state = full_trainable_state(wrapped, optimizer, trainable)
        return {"trainable": params, "optimizer": optimizer_state, "config": dataclasses.asdict(cfg)}

    def check(path: Path, state: dict):
        saved = state.get("trainable") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or set(saved) != set(trainable) or any(  # an FSDP shard's shape is the
                saved[n].shape != p.shape for n, p in trainable.items()):  # whole tensor's
            raise CamelidError(f"{path}: a checkpoint of another model or method")
        method = (state.get("config") or {}).get("method")
        if method is not None and method != cfg.method:
            raise CamelidError(f"{path}: a checkpoint of method {method}, not {cfg.method}")

    def load(path: Path, state: dict):
        load_full_trainable_state(wrapped, optimizer, trainable, state["trainable"], state["optimizer"], str(path))

    return save, check, load


def _unsharded(cfg: FinetuneConfig, params: dict):
    """The tuned model in one piece on the CPU, from the base and the gathered trained weights. Under QLoRA the
    base is the float one the quantized copy was made from, which the adapter is merged into."""
    model = load_model(cfg.base, "cpu", cfg.dtype if cfg.uses_lora else "fp32").model
    if cfg.uses_lora:
        lora = LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets))
        lora.validate()
        check_targets(model.cfg, lora.targets)  # the adapter is written at the end: refuse now, not then
        add_lora(model, lora)
    if cfg.method == "reward":
        add_score_head(model)
    unexpected = model.load_state_dict(params, strict=False).unexpected_keys
    if unexpected:  # the same base and config made both: a mismatch is a bug, not bad input
        raise RuntimeError(f"gathered weights the model does not have: {unexpected[:3]}")
    return model


def _check_frozen_base(model, cfg: FinetuneConfig) -> None:
    """A quantized base (a camelid int4 folder, a GGUF file, or QLoRA's) can only be trained through LoRA."""
    if not cfg.uses_lora and any(isinstance(m, QUANTIZED) for m in model.modules()):
        raise CamelidError(f"base: {cfg.base} is quantized, so its weights cannot be trained; use "
                           + ("method: lora" if cfg.objective == "sft" else "lora: true"))


def batched(model, rows: list[Row]) -> dict[str, torch.Tensor]:
    """The rows as tensors: a decoder's (packed) rows, or an encoder-decoder's sources and replies."""
    if model.cfg.n_encoder_layers:
        return collate_seq2seq(rows, model.cfg.extra.get("decoder_start_token_id", 0))
    return collate(rows)


def sft_loss(model, batch: dict, amp_dtype=None) -> torch.Tensor:
    """Summed cross-entropy over the trained tokens; logits are computed for those positions only (an
    encoder-decoder's: the reply's, the decoder reading it after the source)."""
    trained = batch["targets"] != IGNORE
    with autocast(batch["inputs"].device, amp_dtype):
        if "decoder_inputs" in batch:
            logits = model(batch["decoder_inputs"], source=batch["inputs"], source_mask=batch["source_mask"])[trained]
        else:
            logits = model(batch["inputs"], segment_ids=batch.get("segments"), logits_at=trained)
    return F.cross_entropy(logits.float(), batch["targets"][trained], reduction="sum")


@torch.no_grad()
def evaluate_rows(model, rows: list[Row], cfg: FinetuneConfig, device, amp_dtype) -> float:
    """Mean loss per trained token over the validation rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), cfg.micro_batch):
        batch = {k: v.to(device) for k, v in batched(model, rows[i:i + cfg.micro_batch]).items()}
        total += sft_loss(model, batch, amp_dtype).item()
        count += int((batch["targets"] != IGNORE).sum())
    model.train()
    return total / max(count, 1)
