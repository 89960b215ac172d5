"""The one decoder-only transformer behind every family camelid runs.

Families differ only by ModelConfig switches. Projections are fused (one QKV matmul, one gate+up matmul)
because decode on a CPU is dominated by per-op overhead and memory reads, not by FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from camelid.errors import CamelidError
from camelid.model.config import ModelConfig
from camelid.model.dropout import dropout
from camelid.model.kv_cache import KVCache


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """layer(x); a plain nn.Linear is called as F.linear, skipping Module.__call__ (hooks and all): at batch 1
    on a CPU its overhead is a visible share of a small model's token. Other layers (LoRA, quantized, a
    decode kernel swapped in from outside) bring their own forward."""
    if type(layer) is nn.Linear:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, but on the meta device (a shell that a checkpoint fills) without drawing its random
    init: on meta, normal_ goes through PyTorch's reference ops and imports the compiler stack (~1.5 s)."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one  # Gemma's: the weight is stored as w and scales by (1 + w), in fp32
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 like the reference implementations, or bf16 drifts from them.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_plus_one)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def alibi_slopes(cfg: ModelConfig) -> torch.Tensor:
    """ALiBi's per-head slopes as Bloom, MPT and llama.cpp compute them: 2^(-max_bias * (h + 1) / n) for the
    first n heads, n the largest power of two not above the head count, then the odd steps of the series for
    2n heads."""
    n = 2 ** math.floor(math.log2(cfg.n_heads))
    m0, m1 = 2.0 ** (-cfg.alibi_max_bias / n), 2.0 ** (-cfg.alibi_max_bias / 2 / n)
    return torch.tensor([m0 ** (h + 1) if h < n else m1 ** (2 * (h - n) + 1) for h in range(cfg.n_heads)],
                        device="cpu")


def rope_tables(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's rotary frequency buffers: `inv_freq`, LongRoPE's `inv_freq_long` (for sequences past the
    original context), and the sliding blocks' own `inv_freq_local`."""
    tables = {"inv_freq": rope_frequencies(cfg)}
    if (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type")) == "longrope":
        tables["inv_freq_long"] = rope_frequencies(cfg, long=True)
    if cfg.rope_local_theta:
        tables["inv_freq_local"] = rope_frequencies(cfg, cfg.rope_local_theta, scaled=False)
    return tables


def rope_frequencies(cfg: ModelConfig, theta: float | None = None, scaled: bool = True,
                     long: bool = False) -> torch.Tensor:
    rot = cfg.rotary_dim
    theta = theta or cfg.rope_theta
    # on the CPU even while a model is built on the meta device: meta arithmetic imports the compiler stack
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.int64, device="cpu").float() / rot))
    if cfg.rope_fp16_freqs:
        inv_freq = inv_freq.half().float()
    scaling = (cfg.rope_scaling if scaled else None) or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq = _yarn_frequencies(theta, rot, scaling)
    elif kind == "longrope":  # one divisor per frequency, for short sequences or for long ones
        factors = scaling["long_factor" if long else "short_factor"]
        shape = torch.arange(0, rot, 2, dtype=torch.int64, device="cpu").float() / rot
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * theta ** shape)
    elif kind == "factors":  # GGUF's rope_freqs tensor: one divisor per frequency
        inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=inv_freq.dtype, device="cpu")
    return inv_freq


def _yarn_frequencies(theta: float, rot: int, s: dict) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are interpolated by
    `factor`, those turning more than beta_fast times kept, and a linear ramp blends the band between."""
    def correction_dim(rotations):
        return rot * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(rot // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    freqs = theta ** (torch.arange(0, rot, 2, device="cpu").float() / rot)
    keep = 1 - ramp
    return (1.0 / (s["factor"] * freqs)) * (1 - keep) + (1.0 / freqs) * keep


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    old_len = s["original_max_position_embeddings"]
    low_wavelen = old_len / s["low_freq_factor"]
    high_wavelen = old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 parts: int = 1) -> torch.Tensor:
    """Rotate the first `rot` features of each head; x is (B, H, T, D), cos/sin are (B, 1, T, rot). With
    `parts` 2 each half of them rotates on its own (GLM's two positions)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = torch.cat([_rotate(p, interleaved) for p in x_rot.chunk(parts, dim=-1)], dim=-1) if parts > 1 \
        else _rotate(x_rot, interleaved)
    # Under autocast q and k arrive in bf16 while the tables follow the fp32 residual stream: rotated in fp32,
    # they go on in their own dtype, as attention (bf16 under autocast) wants them.
    out = (x_rot * cos + rotated * sin).to(x.dtype)
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:  # GPT-J rotates neighbouring pairs (x0, x1), (x2, x3), ...
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)  # LLaMA/NeoX in Hugging Face layout rotate the two halves
    return torch.cat((-x2, x1), dim=-1)


def explicit_attention_pays(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Training in bf16/fp16 on a CPU, with scores small enough to keep: there PyTorch's flash kernel's backward
    is slow, and two matmuls and a softmax train ~10% faster end to end (measured on bench/train.py's model;
    in fp32 the flash kernel is the faster one)."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and B * H * T * k.shape[2] * 4 <= EXPLICIT_SCORES_BYTES)


EXPLICIT_SCORES_BYTES = 32 << 20


def explicit_attention(q, k, v, mask, dropout_p: float = 0.0, scale: float | None = None,
                       softcap: float | None = None):
    """Softmax(q k^T / sqrt(d)) v with the scores in memory, for decode (one new token over the cache, where two
    small matmuls beat a flash kernel), for bf16/fp16 training on a CPU (see explicit_attention_pays), and for
    soft-capped scores, which PyTorch's kernels do not compute. Query heads are folded into rows by the KV head
    they share, so grouped-query attention needs no copy of K and V.
    mask (B or 1, 1, T, S) bool, or (B or 1, H, T, S) float to add to the scores (ALiBi); None means causal."""
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    group = H // n_kv
    scores = (q.reshape(B, n_kv, group * T, D) @ k.transpose(-1, -2)).float() * (scale or D ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T).view(1, 1, T, S)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores.view(B, n_kv, group, T, S) + mask.view(mask.shape[0], n_kv, group, T, S)
    elif mask is not None:
        scores = scores.view(B, n_kv, group, T, S).masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = scores.view(B, n_kv, group * T, S).softmax(dim=-1).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_size = cfg.n_heads * cfg.head_dim
        self.kv_size = cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.q_size, cfg.dim, bias=cfg.attn_out_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None

    def forward(self, x, rope, mask, kv_cache: KVCache | None, layer: int, start: int, keep=None):
        """keep (N,) indices into the B*T positions: the output projection runs for those only -> (N, dim)."""
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = linear(x, self.wqkv)
        if cfg.qkv_clip:
            qkv = qkv.clamp(-cfg.qkv_clip, cfg.qkv_clip)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            parts = 2 if cfg.positions == "glm_2d" else 1
            q = apply_rotary(q, cos, sin, cfg.rope_interleaved, parts)
            k = apply_rotary(k, cos, sin, cfg.rope_interleaved, parts)
        if kv_cache is not None:
            cached_k, cached_v = kv_cache.update(layer, start, k, v)
            if isinstance(start, torch.Tensor) or start > 0:  # a first block uses its fresh keys and values
                k, v = cached_k, cached_v
        gqa = cfg.n_kv_heads != cfg.n_heads
        p = cfg.dropout if self.training else 0.0
        if (T == 1 and not self.training) or cfg.attn_softcap:
            y = explicit_attention(q, k, v, mask, p, cfg.attn_scale, cfg.attn_softcap)
        elif self.training and explicit_attention_pays(q, k):
            y = explicit_attention(q, k, v, mask, p, cfg.attn_scale)
        elif mask is None:  # a causal block that starts at 0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, dropout_p=p,
                                               scale=cfg.attn_scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, dropout_p=p,
                                               scale=cfg.attn_scale)
        y = y.transpose(1, 2).reshape(B, T, self.q_size)
        return linear(y if keep is None else y.flatten(0, 1)[keep], self.wo)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.ffn_dim
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.activation]
        self.w_in = nn.Linear(cfg.dim, hidden * (2 if self.gated else 1), bias=cfg.mlp_bias)
        self.w_out = nn.Linear(hidden, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        h = linear(x, self.w_in)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate)
            # in place where nothing records it for a backward pass: half the time of a prompt's largest op
            h = h * up if h.requires_grad else h.mul_(up)
        else:
            h = self.act(h)
        return linear(h, self.w_out)


class MoE(nn.Module):
    """A mixture of experts: a router scores every expert, each token goes through the n_experts_used it
    scores highest (softmax, then top-k), and their outputs are summed by those weights. Only the experts some
    token picked run, each on the tokens that picked it, so decoding one token reads n_experts_used experts'
    weights, not all of them. A shared expert, where the family has one, runs for every token, gated."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, cfg.expert_ffn_dim) for _ in range(cfg.n_experts))
        self.shared = MLP(cfg, cfg.shared_expert_dim) if cfg.shared_expert_dim else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_dim else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = linear(x, self.router).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.cfg.n_experts_used, dim=-1)
        if self.cfg.moe_renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        if x.shape[0] == 1:  # decoding: the picked experts in turn, with no index bookkeeping
            for j, e in enumerate(chosen[0].tolist()):
                out = out + (self.experts[e](x) * weights[0, j]).to(x.dtype)
        else:
            for e in chosen.unique().tolist():
                rows, slot = (chosen == e).nonzero(as_tuple=True)
                y = self.experts[e](x[rows]) * weights[rows, slot, None]
                out.index_add_(0, rows, y.to(x.dtype))
        if self.shared is not None:
            out = out + torch.sigmoid(linear(x, self.shared_gate)) * self.shared(x)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = None if cfg.shared_parallel_norm else make_norm(cfg)
        self.mlp = MoE(cfg) if moe else MLP(cfg)
        self.post_attn_norm = make_norm(cfg) if cfg.post_norms else None
        self.post_mlp_norm = make_norm(cfg) if cfg.post_norms else None

    def forward(self, x, rope, mask, kv_cache, layer, start, keep=None):
        """keep (N,) indices into the B*T positions: every position still gives its keys and values, but only
        those go on through the output projection and the MLP, returned as (N, dim). The last block needs no
        more when only some positions' logits are wanted."""
        cfg = self.cfg
        drop = partial(dropout, p=cfg.dropout, training=self.training)
        attn = self.attn
        rest = x if keep is None else x.flatten(0, 1)[keep]
        if cfg.parallel_residual:
            h = self.attn_norm(x)
            mlp_in = h if self.mlp_norm is None else self.mlp_norm(x)
            mlp_in = mlp_in if keep is None else mlp_in.flatten(0, 1)[keep]
            return rest + drop(attn(h, rope, mask, kv_cache, layer, start, keep)) + drop(self.mlp(mlp_in))
        if cfg.residual_scale:  # GLM-130B's DeepNorm: the residual is the normalized input, scaled
            h = self.attn_norm(x)
            x = (h if keep is None else h.flatten(0, 1)[keep]) * cfg.residual_scale \
                + drop(attn(h, rope, mask, kv_cache, layer, start, keep))
            h = self.mlp_norm(x)
            return h * cfg.residual_scale + drop(self.mlp(h))
        if not cfg.pre_norm:  # OPT-350m normalises after each residual sum
            x = self.attn_norm(rest + drop(attn(x, rope, mask, kv_cache, layer, start, keep)))
            return self.mlp_norm(x + drop(self.mlp(x)))
        if self.post_attn_norm is not None:  # Gemma 2/3 normalise each branch's output too
            x = rest + drop(self.post_attn_norm(attn(self.attn_norm(x), rope, mask, kv_cache, layer, start, keep)))
            return x + drop(self.post_mlp_norm(self.mlp(self.mlp_norm(x))))
        x = rest + drop(attn(self.attn_norm(x), rope, mask, kv_cache, layer, start, keep))
        return x + drop(self.mlp(self.mlp_norm(x)))


def packed_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that restart at each segment and a causal mask that never crosses one, for packed rows."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    first = torch.ones_like(segment_ids, dtype=torch.bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.cummax(torch.where(first, index, 0), dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    return index - segment_start, mask.unsqueeze(1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        emb_dim = cfg.embed_proj_dim or cfg.dim
        self.tok_embeddings = _embedding(cfg.vocab_size, emb_dim)
        if cfg.positions == "learned":
            self.pos_embeddings = _embedding(cfg.max_seq_len + cfg.learned_pos_offset, cfg.dim)
        self.embed_norm = make_norm(cfg, emb_dim) if cfg.embed_norm else None
        if cfg.embed_proj_dim:
            self.embed_proj_in = nn.Linear(emb_dim, cfg.dim, bias=False)
            self.embed_proj_out = nn.Linear(cfg.dim, emb_dim, bias=False)
        self.layers = nn.ModuleList(Block(cfg, cfg.moe(i)) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.final_norm else None
        self.output = nn.Linear(emb_dim, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.score_head:
            self.score = nn.Linear(emb_dim, 1, bias=False)
        if cfg.rotates:
            for name, table in rope_tables(cfg).items():
                self.register_buffer(name, table, persistent=False)
        if cfg.positions == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg), persistent=False)
        self.activation_checkpointing = False

    def tie_weights(self):
        if self.cfg.tie_embeddings and isinstance(self.output, nn.Linear):  # a quantized output has its own copy
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, start: int | torch.Tensor = 0, kv_cache: KVCache | None = None,
                pad_mask: torch.Tensor | None = None, last_only: bool = False,
                segment_ids: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                layout: tuple[torch.Tensor, torch.Tensor] | None = None, scores: bool = False,
                hidden: bool = False) -> torch.Tensor:
        """Logits (fp32) for `tokens` (B, T) placed at cache positions start..start+T-1.

        pad_mask (B, start+T), True for real tokens, marks left padding in a batch of unequal prompts;
        positions then count real tokens only, so a padded row computes what it would alone.
        `start` may instead be a (B,) tensor with each row's own first position (continuous batching, where
        every request in the batch is at a different length: one new token per row, or several to verify).
        segment_ids (B, T) packs several samples in a row (training, from position 0): a token attends only
        to earlier tokens of its own segment, and positions restart at each segment.
        layout = (positions (B, T), mask (B, 1, T, T) bool) is any other arrangement a caller builds from
        position 0, e.g. one context followed by several continuations that each see it but not each other.
        logits_at (B, T) bool returns logits (N, vocab) for those positions only: fine-tuning needs none for
        the prompt and padding, and the output layer is a large share of a small model's work and memory.
        scores returns the score head's scalar (fp32) instead of logits: (B, T), or (N,) with logits_at.
        hidden returns the final hidden states (B, T, dim, fp32, after the last norm) instead of logits.
        """
        cfg = self.cfg
        B, T = tokens.shape
        if logits_at is not None:  # as indices: a compiled model then breaks its graph here only, once
            logits_at = logits_at.flatten().nonzero().squeeze(1)
        if cfg.positions == "glm_2d" and (layout is not None or segment_ids is not None):
            raise CamelidError("positions 'glm_2d' (ChatGLM-6B) come from each prompt's own tokens: a packed or laid "
                               "out batch has none to give")
        if layout is not None:
            positions, mask = layout
        elif segment_ids is not None:
            positions, mask = packed_positions_and_mask(segment_ids)
        else:
            positions, mask = self._positions_and_mask(B, T, start, pad_mask, tokens.device)
            if cfg.positions == "glm_2d":
                positions, mask = self._glm_blocks(tokens, positions, mask, start, pad_mask, kv_cache)
        in_cache_order = layout is None and segment_ids is None
        masks = (mask, self._window_mask(positions, mask, start, pad_mask, in_cache_order)
                 if cfg.sliding_window else mask)
        x = self.tok_embeddings(tokens)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if cfg.positions == "alibi":
            masks = tuple(self._alibi(positions, m, start, pad_mask, in_cache_order, x.dtype) for m in masks)
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.dim ** 0.5, dtype=x.dtype)
        x = dropout(x, cfg.dropout, self.training)
        if cfg.embed_proj_dim:
            x = linear(x, self.embed_proj_in)
        ropes = (None, None)
        if cfg.positions == "learned":
            x = x + self.pos_embeddings(positions + cfg.learned_pos_offset)
        elif cfg.rotates:
            rope = self._rope(positions, self._inv_freq(positions), x.dtype, cfg.rope_attention_factor)
            ropes = (rope, self._rope(positions, self.inv_freq_local, x.dtype) if cfg.rope_local_theta else rope)
        x = self._blocks(x, ropes, masks, kv_cache, start, None if last_only else logits_at)
        if last_only:
            x = x[:, -1:]
        if self.norm is not None:
            x = self.norm(x)
        if cfg.embed_proj_dim:
            x = linear(x, self.embed_proj_out)
        if hidden:
            return x.float()
        if scores:  # the head may be fp32 over a bf16 base: it is trained, the base is not
            return linear(x.to(self.score.weight.dtype), self.score).float().squeeze(-1)
        logits = linear(x, self.output).float()
        if cfg.final_softcap:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits

    def _inv_freq(self, positions):
        """As transformers runs them, for a forward whose last position lies past the original context (the
        cache keeps what earlier steps rotated): LongRoPE's long factors, or dynamic NTK's base grown for
        this length. Otherwise the plain table."""
        scaling = self.cfg.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("longrope", "dynamic"):
            return self.inv_freq
        longest, original = int(positions.max()) + 1, scaling["original_max_position_embeddings"]
        if longest <= original:
            return self.inv_freq
        if kind == "longrope":
            return self.inv_freq_long
        rot, factor = self.cfg.rotary_dim, scaling["factor"]
        base = self.cfg.rope_theta * ((factor * longest / original) - (factor - 1)) ** (rot / (rot - 2))
        steps = torch.arange(0, rot, 2, dtype=torch.int64, device=self.inv_freq.device).float() / rot
        return 1.0 / (base ** steps)

    def _rope(self, positions, inv_freq, dtype, factor: float = 1.0):
        if positions.dim() == 3:  # GLM's two positions: (cos, sin) of each, for its half of every head
            first, second = (self._rope(positions[..., i], inv_freq, dtype) for i in (0, 1))
            return tuple(torch.cat(pair, dim=-1) for pair in zip(first, second))
        freqs = positions.unsqueeze(-1).float() * inv_freq
        if not self.cfg.rope_interleaved:
            freqs = torch.cat((freqs, freqs), dim=-1)
        else:
            freqs = freqs.repeat_interleave(2, dim=-1)
        cos, sin = freqs.cos(), freqs.sin()
        if factor != 1.0:  # YaRN and LongRoPE scale the rotation's magnitude
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)

    def _blocks(self, x, ropes, masks, kv_cache, start, keep=None):
        """The blocks on x (B, T, dim); ropes and masks are (full attention's, sliding-window blocks'). With keep
        (N,) indices into the B*T positions, the last block's output at those only (N, dim): what only feeds
        other positions' logits is skipped."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            slides = self.cfg.slides(i)
            args = (x, ropes[slides], masks[slides], kv_cache, i, start, keep if i == last else None)
            if self.activation_checkpointing and self.training:  # recompute activations in backward
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x

    def _positions_and_mask(self, B, T, start, pad_mask, device):
        if isinstance(start, torch.Tensor):  # each row's own positions: T new tokens from its start
            positions = start.view(B, 1) + torch.arange(T, device=device)
            keys = torch.arange(int(positions.max()) + 1, device=device)
            return positions, (keys <= positions.unsqueeze(-1)).unsqueeze(1)
        steps = torch.arange(start, start + T, device=device)
        if pad_mask is None:
            positions = steps.unsqueeze(0).expand(B, T)
            if start == 0 or T == 1:
                return positions, None
            keys = torch.arange(start + T, device=device)
            return positions, (keys <= steps.unsqueeze(1)).view(1, 1, T, start + T)
        positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
        keys = torch.arange(start + T, device=device)
        causal = keys <= steps.unsqueeze(1)  # (T, S)
        # A padding query still sees itself, so no softmax row is empty (which would give NaN).
        mask = causal & (pad_mask[:, None, :] | (keys == steps.unsqueeze(1)))
        return positions, mask.unsqueeze(1)

    def _glm_blocks(self, tokens, index, mask, start, pad_mask, kv_cache):
        """GLM's 2D positions (B, T, 2) and its mask, from each token's index in its row (`index`). The
        context, before the start token, attends both ways; from the start token on, a token's first position
        is the mask token's and its second counts from 1. A prompt (start 0) gives each row's context length
        and mask position, which the cache keeps for the steps that follow."""
        if isinstance(start, int) and start == 0:
            context = _glm_context(tokens.tolist(), index.tolist(), self.cfg).to(tokens.device)
            if kv_cache is not None:
                kv_cache.glm_context = context
        else:
            context = getattr(kv_cache, "glm_context", None)
            if context is None:
                raise CamelidError("positions 'glm_2d' (ChatGLM-6B): a continuation needs the cache of its prompt")
        ctx, at = context[:, :1], context[:, 1:]
        block = index >= ctx
        first = torch.where(block & (at >= 0), at, index)
        positions = torch.stack((first, (index - ctx + 1).clamp(min=0)), dim=-1)
        T = tokens.shape[1]
        if T == 1 and not (isinstance(start, int) and start == 0):
            return positions, mask  # one new token sees every earlier one already
        S = (start if isinstance(start, int) else int(start.max())) + T
        keys = torch.arange(S, device=tokens.device).expand(tokens.shape[0], S)
        real = torch.ones_like(keys, dtype=torch.bool)
        if pad_mask is not None:
            real = pad_mask[:, :S]
            keys = (real.long().cumsum(-1) - 1).clamp(min=0)
        two_way = ((keys < ctx) & real)[:, None, None, :]
        causal = mask if mask is not None else (torch.arange(S, device=tokens.device)
                                                <= torch.arange(start, start + T, device=tokens.device)[:, None])
        return positions, causal | two_way

    def _window_mask(self, positions, mask, start, pad_mask, in_cache_order: bool) -> torch.Tensor:
        """`mask` (None: causal) narrowed to the keys within sliding_window positions of each query."""
        window = self.cfg.sliding_window
        T = positions.shape[1]
        if mask is None:  # one block from `start`, no padding: a band of the causal mask
            S = start + T
            return torch.ones(T, S, dtype=torch.bool, device=positions.device).tril(start).triu(
                start - window + 1).view(1, 1, T, S)
        return mask & (_distance(positions, mask.shape[-1], start, pad_mask, in_cache_order) < window).unsqueeze(1)

    def _alibi(self, positions, mask, start, pad_mask, in_cache_order: bool, dtype) -> torch.Tensor:
        """`mask` (None: causal) as scores to add: ALiBi's -slope * distance for the keys it lets through,
        -inf for the others, (B or 1, H, T, S)."""
        T = positions.shape[1]
        if mask is None:
            S = start + T
            mask = torch.ones(T, S, dtype=torch.bool, device=positions.device).tril(start).view(1, 1, T, S)
        distance = _distance(positions, mask.shape[-1], start, pad_mask, in_cache_order)
        bias = -self.alibi_slopes.view(1, -1, 1, 1) * distance.unsqueeze(1).float()
        return bias.masked_fill(~mask, float("-inf")).to(dtype)

    @property
    def device(self) -> torch.device:
        return self.layers[0].attn_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (a norm's; matmul weights may be quantized)."""
        return self.layers[0].attn_norm.weight.dtype

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cfg = self.cfg
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                       dtype=self.dtype, device=self.device)


def _glm_context(rows: list[list[int]], index: list[list[int]], cfg: ModelConfig) -> torch.Tensor:
    """(B, 2): each row's context length (the start token's index; past the end where there is none) and the
    index of its mask token (the first of glm_mask_ids the row holds; -1: none, positions go on counting)."""
    out = []
    for row, idx in zip(rows, index):
        ctx = idx[row.index(cfg.glm_start_id)] if cfg.glm_start_id in row else idx[-1] + 1
        at = next((idx[row.index(m)] for m in cfg.glm_mask_ids or () if m in row), -1)
        out.append((ctx, at))
    return torch.tensor(out, dtype=torch.long)


def _distance(positions, S: int, start, pad_mask, in_cache_order: bool) -> torch.Tensor:
    """(B, T, S) query position minus key position. Keys are the cache's positions (real tokens counted, under
    left padding), or, for packed rows and other layouts, the tokens themselves."""
    if not in_cache_order:
        keys = positions
    elif isinstance(start, torch.Tensor) or pad_mask is None:
        keys = torch.arange(S, device=positions.device).view(1, S)
    else:
        keys = (pad_mask[:, :S].long().cumsum(-1) - 1).clamp(min=0)
    return positions.int().unsqueeze(-1) - keys.int().unsqueeze(-2)


def init_weights(model: Transformer, std: float = 0.02) -> Transformer:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit norms, and the projections that write
    into the residual stream (attention output, MLP output) scaled by 1/sqrt(2 * n_layers), so the residual
    stream's variance does not grow with depth."""
    residual_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            is_residual = name.endswith(("attn.wo", "w_out"))
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    model.tie_weights()
    return model


def add_score_head(model: Transformer, std: float = 0.02) -> Transformer:
    """A language model made a reward model: a new scalar head on the final hidden state, N(0, std) in fp32
    (transformers' ForSequenceClassification head, read at the last token)."""
    model.cfg = dataclasses.replace(model.cfg, score_head=True)
    emb = model.tok_embeddings.weight
    model.score = nn.Linear(model.cfg.embed_proj_dim or model.cfg.dim, 1, bias=False, device=emb.device)
    nn.init.normal_(model.score.weight, std=std)
    return model


def count_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.tie_weights()
    return sum(p.numel() for p in model.parameters())
