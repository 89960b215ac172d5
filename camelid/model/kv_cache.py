"""Preallocated key/value cache: decode writes one slot a step and never recomputes the prefix."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor):
        """Write new keys/values at `start` (an int, or one position per row for a single new token)
        and return the cache up to the furthest written position."""
        if isinstance(start, torch.Tensor):
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, start] = k[:, :, 0]
            self.v[layer][rows, :, start] = v[:, :, 0]
            end = int(start.max()) + 1
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
        return view

    def move_row(self, src: int, dst: int, length: int):
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]
