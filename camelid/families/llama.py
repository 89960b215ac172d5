"""LLaMA 1/2/3 and the models that ship its weights (Alpaca, Vicuna, Koala, WizardLM, TinyLlama), Mistral
(sliding-window attention) and Mixtral (Mistral's blocks with a mixture of experts for an MLP): llama.cpp runs
all three as one architecture."""

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
    kv_heads,
    kv_rows,
    q_heads,
    q_rows,
    rope_from_hf,
    write_moe_metadata,
    write_rms_rope_metadata,
)
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    theta, scaling = rope_from_hf(hf)
    bias = hf.get("attention_bias", False)
    return dict(arch="llama", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], n_kv_heads=first(hf, "num_key_value_heads"),
                head_dim=first(hf, "head_dim"), ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                activation=activation(hf.get("hidden_act", "silu")), rope_theta=theta, rope_scaling=scaling,
                qkv_bias=bias, attn_out_bias=bias, mlp_bias=hf.get("mlp_bias", False),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                sliding_window=hf.get("sliding_window") if hf.get("model_type") in ("mistral", "mixtral") else None,
                **_experts(hf))


def _experts(hf: dict) -> dict:
    if hf.get("model_type") != "mixtral":
        return {}
    # Mixtral renormalises its top-k weights (softmax over all experts, top-k, then rescaled to sum to 1)
    return dict(n_experts=hf["num_local_experts"], n_experts_used=hf["num_experts_per_tok"], moe_renorm=True)


def config_to_hf(cfg: ModelConfig) -> dict:
    keys = dict(hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.ffn_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                hidden_act=ACTIVATION_TO_HF[cfg.activation], rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.sliding_layers is not None:  # Mistral's checkpoints slide in every layer
        raise CamelidError("a LLaMA-family model that slides in some layers only has no Hugging Face form")
    if cfg.n_experts:
        if not _mixtral(cfg) or cfg.qkv_bias or cfg.mlp_bias:
            raise CamelidError("a LLaMA-family mixture of experts other than Mixtral's has no Hugging Face form")
        return dict(keys, model_type="mixtral", architectures=["MixtralForCausalLM"], sliding_window=cfg.sliding_window,
                    num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_used)
    if cfg.sliding_window is None:
        return dict(keys, model_type="llama", architectures=["LlamaForCausalLM"])
    return dict(keys, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=cfg.sliding_window)


def _mixtral(cfg: ModelConfig) -> bool:
    """Routed as Mixtral is, by both transformers and llama.cpp: every block's experts, renormalised top-k."""
    return (cfg.moe_renorm and not cfg.shared_expert_dim and not cfg.dense_layers
            and cfg.expert_ffn_dim in (None, cfg.ffn_dim))


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    return {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
            "attn.wo.weight": "self_attn.o_proj.weight", "attn.wo.bias": "self_attn.o_proj.bias",
            "mlp.w_out.weight": "mlp.down_proj.weight", "mlp.w_out.bias": "mlp.down_proj.bias"}


def gguf_config(gf, key, floats) -> dict:
    scaling = gguf_rope_scaling(gf, key, "llama")
    if "rope_freqs.weight" in gf.tensors:  # Llama 3.1: per-frequency divisors, stored as a tensor
        scaling = {"type": "factors", "factors": floats("rope_freqs.weight").tolist()}
    return dict(arch="llama", rope_scaling=scaling, norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-5))


def gguf_layer_parts(cfg: ModelConfig) -> dict[str, list[GGUFPart]]:
    b = "blk.{i}."
    return {"attn_norm.weight": [GGUFPart(b + "attn_norm.weight")],
            "attn.wqkv.weight": [GGUFPart(b + "attn_q.weight", q_rows, q_heads),
                                 GGUFPart(b + "attn_k.weight", kv_rows, kv_heads),
                                 GGUFPart(b + "attn_v.weight", kv_rows)],
            "attn.wo.weight": [GGUFPart(b + "attn_output.weight")],
            "mlp_norm.weight": [GGUFPart(b + "ffn_norm.weight")],
            "mlp.w_in.weight": [GGUFPart(b + "ffn_gate.weight", ffn_rows), GGUFPart(b + "ffn_up.weight", ffn_rows)],
            "mlp.w_out.weight": [GGUFPart(b + "ffn_down.weight")]}


def gguf_exports(cfg: ModelConfig) -> bool:
    # llama.cpp's graph for this architecture attends over the whole context: no sliding window
    return (cfg.sliding_window is None and cfg.norm == "rmsnorm"
            and cfg.gated_mlp and cfg.positions == "rope" and not cfg.rope_interleaved
            and cfg.activation == "silu" and cfg.rotary_pct == 1.0
            and not (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias))


def gguf_write_metadata(w, cfg: ModelConfig):
    write_rms_rope_metadata(w, cfg)
    write_moe_metadata(w, cfg)
    w.add_vocab_size(cfg.vocab_size)


FAMILY = Family(
    name="llama", hf_model_types=("llama", "mistral", "mixtral"), config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    hf=HFLayout(prefix="model.", layer="layers.{i}.", layer_names=_layer_names,
                global_names={"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                              "output.weight": "lm_head.weight"},
                qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                gate_up=("mlp.gate_proj", "mlp.up_proj"),
                experts=HFExperts("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"))),
    gguf=GGUFLayout(arch="llama", config=gguf_config, layer_parts=gguf_layer_parts, exports=gguf_exports,
                    write_metadata=gguf_write_metadata, q4_k_m=True, rope_scaling_types=("linear",),
                    experts=_mixtral))
