"""ggml's quantized blocks, decoded for camelid's kernels and encoded for export.

Decoding: Q4_0, Q4_1 and Q4_K are exactly w = (q - 8) * scale + zero over groups of 32, the formula of
PyTorch's packed int4 CPU kernel, so they map onto it without passing through float. Every other type is
dequantized by gguf-py. Encoding: gguf-py quantizes the legacy types (Q8_0, Q4_0, Q5_0, ...); the K-quants
it cannot, so Q4_K and Q6_K are encoded here, with llama.cpp's block layouts and simpler scale searches.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
QK_K = 256


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[..., at:at + 2].contiguous().view(torch.float16).float()


def int4_groups(raw: np.ndarray, ggml_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of Q4_0/Q4_1/Q4_K blocks (N, row bytes) -> q (N, K) uint8 0..15, scales and zeros (N, K/32)."""
    n = raw.shape[0]
    with warnings.catch_warnings():  # a read-only view of the file: nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(raw)
    if ggml_type == "Q4_0":
        b = data.view(n, -1, 18)
        d = _f16(b, 0)
        qs = b[..., 2:]
        q = torch.cat((qs & 15, qs >> 4), dim=-1)  # low nibbles hold elements 0-15, high ones 16-31
        scales, zeros = d, torch.zeros_like(d)
    elif ggml_type == "Q4_1":
        b = data.view(n, -1, 20)
        d, m = _f16(b, 0), _f16(b, 2)
        qs = b[..., 4:]
        q = torch.cat((qs & 15, qs >> 4), dim=-1)
        scales, zeros = d, m + 8 * d
    elif ggml_type == "Q4_K":
        b = data.view(n, -1, 144)
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k4_scales_mins(b[..., 4:16])
        qs = b[..., 16:].reshape(n, -1, 4, 32)  # four chunks of 64 values: 32 low nibbles, then 32 high
        q = torch.stack((qs & 15, qs >> 4), dim=3)
        scales = d * sc
        zeros = 8 * scales - dmin * mn
    else:
        raise ValueError(f"{ggml_type} is not a 4-bit type")
    return q.reshape(n, -1), scales.reshape(n, -1), zeros.reshape(n, -1)


def _k4_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K super-block, unpacked from their 12 bytes."""
    sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)), dim=-1)
    mn = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def dequantize(raw: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Any type -> float32 tensor of `shape`."""
    if ggml_type in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"):
        dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64, "BF16": np.uint16}[ggml_type]
        values = raw.view(dtype)
        if ggml_type == "BF16":
            return torch.from_numpy(values.copy()).view(torch.bfloat16).float().reshape(shape)
        return torch.from_numpy(values.astype(np.float32)).reshape(shape)
    values = quants.dequantize(raw, GGMLQuantizationType[ggml_type])
    return torch.from_numpy(values).reshape(shape)


# ----------------------------------------------------------------------------------------- encoding

def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """float (N, K) -> Q8_0 blocks (N, K/32 * 34) uint8, as ggml rounds them (round half away from zero), in
    torch: re-quantizing a whole model's Q6_K/Q5 tensors at load must take milliseconds, not seconds."""
    n, k = w.shape
    g = w.float().reshape(n, k // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, g / torch.where(d > 0, d, 1), 0)
    q = (q.sign() * (q.abs() + 0.5).floor()).to(torch.int8)
    out = torch.empty(n, k // 32, 34, dtype=torch.uint8)
    out[..., :2] = d.to(torch.float16).view(torch.uint8)
    out[..., 2:] = q.view(torch.uint8)
    return out.reshape(n, -1)



def quantize(w: np.ndarray, ggml_type: str) -> np.ndarray:
    """float32 (..., K) -> (..., row bytes) uint8 blocks of `ggml_type` (F32 and F16 are plain arrays)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if ggml_type == "F32":
        return w
    if ggml_type == "F16":
        return w.astype(np.float16)
    if ggml_type in ("Q4_K", "Q6_K"):
        rows = w.reshape(-1, w.shape[-1])
        blocks = _quantize_q4_k(rows) if ggml_type == "Q4_K" else _quantize_q6_k(rows)
        return blocks.reshape(*w.shape[:-1], -1)
    return quants.quantize(w, GGMLQuantizationType[ggml_type])


def _nearest(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)  # round half to even, as ggml's nearest_int


def _quantize_q4_k(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    x = w.reshape(n, k // QK_K, 8, 32)
    lo = np.minimum(x.min(-1), 0)  # the offset is subtracted: mins are kept >= 0
    hi = x.max(-1)
    scale = (hi - lo) / 15
    mins = -lo
    d = scale.max(-1, keepdims=True) / 63
    dmin = mins.max(-1, keepdims=True) / 63
    sc = np.clip(_nearest(np.divide(scale, d, out=np.zeros_like(scale), where=d > 0)), 0, 63)
    mn = np.clip(_nearest(np.divide(mins, dmin, out=np.zeros_like(mins), where=dmin > 0)), 0, 63)
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    step = (d * sc)[..., None]
    q = np.divide(x + (dmin * mn)[..., None], step, out=np.zeros_like(x), where=step > 0)
    q = np.clip(_nearest(q), 0, 15).astype(np.uint8)
    out = np.zeros((n, k // QK_K, 144), dtype=np.uint8)
    out[..., 0:2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:4] = dmin.astype(np.float16).view(np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out[..., 4:8] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    out[..., 8:12] = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    out[..., 12:16] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    chunks = q.reshape(n, -1, 4, 2, 32)  # chunk of 64 = sub-blocks 2c (low nibbles) and 2c+1 (high)
    out[..., 16:] = (chunks[..., 0, :] | (chunks[..., 1, :] << 4)).reshape(n, -1, 128)
    return out.reshape(n, -1)


def _quantize_q6_k(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    x = w.reshape(n, k // QK_K, 16, 16)
    # per 16 values: the scale that maps the value of largest magnitude to -32, keeping its sign
    idx = np.abs(x).argmax(-1)
    extreme = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    scale = extreme / -32
    big = np.take_along_axis(scale, np.abs(scale).argmax(-1)[..., None], -1)  # (n, blocks, 1)
    iscale = np.divide(-128.0, big, out=np.zeros_like(big), where=big != 0)
    sc = np.clip(_nearest(iscale * scale), -128, 127)
    d = np.divide(1.0, iscale, out=np.zeros_like(iscale), where=iscale != 0).astype(np.float16).astype(np.float32)
    step = (d * sc)[..., None]
    q = np.divide(x, step, out=np.zeros_like(x), where=step != 0)
    q = (np.clip(_nearest(q), -32, 31) + 32).astype(np.uint8).reshape(n, -1, 2, 4, 32)  # halves of 128
    ql = np.concatenate((q[..., 0, :] & 15 | (q[..., 2, :] & 15) << 4,
                         q[..., 1, :] & 15 | (q[..., 3, :] & 15) << 4), axis=-1)  # (n, blocks, 2, 64)
    qh = (q[..., 0, :] >> 4) | (q[..., 1, :] >> 4) << 2 | (q[..., 2, :] >> 4) << 4 | (q[..., 3, :] >> 4) << 6
    out = np.zeros((n, k // QK_K, 210), dtype=np.uint8)
    out[..., 0:128] = ql.reshape(n, -1, 128)
    out[..., 128:192] = qh.reshape(n, -1, 64)
    out[..., 192:208] = sc.astype(np.int8).view(np.uint8)
    out[..., 208:210] = d.astype(np.float16).view(np.uint8)
    return out.reshape(n, -1)
