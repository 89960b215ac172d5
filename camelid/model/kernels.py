"""Decode-time matrix-vector products for CPUs.

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

log = logging.getLogger(__name__)
_state = {"enabled": False, "gemv": None}


def enable_fast_decode(enabled: bool = True) -> bool:
    """Turn the compiled CPU decode kernel on or off; returns whether it is on (needs a C++ compiler)."""
    if enabled and _state["gemv"] is None:
        try:
            import torch._dynamo

            # One compiled kernel per weight shape; a model has about five.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            _state["gemv"] = torch.compile(_gemv, dynamic=False)
        except Exception as exc:  # no inductor on this platform
            log.warning("fast decode kernel unavailable (%s); using F.linear", exc)
            enabled = False
    _state["enabled"] = enabled
    return enabled


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K).T for a few rows M. The output is laid out (N, M) so each weight row is read
    from memory once and reused from cache for every input row."""
    n, k = w.shape
    # Long rows are reduced in two halves: one accumulator chain over >4K elements stalls on FMA latency.
    split = 2 if k > 4096 and k % 32 == 0 else 1
    prod = w.float().view(n, 1, split, k // split) * x.float().view(1, -1, split, k // split)
    return prod.sum(-1).sum(-1).t().to(x.dtype)


def _use_kernel(x: torch.Tensor, layer: torch.nn.Module) -> bool:
    if not (_state["enabled"] and type(layer) is torch.nn.Linear and x.device.type == "cpu"
            and not torch.is_grad_enabled()):
        return False
    rows = x.shape[:-1].numel()
    # Batched decode: oneDNN's bf16 kernel already reads the weights once for up to 8 rows; fp32 BLAS does not.
    return rows == 1 or (rows <= MAX_KERNEL_ROWS and x.dtype == torch.float32)


MAX_KERNEL_ROWS = 8


def linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    if type(layer) is not torch.nn.Linear:  # LoRA and quantized layers bring their own forward
        return layer(x)
    if _use_kernel(x, layer):
        try:
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] > 1:
                torch._dynamo.mark_dynamic(x2, 0)  # one compiled kernel for every batch size
            y = _state["gemv"](x2, layer.weight).view(*x.shape[:-1], -1)
        except Exception as exc:  # a compiler failure must not stop generation
            log.warning("fast decode kernel failed (%s); using F.linear", str(exc).splitlines()[0])
            _state["enabled"] = False
            return layer(x)
        return y if layer.bias is None else y + layer.bias
    return F.linear(x, layer.weight, layer.bias)
