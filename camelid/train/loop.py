"""The one training loop every recipe runs (pretraining, instruction tuning, preference tuning): AdamW with
warmup and decay, gradient accumulation over micro-batches that ranks split between them, clipping, mixed
precision, a step log with a loss plot, checkpoints every N steps and on SIGTERM/SIGINT, and exact resumption.

What differs between recipes, the objective, comes in a `Job`: the micro-batches of a step, the loss of one,
and what a checkpoint keeps of the model."""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from camelid.errors import CamelidError, Preempted
from camelid.files import atomic_file
from camelid.train.checkpoint import LOG, checkpoint_to_resume, prepare_run_folder, truncate_log, write_checkpoint
from camelid.train.config import RunConfig
from camelid.train.distributed import Cluster, close_cluster, gather, init_cluster, no_sync, reshard, sum_across
from camelid.train.schedule import lr_at


@dataclass
class Job:
    """A recipe's objective, for the loop to run."""
    name: str  # the progress bar's label
    model: torch.nn.Module  # as wrapped for the cluster: its trainable parameters are clipped and stepped
    optimizer: torch.optim.Optimizer
    max_steps: int
    # (step, this rank's micro-batch indices) -> those micro-batches
    micro_batches: Callable[[int, list[int]], list]
    # a micro-batch -> its share of the step's loss (the shares of the global batch sum to the step's loss) and
    # the number of tokens it holds
    loss: Callable[[Any], tuple[torch.Tensor, int]]
    save: Callable[[], dict]  # what a checkpoint keeps besides the step and RNG (collective; full on rank 0)
    check: Callable[[Path, dict], None]  # raises CamelidError for a checkpoint of another run
    load: Callable[[Path, dict], None]  # restores what `save` kept
    # the validation loss, or a dict of val_ fields with val_loss (None on ranks that do not compute it)
    evaluate: Callable[[], float | dict | None] | None = None
    report: Callable[[dict], None] = lambda record: None  # adds the recipe's fields to every step's record
    extras: Callable[[int], dict] = lambda step: {}  # occasional fields of a step (a sample), logged when given
    optimizer_step: Callable[[], Any] | None = None  # optimizer.step, or a compiled version of it
    stats: dict = field(default_factory=dict)  # what the recipe wants to print at the start


def autocast_dtype(dtype: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D parameters) are never decayed."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device
                   ) -> tuple[torch.optim.Optimizer, Callable[[], Any]]:
    """AdamW and its step. On CUDA AdamW has a fused kernel; elsewhere `compile` makes one of the step, and
    the learning rate is then a tensor so that a new value is not a new graph."""
    compile_step = cfg.compile and device.type != "cuda" and cfg.dtype != "fp16"
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), betas=(cfg.beta1, cfg.beta2),
                                  lr=torch.tensor(cfg.lr) if compile_step else cfg.lr, fused=device.type == "cuda")
    return optimizer, torch.compile(optimizer.step) if compile_step else optimizer.step


def in_cluster(run: Callable, cfg: RunConfig, *args, **kwargs):
    """`run(cfg, *args, cluster, device, **kwargs)` in the process group torchrun describes (none without
    torchrun)."""
    cluster, device = init_cluster(cfg.device)
    finished = False
    try:
        result = run(cfg, *args, cluster, device, **kwargs)
        finished = True
        return result
    finally:
        close_cluster(cluster, finished)


def start_run(cfg: RunConfig, cluster: Cluster) -> Path:
    """The run's folder, checked and claimed before anything slow happens."""
    if cfg.grad_accum % cluster.world:
        raise CamelidError(f"grad_accum {cfg.grad_accum} must be a multiple of the number of processes "
                           f"({cluster.world}) so the global batch stays micro_batch x grad_accum")
    out = Path(cfg.out_dir)
    prepare_run_folder(out, cluster.main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return out


def train_loop(job: Job, cfg: RunConfig, cluster: Cluster, device: torch.device, out: Path,
               resume: str | None = None, on_eval: Callable[[int, float], None] | None = None):
    """Runs the job to job.max_steps, or stops after a checkpoint with `Preempted` when a signal comes.
    Every rank runs it; the global batch (micro_batch x grad_accum) is the same for any number of processes,
    so losses match a single-process run. `on_eval(step, val_loss)` sees each validation."""
    step = resume_run(job, resume, out, cluster) if resume else 0
    log_path = out / LOG
    if step == 0 and cluster.main:  # a fresh start, also `--resume auto` before the first checkpoint
        log_path.unlink(missing_ok=True)
        (out / "loss.png").unlink(missing_ok=True)
    scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "fp16" else None  # fp16 gradients underflow
    optimizer_step = job.optimizer_step or job.optimizer.step
    params = [p for p in job.model.parameters() if p.requires_grad]
    local_micro = list(range(cluster.rank, cfg.grad_accum, cluster.world))
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # finish the current step, checkpoint, then exit

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=job.max_steps, initial=step, desc=job.name, unit="step", disable=None if cluster.main else True)
    stopped, log = False, None
    try:
        log = open(log_path, "a") if cluster.main else None
        while step < job.max_steps and not stopped:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, job.max_steps)
            for group in job.optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            job.model.train()
            loss, tokens = _accumulate(job, job.micro_batches(step, local_micro), cfg, cluster, scaler)
            loss, tokens = sum_across(loss.item(), cluster, device), int(sum_across(tokens, cluster, device))
            if not math.isfinite(loss) and scaler is None:  # fp16's scaler skips such steps itself
                raise CamelidError(f"step {step + 1}: the loss is {loss}; the step was not applied (lower lr, or "
                                   f"beta for a preference objective); the checkpoints in {out} are untouched")
            if scaler:
                scaler.unscale_(job.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            norm = norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
            if scaler:
                scaler.step(job.optimizer)
                scaler.update()
            else:
                optimizer_step()
            job.optimizer.zero_grad(set_to_none=True)
            step += 1
            last = step == job.max_steps
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                      "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}
            job.report(record)
            occasional = _evaluate(job, step, last, cfg, on_eval) | job.extras(step)
            if occasional:
                record.update(occasional)
                reshard(job.model)
            # Every rank must agree to stop at the same step: the checkpoint below is collective.
            stopped = sum_across(float(stop["signal"] is not None), cluster, device) > 0
            if log and (step % cfg.log_every == 0 or occasional or last):
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if step % cfg.ckpt_every == 0 or last or stopped:
                save_run(job, out, step, cfg, cluster)
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


def _evaluate(job: Job, step: int, last: bool, cfg: RunConfig, on_eval) -> dict:
    if not job.evaluate or not (step % cfg.eval_every == 0 or last):
        return {}
    result = job.evaluate()
    if result is None:
        return {}
    # a language-modelling loss (a perplexity means something), or a recipe's own fields with its val_loss
    fields = result if isinstance(result, dict) else {"val_loss": result, "val_ppl": math.exp(min(result, 50))}
    if on_eval:
        on_eval(step, fields["val_loss"])
    return fields


def _accumulate(job: Job, batches: list, cfg: RunConfig, cluster: Cluster, scaler) -> tuple[torch.Tensor, int]:
    """Forward and backward over this rank's micro-batches of a step; returns its share of the loss (summed on
    the device: no sync per micro-batch) and of the tokens."""
    total, tokens = None, 0
    for i, batch in enumerate(batches):
        with no_sync(job.model, cfg.fsdp, sync=i == len(batches) - 1):
            share, n = job.loss(batch)
            scaled = share * cluster.world  # DDP and FSDP average gradients over ranks; the shares are summed
            (scaler.scale(scaled) if scaler else scaled).backward()
        total = share.detach() if total is None else total + share.detach()
        tokens += n
    return total, tokens


def save_run(job: Job, out: Path, step: int, cfg: RunConfig, cluster: Cluster) -> Path | None:
    """Collective: every rank contributes its shards and RNG state; rank 0 writes the file."""
    state = job.save()
    rng = gather({"torch": torch.get_rng_state(),
                  **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}, cluster)
    if not cluster.main:
        return None
    return write_checkpoint(out, step, {"step": step, **state, "rng": rng}, cfg.keep_last)


def resume_run(job: Job, resume: str, out: Path, cluster: Cluster) -> int:
    """Restores the job's state and this rank's RNG; returns the step to continue from (0: a fresh start)."""
    found = checkpoint_to_resume(resume, out, job.check)
    if found is None:
        return 0
    path, state = found
    job.load(path, state)
    rng = state["rng"]
    if len(rng) == cluster.world:  # with another world size the data order is the same but dropout is not
        mine = rng[cluster.rank] if isinstance(rng[cluster.rank], dict) else {"torch": rng[cluster.rank]}
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
    if cluster.main:
        truncate_log(out / LOG, state["step"])  # steps after the checkpoint are redone
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]


def plot_loss(log_path: Path, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
