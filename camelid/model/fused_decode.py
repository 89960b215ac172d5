"""A LLaMA-shaped decode step in one call to the C kernel, when every block matmul is in GGUF blocks.

Through PyTorch, one token costs about fifteen small ops a layer (norms, rotary, cache writes, attention,
SwiGLU); on a 22-layer model their dispatch is about 10 ms, a third of a Q4_0 token. ggml_gemv.c's
`ggml_llama_decode` runs the same math in one parallel region, for the LLaMA family and for what Qwen2/3 and
Gemma 1-3 add to its blocks (q/k/v biases, q/k norms, (1 + w) norms, post-branch norms, sliding windows with
their own rotary tables, scaled and soft-capped scores, GeGLU, scaled embeddings, soft-capped logits). The
generation layer asks for a plan once per decoding run (generate/decoding.py) and falls back to the model's
forward, which stays the reference (the tests hold the two together), for everything else: prompts, batches,
other families, float or int4 weights, bf16, gradients, LoRA. Mixtures of experts run in it too: the router,
the picked experts' blocks and a shared expert.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from camelid.model import ggml_kernel
from camelid.model.kv_cache import PagedRows
from camelid.model.quant import GGMLLinear
from camelid.model.transformer import linear


@dataclass
class DecodePlan:
    layers: ctypes.Array  # ggml_kernel.LlamaLayer per block
    dims: ggml_kernel.LlamaDims
    head: ggml_kernel.LlamaHead | None  # the final norm and output layer, where the C step runs them too
    keep: list  # tensors the pointers above point into that the model does not hold ((1 + w) norm weights)
    cache: tuple = (None, None, None)  # (the last cache seen, its k pointers, its v pointers)


def _shaped_for_it(model) -> bool:
    cfg = model.cfg
    kind = (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type"))
    return (cfg.norm == "rmsnorm" and cfg.pre_norm and not cfg.parallel_residual and cfg.gated_mlp
            and cfg.activation in ("silu", "gelu_tanh") and cfg.positions == "rope" and not cfg.rope_interleaved
            and cfg.rotary_dim == cfg.head_dim and not cfg.embed_proj_dim
            and not (cfg.attn_out_bias or cfg.mlp_bias or cfg.lm_head_bias) and model.dtype == torch.float32
            and cfg.rope_attention_factor == 1.0 and cfg.n_experts <= 256
            and kind not in ("longrope", "dynamic")
            and model.device.type == "cpu" and ggml_kernel.available())


def _kind(layer, bias_ok: bool = False) -> int | None:
    if type(layer) is not GGMLLinear or (layer.bias is not None and not bias_ok):
        return None
    kind = ggml_kernel.SPLIT[int(layer.ggml_type)] if layer.split else int(layer.ggml_type)
    return kind if kind in ggml_kernel.TYPE_IDS else None


def build_plan(model) -> DecodePlan | None:
    """The C step's view of the model's weights (raw pointers: valid while the model's modules and tensors
    stay as they are, so a plan lives for one decoding run), or None when the model is not one it runs."""
    if type(model.layers[0].attn.wqkv) is not GGMLLinear or not _shaped_for_it(model):
        return None
    cfg, keep = model.cfg, []

    def weight(norm) -> int:  # the multiplier a norm applies, as a pointer (0: no such norm)
        if norm is None:
            return 0
        w = (1.0 + norm.weight.float()) if norm.plus_one else norm.weight
        if w.dtype != torch.float32:
            return None
        keep.append(w.contiguous())
        return keep[-1].data_ptr()

    layers = []
    for i, block in enumerate(model.layers):
        attn = block.attn
        experts = _experts(block.mlp, keep) if cfg.moe(i) else {}
        if experts is None:
            return None
        mlp = (block.mlp.experts[0] if experts else block.mlp)  # unused by the step where there are experts
        parts = [attn.wqkv, attn.wo, mlp.w_in, mlp.w_out]
        kinds = [_kind(attn.wqkv, bias_ok=True)] + [_kind(p) for p in parts[1:]]
        norms = [weight(n) for n in (block.attn_norm, block.mlp_norm, attn.q_norm, attn.k_norm, block.post_attn_norm,
                                     block.post_mlp_norm)]
        bias = attn.wqkv.bias
        if None in kinds or None in norms or (bias is not None and (bias.dtype != torch.float32
                                                                    or not bias.is_contiguous())):
            return None
        bias = 0 if bias is None else bias.data_ptr()
        layers.append(ggml_kernel.LlamaLayer(*norms[:2], *(p.blocks.data_ptr() for p in parts), *kinds, bias,
                                             *norms[2:], cfg.sliding_window if cfg.slides(i) else 0,
                                             int(bool(cfg.rope_local_theta) and cfg.slides(i)), **experts))
    dims = ggml_kernel.LlamaDims(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, 0, cfg.norm_eps,
                                 cfg.attn_scale or 0.0, cfg.attn_softcap or 0.0, int(cfg.activation == "gelu_tanh"))
    head = _head(model, weight)
    return DecodePlan((ggml_kernel.LlamaLayer * len(layers))(*layers), dims, head, keep)


def _experts(moe, keep: list) -> dict | None:
    """A mixture of experts' fields of its layer for the C step (every expert in one block type, as the file's
    3-D tensors give them), or None where it cannot run them."""
    # a plain float router, or the same weights on the compiled gemv kernel (generate/decoding.py swaps it in)
    router = getattr(moe.router, "weight", None) if getattr(moe.router, "bias", None) is None else None
    kinds = {(_kind(e.w_in), _kind(e.w_out)) for e in moe.experts}
    if (router is None or router.dtype != torch.float32 or router.shape != (moe.cfg.n_experts, moe.cfg.dim)
            or len(kinds) != 1 or None in next(iter(kinds))):
        return None
    in_kind, out_kind = kinds.pop()
    keep.append(router.contiguous())
    tables = [(ctypes.c_void_p * len(moe.experts))(*(getattr(e, w).blocks.data_ptr() for e in moe.experts))
              for w in ("w_in", "w_out")]
    keep.extend(tables)
    cfg = moe.cfg
    fields = dict(n_experts=cfg.n_experts, n_used=cfg.n_experts_used, renorm=int(cfg.moe_renorm),
                  expert_in_type=in_kind, expert_out_type=out_kind, expert_ffn=moe.experts[0].w_out.in_features,
                  router=keep[-3].data_ptr(), expert_in=ctypes.cast(tables[0], ctypes.c_void_p),
                  expert_out=ctypes.cast(tables[1], ctypes.c_void_p))
    if moe.shared is None:
        return fields
    gate = getattr(moe.shared_gate, "weight", None)
    kinds = (_kind(moe.shared.w_in), _kind(moe.shared.w_out))
    # the shared expert reads the activations prepared for the experts, so its input blocks must be their type
    if gate is None or gate.dtype != torch.float32 or None in kinds or kinds[0] != in_kind:
        return None
    keep.append(gate.contiguous())
    return dict(fields, shared_ffn=moe.shared.w_out.in_features, shared_gate=keep[-1].data_ptr(),
                shared_in=moe.shared.w_in.blocks.data_ptr(), shared_out=moe.shared.w_out.blocks.data_ptr(),
                shared_in_type=kinds[0], shared_out_type=kinds[1])


def _head(model, weight) -> ggml_kernel.LlamaHead | None:
    norm, kind = model.norm, _kind(model.output)
    scale = None if kind is None or model.cfg.embed_proj_dim or norm is None else weight(norm)
    if scale is None:
        return None
    return ggml_kernel.LlamaHead(scale, model.output.blocks.data_ptr(), kind, model.output.out_features)


def _cache_pointers(plan: DecodePlan, owner, tensors: tuple[list, list]):
    """The ctypes arrays of the layers' k and v pointers, kept while the same cache is used."""
    if plan.cache[0] is not owner:
        pointers = [(ctypes.c_void_p * len(ts))(*(t.data_ptr() for t in ts)) for ts in tensors]
        plan.cache = (owner, *pointers)
    return plan.cache[1], plan.cache[2]


def _layout(kv_cache) -> tuple | None:
    """(k tensors, v tensors, ggml_kernel.KVLayout, what keeps its block table alive) of a one-row fp32 cache:
    a contiguous (1, H, L, D) KVCache is one block of L positions; a paged row is its blocks of the pool's
    (n_blocks, block_size, H, D)."""
    if isinstance(kv_cache, PagedRows):
        pool = kv_cache.cache
        if kv_cache.tables.shape[0] != 1 or pool.kv_type != "f32" or pool.k[0].device.type != "cpu":
            return None
        _, bs, H, D = pool.k[0].shape
        blocks = kv_cache.tables[0].to(torch.int32).contiguous()
        return pool, (pool.k, pool.v), ggml_kernel.KVLayout(bs, bs * H * D, H * D, D, blocks.data_ptr()), blocks
    if not all(t.shape[0] == 1 and t.dtype == torch.float32 and t.is_contiguous() for t in kv_cache.k + kv_cache.v):
        return None
    _, _, L, D = kv_cache.k[0].shape
    return kv_cache, (kv_cache.k, kv_cache.v), ggml_kernel.KVLayout(L, 0, D, L * D, _ZERO.data_ptr()), None


_ZERO = torch.zeros(1, dtype=torch.int32)


def decode_step(plan: DecodePlan, model, tokens: torch.Tensor, start: int, kv_cache) -> torch.Tensor | None:
    """Logits (1, 1, vocab) for one token (1, 1) at cache position `start` of a KVCache or a paged row, what
    the model's forward returns for it, or None where the C step does not apply to this call."""
    if tokens.shape != (1, 1) or model.training or torch.is_grad_enabled() or start >= kv_cache.max_len:
        return None
    found = _layout(kv_cache)
    if found is None:
        return None
    owner, tensors, layout, _keep = found
    plan.dims.max_len = kv_cache.max_len
    k_ptrs, v_ptrs = _cache_pointers(plan, owner, tensors)
    cos, sin = _rotary(model.inv_freq, start)
    cos_local, sin_local = _rotary(model.inv_freq_local, start) if model.cfg.rope_local_theta else (cos, sin)
    x = model.tok_embeddings(tokens).reshape(-1).clone()
    if model.cfg.embed_scale:
        x = x * torch.tensor(model.cfg.dim ** 0.5, dtype=x.dtype)
    logits = None if plan.head is None else torch.empty(plan.head.n_vocab)
    if not ggml_kernel.llama_decode(plan.layers, plan.dims, x, k_ptrs, v_ptrs, layout, start, cos, sin,
                                    cos_local, sin_local, plan.head, logits):
        return None
    if logits is None:
        logits = linear(model.norm(x.view(1, 1, -1)), model.output).float()
    if model.cfg.final_softcap:
        logits = torch.tanh(logits / model.cfg.final_softcap) * model.cfg.final_softcap
    return logits.view(1, 1, -1)


def _rotary(inv_freq: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's rotary factors at one position, halves not interleaved."""
    freqs = torch.tensor(float(position)) * inv_freq
    freqs = torch.cat((freqs, freqs))
    return freqs.cos(), freqs.sin()
