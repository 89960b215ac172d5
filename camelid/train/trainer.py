"""Pretraining: a model from scratch on token shards, next-token loss over fixed-length windows, run by the
training loop (`camelid.train.loop`). Logs MFU against the machine's measured matmul throughput and, when
asked, a short sample as it trains."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.data.shards import TokenShards, file_digest
from camelid.errors import CamelidError
from camelid.model.config import ModelConfig, preset
from camelid.model.transformer import Transformer, count_parameters, init_weights
from camelid.train.config import TrainConfig
from camelid.train.distributed import Cluster, full_state, load_full_state, sum_across, wrap
from camelid.train.loop import Job, autocast, autocast_dtype, in_cluster, make_optimizer, start_run, train_loop


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    spec = dict(cfg.model)
    base = preset(spec.pop("preset")).to_dict() if "preset" in spec else {}
    base.update(spec)
    base.setdefault("max_seq_len", cfg.seq_len)
    base["vocab_size"] = vocab_size
    return ModelConfig.from_dict(base, "model")


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


def train(cfg: TrainConfig, resume: str | None = None, on_eval: Callable[[int, float], None] | None = None
          ) -> Path | None:
    """Train; returns the exported model folder (None on ranks other than the main one). A signal stops the
    run after a checkpoint with `Preempted` (resumable). Under torchrun each rank runs this.
    `on_eval(step, val_loss)` sees each validation (a sweep uses it to prune a trial by raising)."""
    return in_cluster(_train, cfg, resume, on_eval=on_eval)


def _train(cfg: TrainConfig, resume: str | None, cluster: Cluster, device: torch.device,
           on_eval: Callable[[int, float], None] | None = None) -> Path | None:
    out = start_run(cfg, cluster)
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
    optimizer, optimizer_step = make_optimizer(model, cfg, device)
    torch.manual_seed(cfg.seed + cluster.rank)  # dropout differs between ranks
    amp_dtype = autocast_dtype(cfg.dtype)
    # Measured before torch.compile starts its compile workers, which would compete for the cores.
    peak = measure_peak_flops(device, amp_dtype or torch.float32) * cluster.world
    flops = flops_per_token(mcfg, cfg.seq_len)

    def loss_of(x, y):
        with autocast(device, amp_dtype):
            logits = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))

    # Compiling the loss with the model fuses the upcast and log-softmax over the vocabulary too.
    compute_loss = torch.compile(loss_of, mode=cfg.compile_mode) if cfg.compile else loss_of

    def micro_batches(step: int, micro: list[int]) -> list:
        return [train_data.batch((step * cfg.grad_accum + m) * cfg.micro_batch, cfg.micro_batch, cfg.seq_len,
                                 cfg.seed) for m in micro]

    def loss(batch) -> tuple[torch.Tensor, int]:
        x, y = (t.to(device) for t in batch)
        return compute_loss(x, y) / cfg.grad_accum, x.numel()

    def report(record: dict):
        record["mfu"] = round(record["tokens_per_s"] * flops / peak, 4)

    def extras(step: int) -> dict:
        if not cfg.sample_every or not (step % cfg.sample_every == 0 or step == cfg.max_steps):
            return {}
        text = sample_text(model, tokenizer, cfg, device, mcfg.max_seq_len)
        if cluster.main:
            tqdm.write(f"step {step} sample: {text!r}")
        return {"sample": text}

    def save() -> dict:
        model_state, optimizer_state = full_state(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state, "train_config": dataclasses.asdict(cfg),
                "model_config": mcfg.to_dict()}

    def check(path: Path, state: dict):
        if not isinstance(state, dict) or "model" not in state:
            raise CamelidError(f"{path}: not a camelid pretraining checkpoint")
        if state.get("model_config") != mcfg.to_dict():
            diff = sorted(k for k in mcfg.to_dict() if state.get("model_config", {}).get(k) != mcfg.to_dict()[k])
            raise CamelidError(f"{path}: checkpoint of another model (differs in {', '.join(diff[:4])})")

    def load(path: Path, state: dict):
        load_full_state(model, optimizer, state["model"], state["optimizer"], str(path))

    evaluate = (lambda: evaluate_shards(model, val_data, cfg, device, amp_dtype, cluster)) if val_data else None
    job = Job("pretraining", model, optimizer, cfg.max_steps, micro_batches, loss, save, check, load,
              evaluate=evaluate, report=report, extras=extras, optimizer_step=optimizer_step)
    train_loop(job, cfg, cluster, device, out, resume, on_eval)
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
    return tokenizer.decode(out)


@torch.no_grad()
def evaluate_shards(model, data: TokenShards, cfg: TrainConfig, device, amp_dtype, cluster: Cluster) -> float:
    """Mean loss over fixed validation windows (the same every time, so curves compare), split over ranks."""
    model.eval()
    total = 0.0
    # Every rank runs as many forwards (under FSDP each is collective); a rank past the end repeats a batch
    # it does not count.
    for b in range(cluster.rank, -(-cfg.eval_batches // cluster.world) * cluster.world, cluster.world):
        x, y = (t.to(device) for t in data.batch(b % cfg.eval_batches * cfg.micro_batch, cfg.micro_batch,
                                                 cfg.seq_len, seed=0))
        with autocast(device, amp_dtype):
            logits = model(x)
        if b < cfg.eval_batches:
            total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)).item()
    model.train()
    return sum_across(total, cluster, device) / cfg.eval_batches


def export_model(model, tokenizer, folder: Path) -> Path:
    from camelid.formats.load import save_native
    from camelid.formats.loaded import LoadedModel

    model.eval().requires_grad_(False)
    save_native(LoadedModel(model.cpu(), tokenizer, "raw"), folder, force=True)  # the run's own output
    return folder
