"""Decode-time matrix-vector products for CPUs, swapped into a model's float layers from outside it.

Batch-1 decode reads every weight once per token, so its speed is memory bandwidth. PyTorch's CPU
`F.linear` with one input row goes through BLAS gemv, which on x86 uses one thread for fp32 and reaches
about half the machine's bandwidth for bf16. Written as multiply-and-reduce and compiled by inductor, the
same product becomes one vectorised loop over all cores that reads each weight once (bf16 is widened to
fp32 in registers), about twice as fast. Everything else (prefill, training, GPUs) keeps `F.linear`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Batched decode: oneDNN's bf16 kernel already reads the weights once for up to 8 rows; fp32 BLAS does not.
MAX_KERNEL_ROWS = 8


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K).T for a few rows M. The output is laid out (N, M) so each weight row is read
    from memory once and reused from cache for every input row."""
    n, k = w.shape
    # Long rows are reduced in two halves: one accumulator chain over >4K elements stalls on FMA latency.
    split = 2 if k > 4096 and k % 32 == 0 else 1
    prod = w.float().view(n, 1, split, k // split) * x.float().view(1, -1, split, k // split)
    return prod.sum(-1).sum(-1).t().to(x.dtype)


class CompiledGemv:
    """The compiled product, shared by the layers of one model: a compiler failure turns it off for all of
    them (with one warning), and generation goes on through F.linear."""

    def __init__(self):
        import torch._dynamo

        # One compiled kernel per weight shape; a model has about five.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.fn = torch.compile(_gemv, dynamic=False)

    def __call__(self, x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        if self.fn is None:
            return None
        if x2.shape[0] > 1:
            torch._dynamo.mark_dynamic(x2, 0)  # one compiled kernel for every batch size
        try:
            return self.fn(x2, w)
        except Exception as exc:  # a compiler failure must not stop generation
            log.warning("fast decode kernel failed (%s); using F.linear", str(exc).splitlines()[0])
            self.fn = None
            return None


class GemvLinear(nn.Linear):
    """nn.Linear whose few-row, no-grad CPU products go through the compiled kernel; the same parameters (and
    state-dict keys) as the layer it replaces."""

    def __init__(self, layer: nn.Linear, kernel: CompiledGemv):
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias = layer.weight, layer.bias
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if (x.device.type == "cpu" and not torch.is_grad_enabled()
                and (rows == 1 or (rows <= MAX_KERNEL_ROWS and x.dtype == torch.float32))):
            y = self.kernel(x.reshape(-1, x.shape[-1]), self.weight)
            if y is not None:
                y = y.view(*x.shape[:-1], -1)
                return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def use_gemv_kernel(model: nn.Module) -> int:
    """Swap every plain nn.Linear of `model` for a GemvLinear on the same weights; returns how many. Where
    inductor cannot be set up (no C++ compiler on this platform), nothing is swapped and 0 is returned."""
    try:
        kernel = CompiledGemv()
    except Exception as exc:
        log.warning("fast decode kernel unavailable (%s); using F.linear", exc)
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, GemvLinear(child, kernel))
                swapped += 1
    return swapped
