"""GPTQ (Frantar et al. 2022) for int4: quantize a weight column by column and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs
(H = 2 X^T X over calibration text). Blocks are quantized one after another, each on the outputs of the
already-quantized blocks before it, as GPTQ-for-LLaMa does. Groups are contiguous (no act-order), so the
result is an ordinary int4 layer that every kernel runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from camelid.model.quant import Int4Linear, Int8Linear, int4_fits, output_mode


class _Recorder(nn.Module):
    """Stands in for a Linear while its inputs are gathered (a plain Module, so `linear()` calls it)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer
        self.hessian = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
        self.rows = 0

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).double()
        n = x2.shape[0]
        self.hessian *= self.rows / (self.rows + n)
        self.rows += n
        x2 = x2 * math.sqrt(2 / self.rows)
        self.hessian += (x2.t() @ x2).cpu()
        return F.linear(x, self.layer.weight, self.layer.bias)


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group: int, damp: float = 0.01,
              block: int = 128, integer_zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q 0..15 (N, K), scales (N, K/group), zeros (N, K/group)) in Int4Linear's w = (q - 8) * scale + zero.
    `integer_zeros`: the zero point an integer z and the scale an fp16, as GPTQ's checkpoints store them
    (w = scale (q - z), so zero = scale (8 - z)); else a float zero point (the group's minimum)."""
    W = weight.detach().double().clone()
    N, K = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(N, K, dtype=torch.uint8)
    scales = torch.zeros(N, K // group, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:  # this group's range is taken from the weights as they are now
                g = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :group]
                lo, hi = g.amin(1), g.amax(1)
                scale = ((hi - lo) / 15).clamp(min=1e-10)
                if integer_zeros:  # AutoGPTQ's: the range widened to hold 0, z = round(-lo / scale)
                    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
                    scale = ((hi - lo) / 15).clamp(min=1e-5).half().double()
                    z = torch.round(-lo / scale).clamp(0, 15)
                    lo = -z * scale
                scales[:, col // group], zeros[:, col // group] = scale, lo + 8 * scale
            s, z = scales[:, col // group], zeros[:, col // group]
            w = W1[:, i]
            q = torch.round((w - z) / s + 8).clamp(0, 15)
            Q[:, col] = q.to(torch.uint8)
            err = (w - ((q - 8) * s + z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scales.float(), zeros.float()


def _capture_block_inputs(model, batches: list[torch.Tensor]) -> list[tuple]:
    """The arguments the first block is called with, for each calibration batch."""
    captured = []

    class Stop(Exception):
        pass

    def grab(module, args):
        captured.append(args)
        raise Stop

    handle = model.layers[0].register_forward_pre_hook(grab)
    try:
        for tokens in batches:
            try:
                model(tokens)
            except Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def gptq_quantize_model(model, batches: list[torch.Tensor], group: int, damp: float = 0.01,
                        progress: bool = True, output: str | None = None,
                        integer_zeros: bool = False) -> dict[str, int]:
    """Replaces every block projection with GPTQ int4 (int8 where the int4 kernel cannot take the shape),
    and the output layer with int8 per channel, GPTQ int4 or nothing (`output`: int8, int4 or float).
    `batches` are (B, T) token tensors of calibration text; `integer_zeros`: GPTQ checkpoints' zero points."""
    counts = {"int4": 0, "int8": 0}
    output = output_mode("int4", output)
    calls = _capture_block_inputs(model, batches)
    for block in tqdm(model.layers, desc="GPTQ", unit="block", disable=not progress):
        _quantize_sublayers(block, lambda: [block(*args) for args in calls], group, damp, counts,  # noqa: B023
                            integer_zeros=integer_zeros)
        calls = [(out, *args[1:]) for out, args in zip([block(*args) for args in calls], calls)]
    if output == "int8":
        model.output = Int8Linear.from_linear(model.output).to(model.output.weight.device)
        counts["int8"] += 1
    elif output == "int4":
        _quantize_sublayers(model, lambda: [model(tokens) for tokens in batches], group, damp, counts,
                            only=("output",), integer_zeros=integer_zeros)
    return counts


def _quantize_sublayers(parent: nn.Module, run, group: int, damp: float, counts: dict, only=None,
                        integer_zeros: bool = False) -> None:
    targets = [(name, mod) for name, mod in parent.named_modules()
               if isinstance(mod, nn.Linear) and (only is None or name in only)]
    recorders = {}
    for name, layer in targets:
        owner, _, attr = name.rpartition(".")
        recorders[name] = _Recorder(layer)
        setattr(parent.get_submodule(owner) if owner else parent, attr, recorders[name])
    run()
    for name, layer in targets:
        owner, _, attr = name.rpartition(".")
        if int4_fits(layer.out_features, layer.in_features, group):
            q, scales, zeros = gptq_int4(layer.weight, recorders[name].hessian, group, damp,
                                         integer_zeros=integer_zeros)
            new = Int4Linear(layer.in_features, layer.out_features, group, layer.bias is not None)
            new.set_quantized(q, scales, zeros, layer.weight.dtype)
            counts["int4"] += 1
        else:
            new = Int8Linear.from_linear(layer)
            counts["int8"] += 1
        if layer.bias is not None:
            new.bias = layer.bias.detach().clone()
        setattr(parent.get_submodule(owner) if owner else parent, attr, new.to(layer.weight.device))
