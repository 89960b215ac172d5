"""Dropout whose mask costs almost nothing in a compiled CPU graph.

Inductor draws a CPU dropout mask one Philox number at a time, about 10 ns an element: 10 ms a layer for
LoRA's dropout over a 1024 x 1024 input, 3% of a LoRA fine-tuning step. Here the mask is a hash of each
element's index and a seed drawn once a call, which inductor fuses into the multiply as one vectorised
loop (about 0.5 ms). The hash is Chris Wellons' lowbias32, applied twice; its multipliers are below 2^31
so every product of 32-bit values fits an int64. Elements are kept when their hash is at least p * 2^32,
so the drop rate is p to within 2^-32, and each call's seed is drawn from torch's generator, so runs
repeat under `torch.manual_seed` and resume with the generator's state. Eager code and other devices keep
`F.dropout`, whose own kernels are fast there."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LOW32 = 0xFFFFFFFF


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return x * hashed_keep_mask(x, p).to(x.dtype) * (1.0 / (1.0 - p))


def hashed_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool mask shaped like x, each element True with probability 1 - p, from one fresh seed."""
    seed = dropout_seed(x)
    index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    h = _lowbias32((index & _LOW32) ^ seed[0])
    h = _lowbias32(h ^ seed[1] ^ (index >> 32))  # tensors past 2^32 elements get their high bits mixed in
    # Compared as float64 (exact for 32-bit values): torch.compile passes a float p as a runtime scalar, and
    # rounding it to an int threshold would bake the first p into a cached kernel.
    return h.double() >= p * 2.0 ** 32


@torch.library.custom_op("camelid::dropout_seed", mutates_args=())
def dropout_seed(like: torch.Tensor) -> torch.Tensor:
    """Two random 32-bit seeds from torch's generator. An opaque op, so inductor computes them once:
    a plain randint would be inlined into the mask's loop and drawn again for every vector."""
    return torch.randint(0, _LOW32, (2,), device=like.device, dtype=torch.int64)


@dropout_seed.register_fake
def _(like):
    return like.new_empty(2, dtype=torch.int64)


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _LOW32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _LOW32
    return h ^ (h >> 15)
