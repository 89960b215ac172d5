"""Preallocated key/value cache: decode writes one slot a step and never recomputes the prefix."""

from __future__ import annotations

import math
import mmap

import torch


class KVCache:
    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.glm_context = None  # positions "glm_2d": each row's context length and mask position (B, 2)

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor):
        """Write new keys/values at `start` (an int, or a (B,) tensor: each row's own first position) and
        return the cache up to the furthest written position."""
        if isinstance(start, torch.Tensor):
            positions = start.view(-1, 1) + torch.arange(k.shape[2], device=k.device)
            rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
            self.k[layer][rows, :, positions] = k.transpose(1, 2)
            self.v[layer][rows, :, positions] = v.transpose(1, 2)
            end = int(positions.max()) + 1
        else:
            end = start + k.shape[2]
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def rows(self, first: int, last: int) -> "KVCache":
        """A view of rows first..last-1 that writes through to this cache (one request's slot, or the
        active prefix of a serving batch)."""
        view = KVCache.__new__(KVCache)
        view.k = [t[first:last] for t in self.k]
        view.v = [t[first:last] for t in self.v]
        view.max_len = self.max_len
        view.glm_context = None if self.glm_context is None else self.glm_context[first:last]
        return view

    def move_row(self, src: int, dst: int, length: int):
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]


KV_TYPES = ("f32", "f16", "bf16", "q8_0")
_STORED = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.int8}
Q8_BLOCK = 32  # values per int8 block with one fp16 scale: llama.cpp's Q8_0


def kv_value_bytes(kv_type: str) -> float:
    return 34 / 32 if kv_type == "q8_0" else torch.empty((), dtype=_STORED[kv_type]).element_size()


class PagedKVCache:
    """One pool of fixed-size blocks of keys and values per layer, shared by every sequence: a sequence holds
    a table of block ids, so its memory grows a block at a time with the tokens it actually has, and
    sequences that begin alike can share the blocks of their common prefix. Which block belongs to whom is
    the caller's bookkeeping (generate/kv_blocks.py); this class only stores and addresses.

    Blocks are token-major, (n_blocks, block_size, n_kv_heads, head_dim), so writing a token is one row and
    reading a sequence is one gather. kv_type "q8_0" stores int8 values with one fp16 scale per 32 (llama.cpp's
    Q8_0 block), "f16"/"bf16" halve fp32's memory; reads come back in the compute dtype. On a CPU the pool's
    pages are only taken as blocks are first written (_lazy_zeros)."""

    def __init__(self, n_layers, n_blocks, block_size, n_kv_heads, head_dim, dtype, device, kv_type: str = "f32"):
        if kv_type == "q8_0" and head_dim % Q8_BLOCK:
            raise ValueError(f"q8_0 KV needs a head size divisible by {Q8_BLOCK}, not {head_dim}")
        shape = (n_blocks, block_size, n_kv_heads, head_dim)
        store = _STORED[kv_type]
        self.k = [_lazy_zeros(shape, store, device) for _ in range(n_layers)]
        self.v = [_lazy_zeros(shape, store, device) for _ in range(n_layers)]
        self.k_scale = self.v_scale = None
        if kv_type == "q8_0":
            scale_shape = shape[:-1] + (head_dim // Q8_BLOCK,)
            self.k_scale = [_lazy_zeros(scale_shape, torch.float16, device) for _ in range(n_layers)]
            self.v_scale = [_lazy_zeros(scale_shape, torch.float16, device) for _ in range(n_layers)]
        self.n_blocks, self.block_size, self.kv_type, self.dtype = n_blocks, block_size, kv_type, dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + (self.k_scale or []) + (self.v_scale or []))

    def rows(self, tables: torch.Tensor) -> "PagedRows":
        """The sequences whose block tables are the rows of `tables` (B, n), as the cache a forward writes
        and reads (positions past a row's blocks are its caller's to mask)."""
        return PagedRows(self, tables)

    def copy_block(self, src: int, dst: int):
        for ts in (self.k, self.v, self.k_scale or [], self.v_scale or []):
            for t in ts:
                t[dst] = t[src]

    def _write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v (N, n_kv_heads, head_dim) into the flat slots (N,) = block * block_size + offset."""
        for pool, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            flat = pool[layer].view(-1, *pool[layer].shape[2:])
            if scales is None:
                flat[slots] = x.to(flat.dtype)
                continue
            q, d = quantize_q8_0(x)
            flat[slots] = q
            scales[layer].view(-1, *scales[layer].shape[2:])[slots] = d

    def _read(self, layer: int, tables: torch.Tensor, length: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0..length-1 of each row: (B, n_kv_heads, length, head_dim)."""
        blocks = tables[:, :-(-length // self.block_size)]
        out = []
        for pool, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            x = pool[layer][blocks]  # (B, n, block_size, H, D)
            if scales is not None:
                x = dequantize_q8_0(x, scales[layer][blocks], dtype)
            out.append(x.flatten(1, 2)[:, :length].transpose(1, 2).to(dtype))
        return out[0], out[1]


def _lazy_zeros(shape, dtype, device) -> torch.Tensor:
    """Zeros, never leftover memory: a batch reads past a row's own positions (masked, but 0 x a stale NaN is
    NaN). On a CPU they come from an anonymous mapping, whose pages cost nothing until first written."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    return torch.frombuffer(mmap.mmap(-1, count * dtype.itemsize), dtype=dtype, count=count).view(shape)


class PagedRows:
    """A batch's view of a PagedKVCache: row b's positions live in the blocks tables[b]."""

    def __init__(self, cache: PagedKVCache, tables: torch.Tensor):
        self.cache, self.tables = cache, tables
        self.max_len = tables.shape[1] * cache.block_size

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor):
        """As KVCache.update: write at `start` (an int for every row, or a (B,) tensor of each row's first
        position) and return every row's cache up to the furthest written position."""
        B, H, T, D = k.shape
        if isinstance(start, torch.Tensor):
            positions = start.view(B, 1) + torch.arange(T, device=k.device)
        else:
            positions = torch.arange(start, start + T, device=k.device).expand(B, T)
        bs = self.cache.block_size
        slots = (self.tables.gather(1, positions // bs) * bs + positions % bs).flatten()
        self.cache._write(layer, slots, k.transpose(1, 2).reshape(B * T, H, D), v.transpose(1, 2).reshape(B * T, H, D))
        end = int(positions.max()) + 1
        return self.cache._read(layer, self.tables, end, k.dtype)


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> int8 values and fp16 scales (..., D/32), as llama.cpp's quantize_row_q8_0: d = amax / 127,
    q = x / d rounded half away from zero."""
    blocks = x.float().unflatten(-1, (-1, Q8_BLOCK))
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    scaled = blocks * inv.unsqueeze(-1)
    q = (scaled.sign() * (scaled.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8)
    return q.flatten(-2), d.to(torch.float16)


def dequantize_q8_0(q: torch.Tensor, d: torch.Tensor, dtype) -> torch.Tensor:
    return (q.unflatten(-1, (-1, Q8_BLOCK)).to(dtype) * d.to(dtype).unsqueeze(-1)).flatten(-2)
