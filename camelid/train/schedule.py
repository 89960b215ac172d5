"""Learning rate at a step: linear warmup, then cosine, linear, step or exponential decay to min_lr."""

from __future__ import annotations

import math


def lr_at(step: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    done = step - cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, done / span)
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    if cfg.schedule == "linear":
        return cfg.lr - progress * (cfg.lr - cfg.min_lr)
    if cfg.schedule == "step":
        return max(cfg.min_lr, cfg.lr * cfg.decay_gamma ** (done // cfg.decay_every))
    # exponential: a smooth version of the step schedule
    return max(cfg.min_lr, cfg.lr * cfg.decay_gamma ** (done / cfg.decay_every))
