"""Google's Gemma (1), Gemma 2 and Gemma 3 (text): GeGLU MLPs, RMSNorm weights applied as (1 + w), embeddings
scaled by sqrt(dim), tied output layers. Gemma 2 adds a norm after each branch, soft-capped attention scores
and logits, and sliding-window attention in every other block; Gemma 3 drops the soft caps for q/k norms,
and slides in five blocks of six with a RoPE base of their own."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import ACTIVATION_TO_HF, Family, HFLayout, activation, first, rope_from_hf
from camelid.model.config import ModelConfig


def _common(hf: dict, arch: str) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise CamelidError("use_bidirectional_attention=true (an embedding model) is not supported")
    return dict(arch=arch, vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], n_kv_heads=first(hf, "num_key_value_heads"),
                head_dim=first(hf, "head_dim", default=256), ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("rms_norm_eps", 1e-6),
                activation=activation(first(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")),
                qkv_bias=hf.get("attention_bias", False), attn_out_bias=hf.get("attention_bias", False),
                tie_embeddings=hf.get("tie_word_embeddings", True), norm_plus_one=True, embed_scale=True)


def _sliding(hf: dict, default_types: list[str]) -> dict:
    types = hf.get("layer_types") or default_types
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not layers or hf.get("sliding_window") is None:
        return {}
    return dict(sliding_window=hf["sliding_window"], sliding_layers=None if len(layers) == len(types) else layers)


def gemma_from_hf(hf: dict) -> dict:
    theta, scaling = rope_from_hf(hf)
    return dict(_common(hf, "gemma"), rope_theta=theta, rope_scaling=scaling)


def gemma2_from_hf(hf: dict) -> dict:
    theta, scaling = rope_from_hf(hf)
    n = hf["num_hidden_layers"]
    alternating = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    return dict(_common(hf, "gemma2"), rope_theta=theta, rope_scaling=scaling, post_norms=True,
                attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
                attn_softcap=hf.get("attn_logit_softcapping", 50.0),
                final_softcap=hf.get("final_logit_softcapping", 30.0), **_sliding(hf, alternating))


def _gemma3_rope(hf: dict) -> tuple[float, dict | None, float]:
    """(global base, global scaling, local base) from either config layout: transformers 5's rope_parameters
    per layer type, or rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise CamelidError(f"rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is not supported")
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        scaling = scaling if scaling.get("rope_type", "default") != "default" else None
        return float(full.get("rope_theta", 1e6)), scaling, float(local.get("rope_theta", 1e4))
    theta, scaling = rope_from_hf(hf, 1e6)
    return theta, scaling, float(hf.get("rope_local_base_freq", 1e4))


def gemma3_from_hf(hf: dict) -> dict:
    theta, scaling, local = _gemma3_rope(hf)
    n, pattern = hf["num_hidden_layers"], hf.get("sliding_window_pattern", 6)
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    sliding = _sliding(hf, default)
    return dict(_common(hf, "gemma3"), rope_theta=theta, rope_scaling=scaling, post_norms=True, qk_norm=True,
                attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
                attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
                rope_local_theta=local if sliding else None, **sliding)


def _to_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict:
    return dict(model_type=model_type, architectures=[architecture], hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, intermediate_size=cfg.ffn_dim, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, hidden_activation=_activation_to_hf(cfg), attention_bias=cfg.qkv_bias,
                hidden_act=_activation_to_hf(cfg))


def _activation_to_hf(cfg: ModelConfig) -> str:
    return "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else ACTIVATION_TO_HF[cfg.activation]


def _layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.slides(i) else "full_attention" for i in range(cfg.n_layers)]


def _scalar(cfg: ModelConfig) -> int:
    """query_pre_attn_scalar, an integer in every Gemma config (transformers' is typed so)."""
    return round((cfg.attn_scale or cfg.head_dim ** -0.5) ** -2)


def gemma_to_hf(cfg: ModelConfig) -> dict:
    return dict(_to_hf(cfg, "gemma", "GemmaForCausalLM"), rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)


def gemma2_to_hf(cfg: ModelConfig) -> dict:
    return dict(_to_hf(cfg, "gemma2", "Gemma2ForCausalLM"), rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                query_pre_attn_scalar=_scalar(cfg), attn_logit_softcapping=cfg.attn_softcap,
                final_logit_softcapping=cfg.final_softcap, sliding_window=cfg.sliding_window,
                layer_types=_layer_types(cfg))


def gemma3_to_hf(cfg: ModelConfig) -> dict:
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        full = {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"}, "rope_type": kind,
                "rope_theta": cfg.rope_theta}
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    return dict(_to_hf(cfg, "gemma3_text", "Gemma3ForCausalLM"), query_pre_attn_scalar=_scalar(cfg),
                attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
                sliding_window=cfg.sliding_window, layer_types=_layer_types(cfg),
                rope_parameters={"full_attention": full, "sliding_attention": local})


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"attn_norm.weight": "input_layernorm.weight", "attn.wo.weight": "self_attn.o_proj.weight",
             "attn.wo.bias": "self_attn.o_proj.bias", "mlp.w_out.weight": "mlp.down_proj.weight"}
    if cfg.post_norms:  # Gemma 2/3: post_attention_layernorm is the attention's output norm
        names.update({"post_attn_norm.weight": "post_attention_layernorm.weight",
                      "mlp_norm.weight": "pre_feedforward_layernorm.weight",
                      "post_mlp_norm.weight": "post_feedforward_layernorm.weight"})
    else:
        names["mlp_norm.weight"] = "post_attention_layernorm.weight"
    if cfg.qk_norm:
        names.update({"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"})
    return names


def _hf_layout() -> HFLayout:
    return HFLayout(prefix="model.", layer="layers.{i}.", layer_names=_layer_names,
                    global_names={"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                                  "output.weight": "lm_head.weight"},
                    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    gate_up=("mlp.gate_proj", "mlp.up_proj"))


GEMMA = Family(name="gemma", hf_model_types=("gemma",), config_from_hf=gemma_from_hf, config_to_hf=gemma_to_hf,
               hf=_hf_layout(), template="gemma", stop=["<end_of_turn>"])
GEMMA2 = Family(name="gemma2", hf_model_types=("gemma2",), config_from_hf=gemma2_from_hf, config_to_hf=gemma2_to_hf,
                hf=_hf_layout(), template="gemma", stop=["<end_of_turn>"])
GEMMA3 = Family(name="gemma3", hf_model_types=("gemma3_text",), config_from_hf=gemma3_from_hf,
                config_to_hf=gemma3_to_hf, hf=_hf_layout(), template="gemma", stop=["<end_of_turn>"])
