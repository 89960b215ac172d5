"""Alibaba's Qwen2 / Qwen2.5 (LLaMA's blocks with q/k/v biases) and Qwen3 (no biases, an RMSNorm over each
head's q and k), with sliding-window attention in the layers their config names, and their mixtures of
experts: Qwen2-MoE (top-k weights as the softmax gives them, plus a gated shared expert) and Qwen3-MoE
(renormalised top-k, no shared expert). All rotate halves (llama.cpp's NeoX rope), so their GGUF q/k rows
need no permutation."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import (
    ACTIVATION_TO_HF,
    Family,
    GGUFLayout,
    GGUFPart,
    HFExperts,
    HFLayout,
    activation,
    ffn_rows,
    first,
    gguf_rope_scaling,
    kv_rows,
    q_rows,
    rope_from_hf,
    write_moe_metadata,
    write_rms_rope_metadata,
)
from camelid.model.config import ModelConfig


def _sliding(hf: dict) -> dict:
    """sliding_window and the layers it covers: transformers' `layer_types`, or for configs older than it,
    the layers from max_window_layers on when use_sliding_window is set."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:
        start = hf.get("max_window_layers", n) if hf.get("use_sliding_window") else n
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not layers or window is None:
        return {}
    return dict(sliding_window=window, sliding_layers=None if len(layers) == n else layers)


def _config(hf: dict, arch: str, **switches) -> dict:
    theta, scaling = rope_from_hf(hf, 1000000.0)
    return dict(arch=arch, vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], n_kv_heads=first(hf, "num_key_value_heads"),
                head_dim=first(hf, "head_dim"), ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 32768),
                norm_eps=hf.get("rms_norm_eps", 1e-6), activation=activation(hf.get("hidden_act", "silu")),
                rope_theta=theta, rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
                **_sliding(hf), **switches)


def qwen2_from_hf(hf: dict) -> dict:
    return _config(hf, "qwen2", qkv_bias=True)


def qwen3_from_hf(hf: dict) -> dict:
    return _config(hf, "qwen3", qk_norm=True, qkv_bias=hf.get("attention_bias", False),
                   attn_out_bias=hf.get("attention_bias", False))


def _experts(hf: dict, shared: bool) -> dict:
    n_layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1
    dense = [i for i in range(n_layers) if i in (hf.get("mlp_only_layers") or ()) or (i + 1) % step]
    return dict(n_experts=first(hf, "num_experts", "num_local_experts"), n_experts_used=hf["num_experts_per_tok"],
                expert_ffn_dim=hf["moe_intermediate_size"], moe_renorm=hf.get("norm_topk_prob", False),
                shared_expert_dim=hf["shared_expert_intermediate_size"] if shared else None,
                dense_layers=dense or None)


def qwen2_moe_from_hf(hf: dict) -> dict:
    return _config(hf, "qwen2_moe", qkv_bias=hf.get("qkv_bias", True), **_experts(hf, shared=True))


def qwen3_moe_from_hf(hf: dict) -> dict:
    return _config(hf, "qwen3_moe", qk_norm=True, qkv_bias=hf.get("attention_bias", False),
                   attn_out_bias=hf.get("attention_bias", False), **_experts(hf, shared=False))


def _to_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict:
    types = ["sliding_attention" if cfg.slides(i) else "full_attention" for i in range(cfg.n_layers)]
    return dict(model_type=model_type, architectures=[architecture], hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, intermediate_size=cfg.ffn_dim, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, hidden_act=ACTIVATION_TO_HF[cfg.activation], rope_theta=cfg.rope_theta,
                rope_scaling=cfg.rope_scaling, use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window, layer_types=types,
                max_window_layers=next((i for i in range(cfg.n_layers) if cfg.slides(i)), cfg.n_layers))


def qwen2_to_hf(cfg: ModelConfig) -> dict:
    return _to_hf(cfg, "qwen2", "Qwen2ForCausalLM")


def qwen3_to_hf(cfg: ModelConfig) -> dict:
    return dict(_to_hf(cfg, "qwen3", "Qwen3ForCausalLM"), attention_bias=cfg.qkv_bias)


def _experts_to_hf(cfg: ModelConfig, shared: bool) -> dict:
    if bool(cfg.shared_expert_dim) != shared:
        raise CamelidError(f"a {cfg.arch} model {'needs' if shared else 'has no'} shared expert in its Hugging "
                           f"Face form")
    keys = dict(num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_used,
                moe_intermediate_size=cfg.expert_ffn_dim or cfg.ffn_dim, norm_topk_prob=cfg.moe_renorm,
                decoder_sparse_step=1, mlp_only_layers=cfg.dense_layers or [])
    return dict(keys, shared_expert_intermediate_size=cfg.shared_expert_dim) if shared else keys


def qwen2_moe_to_hf(cfg: ModelConfig) -> dict:
    return dict(_to_hf(cfg, "qwen2_moe", "Qwen2MoeForCausalLM"), qkv_bias=cfg.qkv_bias, **_experts_to_hf(cfg, True))


def qwen3_moe_to_hf(cfg: ModelConfig) -> dict:
    return dict(_to_hf(cfg, "qwen3_moe", "Qwen3MoeForCausalLM"), attention_bias=cfg.qkv_bias,
                **_experts_to_hf(cfg, False))


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
             "attn.wo.weight": "self_attn.o_proj.weight", "attn.wo.bias": "self_attn.o_proj.bias",
             "mlp.w_out.weight": "mlp.down_proj.weight"}
    if cfg.qk_norm:
        names.update({"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"})
    return names


def gguf_config(gf, key, floats) -> dict:
    arch = gf.metadata["general.architecture"]
    return dict(arch=_FROM_GGUF[arch], rope_scaling=gguf_rope_scaling(gf, key, arch),
                qk_norm=arch in ("qwen3", "qwen3moe"), qkv_bias="blk.0.attn_q.bias" in gf.tensors,
                norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-6),
                moe_renorm=arch == "qwen3moe")  # llama.cpp's qwen2moe graph never renormalises, qwen3moe's does


_FROM_GGUF = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


def gguf_layer_parts(cfg: ModelConfig) -> dict[str, list[GGUFPart]]:
    b = "blk.{i}."
    parts = {"attn_norm.weight": [GGUFPart(b + "attn_norm.weight")],
             "attn.wo.weight": [GGUFPart(b + "attn_output.weight")],
             "mlp_norm.weight": [GGUFPart(b + "ffn_norm.weight")],
             "mlp.w_in.weight": [GGUFPart(b + "ffn_gate.weight", ffn_rows), GGUFPart(b + "ffn_up.weight", ffn_rows)],
             "mlp.w_out.weight": [GGUFPart(b + "ffn_down.weight")]}
    for p in ("weight", "bias"):
        parts[f"attn.wqkv.{p}"] = [GGUFPart(f"{b}attn_q.{p}", q_rows), GGUFPart(f"{b}attn_k.{p}", kv_rows),
                                   GGUFPart(f"{b}attn_v.{p}", kv_rows)]
    if cfg.qk_norm:
        parts.update({"attn.q_norm.weight": [GGUFPart(b + "attn_q_norm.weight")],
                      "attn.k_norm.weight": [GGUFPart(b + "attn_k_norm.weight")]})
    return parts


def _exports(cfg: ModelConfig) -> bool:
    # llama.cpp's graph for this architecture attends over the whole context: no sliding window
    return (cfg.sliding_window is None and cfg.norm == "rmsnorm"
            and cfg.pre_norm and not cfg.parallel_residual and cfg.gated_mlp
            and cfg.positions == "rope" and not cfg.rope_interleaved and cfg.activation == "silu"
            and cfg.rotary_pct == 1.0 and not (cfg.attn_out_bias or cfg.mlp_bias or cfg.lm_head_bias))


def _hf_layout(experts: HFExperts | None = None) -> HFLayout:
    return HFLayout(prefix="model.", layer="layers.{i}.", layer_names=_layer_names,
                    global_names={"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                                  "output.weight": "lm_head.weight"},
                    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    gate_up=("mlp.gate_proj", "mlp.up_proj"), experts=experts)


def _write_metadata(w, cfg: ModelConfig):
    write_rms_rope_metadata(w, cfg)
    write_moe_metadata(w, cfg)
    if cfg.n_experts:
        w.add_expert_feed_forward_length(cfg.expert_ffn_dim or cfg.ffn_dim)
    if cfg.shared_expert_dim:
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_dim)


def _family(name: str, gguf_arch: str, from_hf, to_hf, exports, experts=None, routes=None) -> Family:
    return Family(name=name, hf_model_types=(name,), config_from_hf=from_hf, config_to_hf=to_hf,
                  hf=_hf_layout(experts),
                  gguf=GGUFLayout(arch=gguf_arch, config=gguf_config, layer_parts=gguf_layer_parts,
                                  exports=lambda cfg: _exports(cfg) and exports(cfg) and bool(cfg.n_experts) == bool(
                                      routes), write_metadata=_write_metadata, rope_scaling_types=("linear",),
                                  experts=routes, always_output=gguf_arch == "qwen2moe"),
                  template="chatml", stop=["<|im_end|>"])


_EXPERTS = HFExperts("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"))
# llama.cpp's qwen2 graphs need the q/k/v biases; its qwen3 graphs have none
QWEN2 = _family("qwen2", "qwen2", qwen2_from_hf, qwen2_to_hf, lambda cfg: cfg.qkv_bias and not cfg.qk_norm)
QWEN3 = _family("qwen3", "qwen3", qwen3_from_hf, qwen3_to_hf, lambda cfg: cfg.qk_norm and not cfg.qkv_bias)
QWEN2_MOE = _family("qwen2_moe", "qwen2moe", qwen2_moe_from_hf, qwen2_moe_to_hf,
                    lambda cfg: cfg.qkv_bias and not cfg.qk_norm,
                    _EXPERTS._replace(shared="mlp.shared_expert.", shared_gate="mlp.shared_expert_gate"),
                    routes=lambda cfg: bool(cfg.shared_expert_dim) and not cfg.moe_renorm)
QWEN3_MOE = _family("qwen3_moe", "qwen3moe", qwen3_moe_from_hf, qwen3_moe_to_hf,
                    lambda cfg: cfg.qk_norm and not cfg.qkv_bias, _EXPERTS,
                    routes=lambda cfg: not cfg.shared_expert_dim and cfg.moe_renorm)
