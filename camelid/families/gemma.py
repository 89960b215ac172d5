"""Google's Gemma (1), Gemma 2 and Gemma 3 (text): GeGLU MLPs, RMSNorm weights applied as (1 + w), embeddings
scaled by sqrt(dim), tied output layers. Gemma 2 adds a norm after each branch, soft-capped attention scores
and logits, and sliding-window attention in every other block; Gemma 3 drops the soft caps for q/k norms,
and slides in five blocks of six with a RoPE base of their own."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import (
    ACTIVATION_TO_HF,
    Family,
    GGUFLayout,
    GGUFPart,
    HFLayout,
    activation,
    ffn_rows,
    first,
    kv_rows,
    q_rows,
    rope_from_hf,
)
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


# ---------------------------------------------------------------- GGUF
# llama.cpp's Gemma graphs fix what Hugging Face configs say: the query scale (1/sqrt(head_dim), but
# 1/sqrt(dim/heads) for the 27B models, known by their block count), Gemma 2's alternating and Gemma 3's
# five-in-six sliding pattern and Gemma 3's local RoPE base of 10,000.
_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}


def _gguf_scale(arch: str, dim: int, n_heads: int, n_layers: int, head_dim: int) -> float | None:
    if arch == "gemma":
        return None
    return (dim / n_heads) ** -0.5 if n_layers == _27B_BLOCKS[arch] else head_dim ** -0.5


def _gguf_pattern(arch: str, n_layers: int) -> list[int] | None:
    every = {"gemma2": 2, "gemma3": 6}.get(arch)
    return None if every is None else [i for i in range(n_layers) if (i + 1) % every]


def gguf_config(gf, key, floats) -> dict:
    arch = gf.metadata["general.architecture"]
    n_layers, dim, n_heads = key("block_count"), key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", default=max(dim // n_heads, 1))
    fields = dict(arch=arch, activation="gelu_tanh", norm_plus_one=True, embed_scale=True,
                  norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-6))
    if arch == "gemma":
        return fields
    fields.update(post_norms=True, attn_scale=_gguf_scale(arch, dim, n_heads, n_layers, head_dim),
                  sliding_window=key("attention.sliding_window"), sliding_layers=_gguf_pattern(arch, n_layers))
    if arch == "gemma2":
        return dict(fields, attn_softcap=key("attn_logit_softcapping", float, 50.0),
                    final_softcap=key("final_logit_softcapping", float, 30.0))
    return dict(fields, qk_norm=True, rope_local_theta=10000.0)


def gguf_layer_parts(cfg: ModelConfig) -> dict[str, list[GGUFPart]]:
    b = "blk.{i}."
    parts = {"attn_norm.weight": [GGUFPart(b + "attn_norm.weight")],
             "attn.wqkv.weight": [GGUFPart(b + "attn_q.weight", q_rows), GGUFPart(b + "attn_k.weight", kv_rows),
                                  GGUFPart(b + "attn_v.weight", kv_rows)],
             "attn.wo.weight": [GGUFPart(b + "attn_output.weight")],
             "mlp_norm.weight": [GGUFPart(b + "ffn_norm.weight")],
             "mlp.w_in.weight": [GGUFPart(b + "ffn_gate.weight", ffn_rows), GGUFPart(b + "ffn_up.weight", ffn_rows)],
             "mlp.w_out.weight": [GGUFPart(b + "ffn_down.weight")]}
    if cfg.post_norms:
        parts.update({"post_attn_norm.weight": [GGUFPart(b + "post_attention_norm.weight")],
                      "post_mlp_norm.weight": [GGUFPart(b + "post_ffw_norm.weight")]})
    if cfg.qk_norm:
        parts.update({"attn.q_norm.weight": [GGUFPart(b + "attn_q_norm.weight")],
                      "attn.k_norm.weight": [GGUFPart(b + "attn_k_norm.weight")]})
    return parts


def _gguf_exports(cfg: ModelConfig) -> bool:
    """The config is one llama.cpp's graph for its Gemma computes (see above)."""
    scale = _gguf_scale(cfg.arch, cfg.dim, cfg.n_heads, cfg.n_layers, cfg.head_dim)
    same_scale = (cfg.attn_scale is None) if scale is None else (
        cfg.attn_scale is not None and abs(cfg.attn_scale - scale) < 1e-9 * scale)
    slides = [i for i in range(cfg.n_layers) if cfg.slides(i)]
    return (same_scale and cfg.activation == "gelu_tanh" and cfg.gated_mlp and not (cfg.qkv_bias or cfg.mlp_bias)
            and slides == (_gguf_pattern(cfg.arch, cfg.n_layers) or []) and not cfg.rope_scaling
            and (cfg.arch != "gemma3" or cfg.rope_local_theta == 10000.0)
            and (cfg.tie_embeddings or cfg.arch == "gemma3"))  # only Gemma 3's graph reads an output layer


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_softcap)
        w.add_final_logit_softcapping(cfg.final_softcap)


def _gguf(arch: str) -> GGUFLayout:
    return GGUFLayout(arch=arch, config=gguf_config, layer_parts=gguf_layer_parts, exports=_gguf_exports,
                      write_metadata=gguf_write_metadata, norm_offset=1.0)


GEMMA = Family(name="gemma", hf_model_types=("gemma",), config_from_hf=gemma_from_hf, config_to_hf=gemma_to_hf,
               hf=_hf_layout(), gguf=_gguf("gemma"), template="gemma", stop=["<end_of_turn>"])
GEMMA2 = Family(name="gemma2", hf_model_types=("gemma2",), config_from_hf=gemma2_from_hf, config_to_hf=gemma2_to_hf,
                hf=_hf_layout(), gguf=_gguf("gemma2"), template="gemma", stop=["<end_of_turn>"])
GEMMA3 = Family(name="gemma3", hf_model_types=("gemma3_text",), config_from_hf=gemma3_from_hf,
                config_to_hf=gemma3_to_hf, hf=_hf_layout(), gguf=_gguf("gemma3"), template="gemma",
                stop=["<end_of_turn>"])
