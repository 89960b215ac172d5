"""A LLaMA-shaped decode step in one call to the C kernel, when every block matmul is in GGUF blocks.

Through PyTorch, one token costs about fifteen small ops a layer (norms, rotary, cache writes, attention,
SwiGLU); on a 22-layer model their dispatch is about 10 ms, a third of a Q4_0 token. ggml_gemv.c's
`ggml_llama_decode` runs the same math in one parallel region. The generation layer asks for a plan once per
decoding run (generate/decoding.py) and falls back to the model's forward, which stays the reference (the
tests hold the two together), for everything else: prompts, batches, other families, float or int4 weights,
bf16, gradients, LoRA.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from camelid.model import ggml_kernel
from camelid.model.kv_cache import KVCache
from camelid.model.quant import GGMLLinear
from camelid.model.transformer import linear


@dataclass
class DecodePlan:
    layers: ctypes.Array  # ggml_kernel.LlamaLayer per block
    dims: ggml_kernel.LlamaDims
    head: ggml_kernel.LlamaHead | None  # the final norm and output layer, where the C step runs them too
    cache: tuple = (None, None, None)  # (the last KVCache seen, its k pointers, its v pointers)


def _shaped_for_it(model) -> bool:
    cfg = model.cfg
    return (cfg.norm == "rmsnorm" and cfg.pre_norm and not cfg.parallel_residual and cfg.gated_mlp
            and cfg.activation == "silu" and cfg.positions == "rope" and not cfg.rope_interleaved
            and cfg.rotary_dim == cfg.head_dim and not cfg.embed_proj_dim and not cfg.qk_norm and not cfg.sliding_window
            and not (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias) and model.dtype == torch.float32
            and not (cfg.norm_plus_one or cfg.embed_scale or cfg.post_norms or cfg.rope_local_theta
                     or cfg.attn_scale or cfg.attn_softcap or cfg.final_softcap)
            and cfg.rope_attention_factor == 1.0 and not cfg.n_experts
            and (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type")) not in ("longrope",
                                                                                                      "dynamic")
            and model.device.type == "cpu" and ggml_kernel.available())


def _kind(layer) -> int | None:
    if type(layer) is not GGMLLinear or layer.bias is not None:
        return None
    kind = ggml_kernel.SPLIT[int(layer.ggml_type)] if layer.split else int(layer.ggml_type)
    return kind if kind in ggml_kernel.TYPE_IDS else None


def build_plan(model) -> DecodePlan | None:
    """The C step's view of the model's weights (raw pointers: valid while the model's modules and tensors
    stay as they are, so a plan lives for one decoding run), or None when the model is not one it runs."""
    if type(model.layers[0].attn.wqkv) is not GGMLLinear or not _shaped_for_it(model):
        return None
    layers = []
    for block in model.layers:
        parts = [block.attn.wqkv, block.attn.wo, block.mlp.w_in, block.mlp.w_out]
        kinds = [_kind(p) for p in parts]
        norms = [block.attn_norm.weight, block.mlp_norm.weight]
        if None in kinds or not all(n.dtype == torch.float32 and n.is_contiguous() for n in norms):
            return None
        layers.append(ggml_kernel.LlamaLayer(*(n.data_ptr() for n in norms), *(p.blocks.data_ptr() for p in parts),
                                             *kinds))
    cfg = model.cfg
    dims = ggml_kernel.LlamaDims(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, 0, cfg.norm_eps)
    return DecodePlan((ggml_kernel.LlamaLayer * len(layers))(*layers), dims, _head(model))


def _head(model) -> ggml_kernel.LlamaHead | None:
    norm, kind = model.norm, _kind(model.output)
    if (kind is None or model.cfg.embed_proj_dim or norm is None or norm.weight.dtype != torch.float32
            or not norm.weight.is_contiguous()):
        return None
    return ggml_kernel.LlamaHead(norm.weight.data_ptr(), model.output.blocks.data_ptr(), kind,
                                 model.output.out_features)


def _cache_pointers(plan: DecodePlan, kv_cache: KVCache):
    if plan.cache[0] is not kv_cache:
        pointers = [(ctypes.c_void_p * len(ts))(*(t.data_ptr() for t in ts)) for ts in (kv_cache.k, kv_cache.v)]
        plan.cache = (kv_cache, *pointers)
    return plan.cache[1], plan.cache[2]


def decode_step(plan: DecodePlan, model, tokens: torch.Tensor, start: int, kv_cache: KVCache) -> torch.Tensor | None:
    """Logits (1, 1, vocab) for one token (1, 1) at cache position `start`, what the model's forward returns
    for it, or None where the C step does not apply to this call."""
    if (tokens.shape != (1, 1) or model.training or torch.is_grad_enabled() or start >= kv_cache.max_len
            or not all(t.shape[0] == 1 and t.dtype == torch.float32 and t.is_contiguous()
                       for t in kv_cache.k + kv_cache.v)):
        return None
    plan.dims.max_len = kv_cache.max_len
    k_ptrs, v_ptrs = _cache_pointers(plan, kv_cache)
    freqs = torch.tensor(float(start)) * model.inv_freq  # the forward's rotary angles, halves not interleaved
    freqs = torch.cat((freqs, freqs))
    x = model.tok_embeddings(tokens).reshape(-1).clone()
    logits = None if plan.head is None else torch.empty(plan.head.n_vocab)
    if not ggml_kernel.llama_decode(plan.layers, plan.dims, x, k_ptrs, v_ptrs, start, freqs.cos(), freqs.sin(),
                                    plan.head, logits):
        return None
    if logits is None:
        return linear(model.norm(x.view(1, 1, -1)), model.output).float()
    return logits.view(1, 1, -1)
