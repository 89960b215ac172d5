"""A LLaMA-shaped decode step in one call to the C kernel, when every block matmul is in GGUF blocks.

Through PyTorch, one token costs about fifteen small ops a layer (norms, rotary, cache writes, attention,
SwiGLU); on a 22-layer model their dispatch is about 10 ms, a third of a Q4_0 token. ggml_gemv.c's
`ggml_llama_decode` runs the same math in one parallel region. The model's forward stays the reference:
the tests hold the two together. Everything else (prompts, batches, other families, float or int4 weights,
bf16, gradients, LoRA) goes through the forward as it is.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import torch

from camelid.model import ggml_kernel
from camelid.model.kv_cache import KVCache
from camelid.model.quant import GGMLLinear


@dataclass
class DecodePlan:
    layers: ctypes.Array  # ggml_kernel.LlamaLayer per block
    dims: ggml_kernel.LlamaDims
    parts: list  # the modules and tensors the pointers come from (see _parts)
    head: ggml_kernel.LlamaHead | None  # the final norm and output layer, where the C step runs them too
    cache: tuple = (None, None, None)  # (weakref to the last KVCache seen, its k pointers, its v pointers)


def _parts(model) -> list:
    """What the plan's pointers depend on: once any of these objects is swapped (LoRA wrapping, a reload, a
    move, a repack), the plan is rebuilt. Checked every token, so read from the modules' own dicts: through
    nn.Module.__getattr__ this took a third of a millisecond on a 22-layer model."""
    parts = []
    for block in model.layers:
        sub = block._modules
        attn, mlp = sub["attn"]._modules, sub["mlp"]._modules
        parts += [sub["attn_norm"]._parameters.get("weight"), sub["mlp_norm"]._parameters.get("weight")]
        for layer in (attn["wqkv"], attn["wo"], mlp["w_in"], mlp["w_out"]):
            parts += [layer, layer._buffers.get("blocks")]
    norm, output = model._modules["norm"], model._modules["output"]
    return parts + [norm, None if norm is None else norm._parameters.get("weight"), output,
                    output._buffers.get("blocks")]


def _shaped_for_it(model) -> bool:
    cfg = model.cfg
    return (cfg.norm == "rmsnorm" and cfg.pre_norm and not cfg.parallel_residual and cfg.gated_mlp
            and cfg.activation == "silu" and cfg.positions == "rope" and not cfg.rope_interleaved
            and cfg.rotary_dim == cfg.head_dim and model.dtype == torch.float32 and model.device.type == "cpu"
            and ggml_kernel.available())


def _kind(layer) -> int | None:
    if type(layer) is not GGMLLinear or layer.bias is not None:
        return None
    kind = ggml_kernel.SPLIT[int(layer.ggml_type)] if layer.split else int(layer.ggml_type)
    return kind if kind in ggml_kernel.TYPE_IDS else None


def build_plan(model) -> DecodePlan | None:
    """The C step's view of the model's weights, or None when the model is not one it runs."""
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
    return DecodePlan((ggml_kernel.LlamaLayer * len(layers))(*layers), dims, _parts(model), _head(model))


def _head(model) -> ggml_kernel.LlamaHead | None:
    norm, kind = model.norm, _kind(model.output)
    if (kind is None or model.cfg.embed_proj_dim or norm is None or norm.weight.dtype != torch.float32
            or not norm.weight.is_contiguous()):
        return None
    return ggml_kernel.LlamaHead(norm.weight.data_ptr(), model.output.blocks.data_ptr(), kind,
                                 model.output.out_features)


def _cache_pointers(plan: DecodePlan, kv_cache: KVCache):
    seen = plan.cache[0]
    if seen is None or seen() is not kv_cache:  # a weak reference: the plan must not keep a cache alive
        pointers = [(ctypes.c_void_p * len(ts))(*(t.data_ptr() for t in ts)) for ts in (kv_cache.k, kv_cache.v)]
        plan.cache = (weakref.ref(kv_cache), *pointers)
    return plan.cache[1], plan.cache[2]


def decode_step(model, x: torch.Tensor, rope, mask, kv_cache: KVCache | None, start,
                with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Every block of one decode step on x (1, 1, dim) -> (the last block's output, and where asked and the
    output layer is in blocks too, the logits (1, 1, vocab)), or None where the C step does not apply."""
    if (kv_cache is None or mask is not None or not isinstance(start, int) or x.shape[:2] != (1, 1)
            or model.training or torch.is_grad_enabled() or x.dtype != torch.float32 or rope is None
            or start >= kv_cache.max_len):
        return None
    plan = getattr(model, "_decode_plan", None)
    if plan is None or any(a is not b for a, b in zip(plan.parts, _parts(model))):
        plan = build_plan(model)
        model._decode_plan = plan
        if plan is None:
            return None
    if not all(t.shape[0] == 1 and t.dtype == torch.float32 and t.is_contiguous() for t in kv_cache.k + kv_cache.v):
        return None
    plan.dims.max_len = kv_cache.max_len
    k_ptrs, v_ptrs = _cache_pointers(plan, kv_cache)
    cos, sin = (r.reshape(-1).contiguous() for r in rope)
    x = x.reshape(-1).clone()
    head = plan.head if with_logits else None
    logits = None if head is None else torch.empty(head.n_vocab)
    if not ggml_kernel.llama_decode(plan.layers, plan.dims, x, k_ptrs, v_ptrs, start, cos, sin, head, logits):
        return None
    return x.view(1, 1, -1), None if logits is None else logits.view(1, 1, -1)
