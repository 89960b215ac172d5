"""How a model is run token by token: the CPU decode kernels are chosen here, from outside the model, whose
forward stays the plain reference.

- `prepare_for_decoding` swaps the compiled gemv kernel into a float model's linear layers (once, after
  loading and merging adapters), where decode is bound by reading weights rather than by Python overhead.
- `decode_step` picks, once per decoding run, the function that runs one new token: the C kernel's whole
  step for a LLaMA-shaped GGUF model on a CPU (see model/fused_decode.py), else the model's forward.
"""

from __future__ import annotations

from typing import Callable

import torch

from camelid.model import fused_decode
from camelid.model.kernels import use_gemv_kernel
from camelid.model.kv_cache import KVCache
from camelid.model.transformer import Transformer

# Below this width a token's time is Python and dispatch, which a faster product does not shorten, and each
# weight shape costs a compile.
GEMV_MIN_DIM = 512

DecodeStep = Callable[[torch.Tensor, "int | torch.Tensor", KVCache, "torch.Tensor | None"], torch.Tensor]


def prepare_for_decoding(model: Transformer, compile: bool = True) -> Transformer:
    """The model, its float linear layers on the compiled CPU gemv kernel where that pays (a CPU, `compile`,
    dim >= GEMV_MIN_DIM). The parameters and their names are unchanged."""
    if compile and model.device.type == "cpu" and model.cfg.dim >= GEMV_MIN_DIM:
        use_gemv_kernel(model)
    return model


def decode_step(model: Transformer) -> DecodeStep:
    """step(tokens (B, 1), start, kv_cache, pad_mask) -> logits (B, 1, vocab), as model(tokens, start,
    kv_cache, pad_mask) computes them. Choose it after the model last changed (the C step holds pointers to
    its weights) and use it for one decoding run."""
    plan = fused_decode.build_plan(model)
    if plan is None:
        return model

    def step(tokens, start, kv_cache, pad_mask=None):
        logits = None
        if pad_mask is None and not isinstance(start, torch.Tensor):
            logits = fused_decode.decode_step(plan, model, tokens, start, kv_cache)
        return model(tokens, start, kv_cache, pad_mask) if logits is None else logits

    return step
