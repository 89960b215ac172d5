"""How much memory a model needs, and whether it fits on this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from camelid.model.config import ModelConfig
from camelid.model.t5 import T5
from camelid.model.transformer import count_parameters

# Bytes per weight. int8/int4 include one fp16 scale per block (per channel ~ free, groups of 32 for int4),
# as llama.cpp's Q8_0 (8.5 bits) and Q4_0 (4.5 bits) do.
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 8.5 / 8, "int4": 4.5 / 8}
RUNTIME_OVERHEAD = 1.10  # activations, allocator slack, the tokenizer and the interpreter


@dataclass
class MemoryEstimate:
    params: int
    weights_bytes: int
    kv_cache_bytes: int
    total_bytes: int


def model_parameters(cfg: ModelConfig) -> int:
    """The weights of the model a config describes: a decoder, or an encoder-decoder (T5)."""
    if not cfg.n_encoder_layers:
        return count_parameters(cfg)
    with torch.device("meta"):
        model = T5(cfg)
    model.tie_weights()
    return sum(p.numel() for p in model.parameters())


def kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per_value: float = 2.0, batch: int = 1) -> int:
    """Keys and values for `context` positions; an encoder-decoder's decoder also keeps the encoder's, for
    cross-attention (counted for a prompt of the same length)."""
    stacks = 2 if cfg.n_encoder_layers else 1
    return int(2 * stacks * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * bytes_per_value * batch)


def estimate_memory(cfg: ModelConfig, quant: str, context: int | None = None,
                    params: int | None = None) -> MemoryEstimate:
    params = params if params is not None else model_parameters(cfg)
    weights = int(params * BYTES_PER_PARAM[quant])
    kv = kv_cache_bytes(cfg, context or cfg.max_seq_len, 4.0 if quant == "fp32" else 2.0)
    return MemoryEstimate(params, weights, kv, int((weights + kv) * RUNTIME_OVERHEAD))


def machine_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = total
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, available


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)
