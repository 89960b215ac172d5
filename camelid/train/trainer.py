"""The pretraining loop: AdamW, warmup + decay, gradient accumulation and clipping, mixed precision,
atomic checkpoints (every N steps and on SIGTERM/SIGINT) and exact resumption."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.data.shards import TokenShards, file_digest
from camelid.errors import CamelidError, Preempted
from camelid.files import atomic_file
from camelid.model.config import ModelConfig, preset
from camelid.model.transformer import Transformer, count_parameters, init_weights
from camelid.train.checkpoint import LOG, checkpoint_to_resume, prepare_run_folder, truncate_log, write_checkpoint
from camelid.train.config import TrainConfig
from camelid.train.distributed import (
    Cluster,
    close_cluster,
    full_state,
    gather,
    init_cluster,
    load_full_state,
    no_sync,
    reshard,
    sum_across,
    wrap,
)
from camelid.train.schedule import lr_at


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    spec = dict(cfg.model)
    base = preset(spec.pop("preset")).to_dict() if "preset" in spec else {}
    base.update(spec)
    base.setdefault("max_seq_len", cfg.seq_len)
    base["vocab_size"] = vocab_size
    return ModelConfig.from_dict(base, "model")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D parameters) are never decayed."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """The machine's own matmul throughput, the denominator of MFU (no hard-coded peak): the best of
    several short windows, so a moment of contention does not lower it. A GPU reaches its peak only on
    large products (1024^3 is a few microseconds there, launch-bound)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the training RNG stream
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    a @ b
    best = 0.0
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            a @ b
            n += 1
            if device.type == "cuda":  # else the loop queues seconds of products before the clock stops
                torch.cuda.synchronize()
        best = max(best, 2 * size ** 3 * n / (time.perf_counter() - t0))
    return best


def flops_per_token(mcfg: ModelConfig, seq_len: int) -> float:
    """PaLM appendix B: 6N for the matmuls plus attention over the context. N leaves out the input embedding
    table (a lookup, not a matmul) unless it is tied to the output layer."""
    n = count_parameters(mcfg) - (0 if mcfg.tie_embeddings else mcfg.vocab_size * (mcfg.embed_proj_dim or mcfg.dim))
    return 6 * n + 12 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * seq_len


def save_checkpoint(out: Path, step: int, model, optimizer, cfg: TrainConfig, mcfg: ModelConfig,
                    cluster: Cluster) -> Path | None:
    """Collective: every rank contributes its shards and RNG state; rank 0 writes the file."""
    model_state, optimizer_state = full_state(model, optimizer)
    rng = gather({"torch": torch.get_rng_state(),
                  **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}, cluster)
    if not cluster.main:
        return None
    state = {"step": step, "model": model_state, "optimizer": optimizer_state, "rng": rng,
             "train_config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict()}
    return write_checkpoint(out, step, state, cfg.keep_last)


def resume_from(resume: str, out: Path, model, optimizer, mcfg: ModelConfig, cluster: Cluster) -> int:
    """Restore model, optimizer and this rank's RNG; returns the step to continue from (0: fresh start)."""

    def same_model(path: Path, state: dict):
        if not isinstance(state, dict) or "model" not in state:
            raise CamelidError(f"{path}: not a camelid pretraining checkpoint")
        if state.get("model_config") != mcfg.to_dict():
            diff = sorted(k for k in mcfg.to_dict() if state.get("model_config", {}).get(k) != mcfg.to_dict()[k])
            raise CamelidError(f"{path}: checkpoint of another model (differs in {', '.join(diff[:4])})")

    found = checkpoint_to_resume(resume, out, same_model)
    if found is None:
        return 0
    path, state = found
    load_full_state(model, optimizer, state["model"], state["optimizer"], str(path))
    rng = state["rng"]
    if len(rng) == cluster.world:  # with another world size the data order is the same but dropout is not
        torch.set_rng_state(rng[cluster.rank]["torch"])
        if "cuda" in rng[cluster.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[cluster.rank]["cuda"])
    if cluster.main:
        truncate_log(out / LOG, state["step"])  # steps after the checkpoint are redone
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]


def train(cfg: TrainConfig, resume: str | None = None, on_eval: Callable[[int, float], None] | None = None
          ) -> Path | None:
    """Train; returns the exported model folder (None on ranks other than the main one). A signal stops the
    run after a checkpoint with `Preempted` (resumable).
    Under torchrun each rank runs this; the global batch (micro_batch x grad_accum) is the same for any
    number of processes, so losses match a single-process run. `on_eval(step, val_loss)` sees each
    validation (a sweep uses it to prune a trial by raising)."""
    cluster, device = init_cluster(cfg.device)
    finished = False
    try:
        folder = _train(cfg, resume, cluster, device, on_eval)
        finished = True
        return folder
    finally:
        close_cluster(cluster, finished)


def _train(cfg: TrainConfig, resume: str | None, cluster: Cluster, device: torch.device,
           on_eval: Callable[[int, float], None] | None = None) -> Path | None:
    if cfg.grad_accum % cluster.world:
        raise CamelidError(f"grad_accum {cfg.grad_accum} must be a multiple of the number of processes "
                           f"({cluster.world}) so the global batch stays micro_batch x grad_accum")
    out = Path(cfg.out_dir)
    prepare_run_folder(out, cluster.main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_data = TokenShards(cfg.data)
    val_data = TokenShards(cfg.val_data) if cfg.val_data else None
    if val_data and val_data.index.get("tokenizer") != train_data.index.get("tokenizer"):
        raise CamelidError(f"{cfg.val_data}: made with another tokenizer than {cfg.data}")
    tokenizer = _tokenizer(cfg, train_data)
    mcfg = model_config(cfg, train_data.vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise CamelidError(f"seq_len {cfg.seq_len} is longer than the model's context {mcfg.max_seq_len}")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw = init_weights(Transformer(mcfg)).to(device)
    raw.activation_checkpointing = cfg.activation_checkpointing
    model = wrap(raw, cluster, cfg.fsdp, device)
    # On CUDA AdamW has a fused kernel; elsewhere `compile` makes one of the step, and the learning rate is then
    # a tensor so that a new value is not a new graph.
    compile_step = cfg.compile and device.type != "cuda" and cfg.dtype != "fp16"
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), betas=(cfg.beta1, cfg.beta2),
                                  lr=torch.tensor(cfg.lr) if compile_step else cfg.lr, fused=device.type == "cuda")
    torch.manual_seed(cfg.seed + cluster.rank)  # dropout differs between ranks
    log_path = out / LOG
    step = resume_from(resume, out, model, optimizer, mcfg, cluster) if resume else 0
    if step == 0 and cluster.main:  # a fresh start, also `--resume auto` before the first checkpoint
        log_path.unlink(missing_ok=True)
        (out / "loss.png").unlink(missing_ok=True)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "fp16" else None
    # Measured before torch.compile starts its compile workers, which would compete for the cores.
    peak = measure_peak_flops(device, amp_dtype or torch.float32) * cluster.world

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))

    # Compiling the loss with the model fuses the upcast and log-softmax over the vocabulary too.
    compute_loss = torch.compile(loss_of, mode=cfg.compile_mode) if cfg.compile else loss_of
    optimizer_step = torch.compile(optimizer.step) if compile_step else optimizer.step
    flops = flops_per_token(mcfg, cfg.seq_len)
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * cfg.seq_len
    local_micro = list(range(cluster.rank, cfg.grad_accum, cluster.world))
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # finish the current step, checkpoint, then exit

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretraining", unit="step",
               disable=None if cluster.main else True)
    stopped, log = False, None
    try:
        log = open(log_path, "a") if cluster.main else None
        while step < cfg.max_steps and not stopped:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            model.train()
            total = torch.zeros((), device=device)  # summed on the device: no sync per micro-batch
            for i, micro in enumerate(local_micro):
                first = (step * cfg.grad_accum + micro) * cfg.micro_batch
                x, y = (t.to(device) for t in train_data.batch(first, cfg.micro_batch, cfg.seq_len, cfg.seed))
                with no_sync(model, cfg.fsdp, sync=i == len(local_micro) - 1):
                    loss = compute_loss(x, y)
                    # Gradients are averaged over ranks, so each rank divides by its own share of micro-batches.
                    scaled = loss / len(local_micro)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                total += loss.detach() / cfg.grad_accum
            total = sum_across(total.item(), cluster, device)
            if scaler:
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            norm = norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer_step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tps = tokens_per_step / (time.perf_counter() - t0)
            record = {"step": step, "loss": total, "lr": lr, "grad_norm": norm, "tokens_per_s": round(tps, 1),
                      "mfu": round(tps * flops / peak, 4)}
            if val_data and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                record["val_loss"] = evaluate(model, val_data, cfg, device, amp_dtype, cluster)
                record["val_ppl"] = math.exp(min(record["val_loss"], 50))
                if on_eval:
                    on_eval(step, record["val_loss"])
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
                record["sample"] = sample_text(model, tokenizer, cfg, device, mcfg.max_seq_len)
                if cluster.main:
                    tqdm.write(f"step {step} sample: {record['sample']!r}")
            # Every rank must agree to stop at the same step: the checkpoint below is collective.
            stopped = sum_across(float(stop["signal"] is not None), cluster, device) > 0
            if log and (step % cfg.log_every == 0 or "val_loss" in record or "sample" in record
                        or step == cfg.max_steps):
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopped:
                save_checkpoint(out, step, model, optimizer, cfg, mcfg, cluster)
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
    model_state, _ = full_state(model)
    if not cluster.main:
        return None
    final = Transformer(mcfg)
    final.load_state_dict(model_state)
    return export_model(final, tokenizer, out / "model")


def _tokenizer(cfg: TrainConfig, data: TokenShards):
    """The tokenizer the final model ships with; it must be the one the shards were made with."""
    from camelid.tokenizer.tokenizer import load_tokenizer_file

    if not cfg.tokenizer:
        raise CamelidError("tokenizer: needed to write a model folder that chat/generate can load")
    made_with = data.index.get("tokenizer")
    if made_with and made_with != file_digest(cfg.tokenizer):
        raise CamelidError(f"{cfg.tokenizer}: not the tokenizer the shards in {cfg.data} were made with")
    return load_tokenizer_file(cfg.tokenizer)


@torch.no_grad()
def sample_text(model, tokenizer, cfg: TrainConfig, device, context: int) -> str:
    """A short sample from the model as it trains (every rank runs it: under FSDP the forward is collective).
    No KV cache, so it works on any wrapped model; the samples are short."""
    from camelid.generate.sampling import SamplingParams, make_generator, sample

    model.eval()
    ids = tokenizer.encode(cfg.sample_prompt, bos=tokenizer.add_bos) if cfg.sample_prompt else []
    ids = ids or [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_ids[0]]
    params = SamplingParams(temperature=0.8, top_k=40, seed=cfg.seed)
    gen, out = make_generator(params.seed, device), []
    for _ in range(cfg.sample_tokens):
        window = torch.tensor([(ids + out)[-context:]], device=device)
        logits = model(window)[:, -1].float()
        token = int(sample(logits, params, [ids + out], gen)[0])
        if token in tokenizer.eos_ids:
            break
        out.append(token)
    model.train()
    reshard(model)
    return tokenizer.decode(out)


@torch.no_grad()
def evaluate(model, data: TokenShards, cfg: TrainConfig, device, amp_dtype, cluster: Cluster) -> float:
    """Mean loss over fixed validation windows (the same every time, so curves compare), split over ranks."""
    model.eval()
    total = 0.0
    # Every rank runs as many forwards (under FSDP each is collective); a rank past the end repeats a batch
    # it does not count.
    for b in range(cluster.rank, -(-cfg.eval_batches // cluster.world) * cluster.world, cluster.world):
        x, y = (t.to(device) for t in data.batch(b % cfg.eval_batches * cfg.micro_batch, cfg.micro_batch,
                                                 cfg.seq_len, seed=0))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        if b < cfg.eval_batches:
            total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)).item()
    model.train()
    reshard(model)
    return sum_across(total, cluster, device) / cfg.eval_batches


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


def export_model(model, tokenizer, folder: Path) -> Path:
    from camelid.formats.load import save_native
    from camelid.formats.loaded import LoadedModel

    model.eval().requires_grad_(False)
    save_native(LoadedModel(model.cpu(), tokenizer, "raw"), folder, force=True)  # the run's own output
    return folder
