"""Microsoft's Phi-3 / Phi-3.5 / Phi-4-mini: LLaMA's blocks with q/k/v and gate/up stored fused (in camelid's own
order), LongRoPE for the 128K-context models, a sliding window over every layer where the config sets one."""

from __future__ import annotations

from camelid.families.spec import ACTIVATION_TO_HF, Family, HFLayout, activation, first, rope_from_hf
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    theta, scaling = rope_from_hf(hf)
    params = hf.get("rope_parameters") or {}
    return dict(arch="phi3", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], n_kv_heads=first(hf, "num_key_value_heads"),
                head_dim=first(hf, "head_dim"), ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-5),
                activation=activation(hf.get("hidden_act", "silu")), rope_theta=theta, rope_scaling=scaling,
                rotary_pct=first(hf, "partial_rotary_factor", default=params.get("partial_rotary_factor", 1.0)),
                tie_embeddings=hf.get("tie_word_embeddings", False), sliding_window=hf.get("sliding_window"))


def config_to_hf(cfg: ModelConfig) -> dict:
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    original = scaling.pop("original_max_position_embeddings", None) if scaling else None
    return dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                intermediate_size=cfg.ffn_dim, max_position_embeddings=cfg.max_seq_len,
                original_max_position_embeddings=original or cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                hidden_act=ACTIVATION_TO_HF[cfg.activation], rope_theta=cfg.rope_theta, rope_scaling=scaling,
                partial_rotary_factor=cfg.rotary_pct, sliding_window=cfg.sliding_window,
                pad_token_id=None)  # Phi3Config's default (32000) lies outside smaller vocabularies


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    return {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
            "attn.wqkv.weight": "self_attn.qkv_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
            "mlp.w_in.weight": "mlp.gate_up_proj.weight", "mlp.w_out.weight": "mlp.down_proj.weight"}


FAMILY = Family(
    name="phi3", hf_model_types=("phi3",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="model.", layer="layers.{i}.", layer_names=_layer_names,
                global_names={"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                              "output.weight": "lm_head.weight"}))
