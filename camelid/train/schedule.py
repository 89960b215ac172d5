"""Learning rate at a step: linear warmup, then cosine, linear, step or exponential decay to min_lr."""

from __future__ import annotations

import math


def warmup_steps(cfg, max_steps: int) -> int:
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * max_steps)


def lr_at(step: int, cfg, max_steps: int) -> float:
    warmup = warmup_steps(cfg, max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    done = step - warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, done / span)
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    if cfg.schedule == "linear":
        return cfg.lr - progress * (cfg.lr - cfg.min_lr)
    if cfg.schedule == "step":
        return max(cfg.min_lr, cfg.lr * cfg.decay_gamma ** (done // cfg.decay_every))
    # exponential: a smooth version of the step schedule
    return max(cfg.min_lr, cfg.lr * cfg.decay_gamma ** (done / cfg.decay_every))
