"""The encoder-decoder beside the decoder-only transformer: T5 (Raffel et al. 2020), T5 v1.1, Flan-T5 and
FastChat-T5, from the same norms, MLPs and linear layers as `transformer.py`.

An encoder stack reads the prompt once with bidirectional self-attention; the decoder writes the reply with
causal self-attention and cross-attention over the encoder's output, whose keys and values are computed once
per prompt. There are no position embeddings: each stack's first block learns a bias per head for each bucket
of relative distance (exact up to half the buckets, logarithmic up to `rel_max_distance`), added to every
block's attention scores, which are not scaled by 1/sqrt(head_dim). Original T5 uses ReLU MLPs and ties its
output layer to the embeddings, scaling the decoder's output by dim^-0.5 (`logit_scale`); v1.1 and Flan-T5
use gated GELU and their own output layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from camelid.model.config import ModelConfig
from camelid.model.transformer import MLP, _embedding, linear, make_norm


def relative_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """Mesh TensorFlow's bucketing of key - query distances: the encoder's buckets are split between keys
    before and after the query, the decoder's cover the past only."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out = out + (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)
    exact = buckets // 2
    far = exact + (torch.log(relative.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (buckets - exact)).long()
    return out + torch.where(relative < exact, relative, far.clamp(max=buckets - 1))


class T5Attention(nn.Module):
    """Self-attention (q, k and v fused) or cross-attention (k and v fused, over the encoder's output)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.cfg, self.inner = cfg, cfg.n_heads * cfg.head_dim
        if cross:
            self.wq = nn.Linear(cfg.dim, self.inner, bias=False)
            self.wkv = nn.Linear(cfg.dim, 2 * self.inner, bias=False)
        else:
            self.wqkv = nn.Linear(cfg.dim, 3 * self.inner, bias=False)
        self.wo = nn.Linear(self.inner, cfg.dim, bias=False)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.cfg.n_heads, self.cfg.head_dim).transpose(1, 2)

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = linear(memory, self.wkv).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def forward(self, x, bias, kv: tuple[torch.Tensor, torch.Tensor] | None = None, past=None):
        """bias (1 or B, H, T, S): relative positions and masks, added to the unscaled scores. Cross-attention
        takes the encoder's keys and values in `kv`; self-attention appends its own to `past` (a list)."""
        if kv is None:
            q, k, v = (self.heads(t) for t in linear(x, self.wqkv).chunk(3, dim=-1))
            if past is not None:
                if past:
                    k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
                past[:] = [k, v]
        else:
            q, (k, v) = self.heads(linear(x, self.wq)), kv
        p = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p, scale=1.0)
        return linear(y.transpose(1, 2).reshape(*x.shape[:2], self.inner), self.wo)


class T5Block(nn.Module):
    def __init__(self, cfg: ModelConfig, decoder: bool):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg), T5Attention(cfg)
        self.cross_norm = make_norm(cfg) if decoder else None
        self.cross = T5Attention(cfg, cross=True) if decoder else None
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, bias, cross_kv=None, cross_bias=None, past=None):
        x = x + self.attn(self.attn_norm(x), bias, past=past)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), cross_bias, kv=cross_kv)
        return x + self.mlp(self.mlp_norm(x))


class Seq2SeqCache:
    """What decoding reuses: the encoder's keys and values per decoder block (computed once per prompt), the
    key mask of its padding, and each block's self-attention keys and values so far, with the mask of their
    padding where rows of different lengths are decoded together (`self_mask`, (B, 1, 1, length))."""

    def __init__(self, cross_kv: list, key_mask: torch.Tensor, self_kv: list | None = None,
                 self_mask: torch.Tensor | None = None):
        self.cross_kv, self.key_mask = cross_kv, key_mask
        self.self_kv = self_kv if self_kv is not None else [[] for _ in cross_kv]
        self.self_mask = self_mask

    @property
    def length(self) -> int:
        return self.self_kv[0][0].shape[2] if self.self_kv[0] else 0


def merge_caches(caches: list[Seq2SeqCache]) -> Seq2SeqCache:
    """One-row caches decoded as one batch: the encoders' outputs padded at the end, and the self-attention
    keys and values padded at the start so that every row's next token lands at the same index. The padding is
    masked, and the relative positions between a row's own tokens are unchanged by the shift."""
    src, lengths = [c.key_mask.shape[-1] for c in caches], [c.length for c in caches]
    longest_src, longest = max(src), max(lengths)
    layers = range(len(caches[0].cross_kv))

    def keys(c: Seq2SeqCache, i: int, j: int) -> torch.Tensor:  # (1, H, length, D), empty before the first step
        return c.self_kv[i][j] if c.self_kv[i] else c.cross_kv[i][j][:, :, :0]

    cross = [tuple(torch.cat([F.pad(c.cross_kv[i][j], (0, 0, 0, longest_src - s)) for c, s in zip(caches, src)])
                   for j in (0, 1)) for i in layers]
    key_mask = torch.cat([F.pad(c.key_mask, (0, longest_src - s), value=float("-inf")) for c, s in zip(caches, src)])
    self_mask = torch.zeros(len(caches), 1, 1, longest, device=key_mask.device)
    for row, n in enumerate(lengths):
        self_mask[row, ..., :longest - n] = float("-inf")
    self_kv = [[torch.cat([F.pad(keys(c, i, j), (0, 0, longest - n, 0)) for c, n in zip(caches, lengths)])
                for j in (0, 1)] for i in layers] if longest else [[] for _ in layers]
    return Seq2SeqCache(cross, key_mask, self_kv, self_mask)


def split_cache(batch: Seq2SeqCache, caches: list[Seq2SeqCache], added: int = 1):
    """The batch's self-attention keys and values back into each row's cache, `added` positions longer."""
    for row, c in enumerate(caches):
        n = c.length + added
        c.self_kv = [[t[row:row + 1, :, t.shape[2] - n:] for t in kv] for kv in batch.self_kv]


class T5(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = _embedding(cfg.vocab_size, cfg.dim)
        self.encoder = nn.ModuleList(T5Block(cfg, decoder=False) for _ in range(cfg.n_encoder_layers))
        self.encoder_bias = _embedding(cfg.rel_buckets, cfg.n_heads)
        self.encoder_norm = make_norm(cfg)
        self.layers = nn.ModuleList(T5Block(cfg, decoder=True) for _ in range(cfg.n_layers))
        self.decoder_bias = _embedding(cfg.rel_buckets, cfg.n_heads)
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def tie_weights(self):
        if self.cfg.tie_embeddings and isinstance(self.output, nn.Linear):
            self.output.weight = self.tok_embeddings.weight

    def _position_bias(self, table: nn.Embedding, queries: torch.Tensor, keys: torch.Tensor,
                       bidirectional: bool) -> torch.Tensor:
        buckets = relative_buckets(keys[None, :] - queries[:, None], bidirectional, self.cfg.rel_buckets,
                                   self.cfg.rel_max_distance)
        return table(buckets).permute(2, 0, 1).unsqueeze(0).float()  # (1, H, T, S)

    def encode(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> Seq2SeqCache:
        """Run the encoder on (B, S) prompt tokens (`pad_mask` (B, S): True for real tokens) and compute every
        decoder block's cross-attention keys and values: the cache decoding starts from."""
        B, S = tokens.shape
        pad_mask = torch.ones(B, S, dtype=torch.bool, device=tokens.device) if pad_mask is None else pad_mask
        key_mask = torch.zeros(B, 1, 1, S, device=tokens.device).masked_fill(~pad_mask[:, None, None, :],
                                                                             float("-inf"))
        positions = torch.arange(S, device=tokens.device)
        bias = self._position_bias(self.encoder_bias, positions, positions, bidirectional=True) + key_mask
        x = F.dropout(self.tok_embeddings(tokens), self.cfg.dropout, self.training)
        for block in self.encoder:
            x = block(x, bias)
        memory = F.dropout(self.encoder_norm(x), self.cfg.dropout, self.training)
        return Seq2SeqCache([block.cross.cross_kv(memory) for block in self.layers], key_mask)

    def forward(self, tokens: torch.Tensor, cache: Seq2SeqCache | None = None, keep_cache: bool = True,
                source: torch.Tensor | None = None, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for (B, T) decoder tokens that follow the ones `cache` holds. With keep_cache
        False the self-attention keys are not kept. Training passes the `source` tokens (and their mask)
        instead of a cache: the encoder runs in the same call, so a wrapper (DDP) sees one forward."""
        if cache is None:
            cache, keep_cache = self.encode(source, source_mask), False
        start, T = cache.length, tokens.shape[1]
        positions = torch.arange(start + T, device=tokens.device)
        bias = self._position_bias(self.decoder_bias, positions[start:], positions, bidirectional=False)
        bias = bias.masked_fill(positions[None, None, start:, None] < positions[None, None, None, :], float("-inf"))
        if cache.self_mask is not None:  # the padding of rows stacked earlier; the positions since are real
            bias = bias + F.pad(cache.self_mask, (0, start + T - cache.self_mask.shape[-1]))
        x = F.dropout(self.tok_embeddings(tokens), self.cfg.dropout, self.training)
        for i, block in enumerate(self.layers):
            x = block(x, bias, cache.cross_kv[i], cache.key_mask, cache.self_kv[i] if keep_cache else None)
        x = F.dropout(self.norm(x), self.cfg.dropout, self.training)
        if self.cfg.logit_scale is not None:
            x = x * self.cfg.logit_scale
        return linear(x, self.output).float()

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype
