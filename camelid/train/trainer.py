"""The pretraining loop: AdamW, warmup + decay, gradient accumulation and clipping, mixed precision,
atomic checkpoints (every N steps and on SIGTERM/SIGINT) and exact resumption."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.data.shards import TokenShards
from camelid.errors import CamelidError
from camelid.model.config import ModelConfig, preset
from camelid.model.transformer import Transformer, init_weights
from camelid.train.config import TrainConfig
from camelid.train.schedule import lr_at

CKPT_DIR = "checkpoints"
LOG = "log.jsonl"


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


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024) -> float:
    """The machine's own matmul throughput, the denominator of MFU (no hard-coded peak)."""
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the training RNG stream
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * n / (time.perf_counter() - t0)


def flops_per_token(mcfg: ModelConfig, n_params: int, seq_len: int) -> float:
    # PaLM appendix B: 6N for the matmuls plus attention over the context.
    return 6 * n_params + 12 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * seq_len


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / CKPT_DIR).glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def save_checkpoint(out: Path, step: int, model, optimizer, cfg: TrainConfig, mcfg: ModelConfig, keep_last: int):
    folder = out / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state(), "train_config": dataclasses.asdict(cfg),
             "model_config": mcfg.to_dict()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    path = folder / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoints intact
    for old in _checkpoints(out)[:-keep_last]:
        old.unlink()
    return path


def load_checkpoint(path: Path, mcfg: ModelConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CamelidError(f"{path}: cannot be read as a camelid checkpoint ({str(exc).splitlines()[0]})") from None
    if state.get("model_config") != mcfg.to_dict():
        diff = sorted(k for k in mcfg.to_dict() if state.get("model_config", {}).get(k) != mcfg.to_dict()[k])
        raise CamelidError(f"{path}: checkpoint of another model (differs in {', '.join(diff[:4])})")
    return state


def _truncate_log(path: Path, step: int):
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def train(cfg: TrainConfig, resume: str | None = None) -> Path | None:
    """Train; returns the exported model folder, or None when a signal stopped the run (resumable)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    train_data = TokenShards(cfg.data)
    val_data = TokenShards(cfg.val_data) if cfg.val_data else None
    if val_data and val_data.index.get("tokenizer") != train_data.index.get("tokenizer"):
        raise CamelidError(f"{cfg.val_data}: made with another tokenizer than {cfg.data}")
    mcfg = model_config(cfg, train_data.vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise CamelidError(f"seq_len {cfg.seq_len} is longer than the model's context {mcfg.max_seq_len}")
    torch.manual_seed(cfg.seed)
    model = init_weights(Transformer(mcfg)).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")
    step = 0
    log_path = out / LOG
    if resume:
        path = _checkpoints(out)[-1] if resume == "auto" and _checkpoints(out) else \
            (Path(resume) if resume != "auto" else None)
        if path is not None:
            state = load_checkpoint(path, mcfg)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            step = state["step"]
            _truncate_log(log_path, step)  # steps after the checkpoint are redone
            print(f"resumed from {path} at step {step}")
    elif log_path.exists():
        log_path.unlink()
    forward = torch.compile(model) if cfg.compile else model
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "fp16" else None
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    peak = measure_peak_flops(device, amp_dtype or torch.float32)
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * cfg.seq_len
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # finish the current step, checkpoint, then exit

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretraining", unit="step", disable=None)
    try:
        with open(log_path, "a") as log:
            while step < cfg.max_steps and stop["signal"] is None:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                total = 0.0
                for micro in range(cfg.grad_accum):
                    first = (step * cfg.grad_accum + micro) * cfg.micro_batch
                    x, y = (t.to(device) for t in train_data.batch(first, cfg.micro_batch, cfg.seq_len, cfg.seed))
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = forward(x)
                    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)) / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    total += loss.item()
                if scaler:
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                tps = tokens_per_step / dt
                record = {"step": step, "loss": total, "lr": lr, "grad_norm": norm, "tokens_per_s": round(tps, 1),
                          "mfu": round(tps * flops_per_token(mcfg, n_params, cfg.seq_len) / peak, 4)}
                if val_data and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    record["val_loss"] = evaluate(model, val_data, cfg, device, amp_dtype)
                    record["val_ppl"] = math.exp(min(record["val_loss"], 50))
                if step % cfg.log_every == 0 or "val_loss" in record or step == cfg.max_steps:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
                if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop["signal"] is not None:
                    save_checkpoint(out, step, model, optimizer, cfg, mcfg, cfg.keep_last)
                    plot_loss(log_path, out / "loss.png")
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop["signal"] is not None:
        print(f"stopped by signal {stop['signal']} at step {step}; resume with --resume auto")
        return None
    return export_model(model, cfg, out / "model")


@torch.no_grad()
def evaluate(model, data: TokenShards, cfg: TrainConfig, device, amp_dtype) -> float:
    """Mean loss over fixed validation windows (the same every time, so curves compare)."""
    model.eval()
    losses = []
    for b in range(cfg.eval_batches):
        x, y = (t.to(device) for t in data.batch(b * cfg.micro_batch, cfg.micro_batch, cfg.seq_len, seed=0))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)).item())
    model.train()
    return sum(losses) / len(losses)


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
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


def export_model(model, cfg: TrainConfig, folder: Path) -> Path:
    from camelid.formats.load import LoadedModel, save_native
    from camelid.tokenizer.tokenizer import load_tokenizer_file

    if not cfg.tokenizer:
        raise CamelidError("tokenizer: needed to write a model folder that chat/generate can load")
    model.eval().requires_grad_(False)
    save_native(LoadedModel(model.cpu(), load_tokenizer_file(cfg.tokenizer), "raw"), folder)
    return folder
