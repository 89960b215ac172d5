"""EleutherAI's GPT-NeoX (Pythia, Dolly v2): LayerNorm, parallel or sequential residual, partial rotary, and
a fused QKV grouped per head."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import (
    ACTIVATION_TO_HF,
    Family,
    GGUFLayout,
    HFLayout,
    activation,
    first,
    one_part,
    rope_from_hf,
)
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    theta, scaling = rope_from_hf(hf)
    params = hf.get("rope_parameters") or {}
    pct = first(hf, "rotary_pct", "partial_rotary_factor", default=params.get("partial_rotary_factor", 1.0))
    bias = hf.get("attention_bias", True)
    return dict(arch="gpt_neox", vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
                activation=activation(hf.get("hidden_act", "gelu")),
                gated_mlp=False, parallel_residual=hf.get("use_parallel_residual", True), rotary_pct=pct,
                rope_theta=theta, rope_scaling=scaling, qkv_bias=bias, attn_out_bias=bias, mlp_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", False))


def config_to_hf(cfg: ModelConfig) -> dict:
    return dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim,
                max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
                hidden_act=ACTIVATION_TO_HF[cfg.activation], use_parallel_residual=cfg.parallel_residual,
                rotary_pct=cfg.rotary_pct, partial_rotary_factor=cfg.rotary_pct, rotary_emb_base=cfg.rope_theta,
                rope_theta=cfg.rope_theta, attention_bias=cfg.qkv_bias)


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    return {"attn_norm.weight": "input_layernorm.weight", "attn_norm.bias": "input_layernorm.bias",
            "mlp_norm.weight": "post_attention_layernorm.weight", "mlp_norm.bias": "post_attention_layernorm.bias",
            "attn.wqkv.weight": "attention.query_key_value.weight",
            "attn.wqkv.bias": "attention.query_key_value.bias",
            "attn.wo.weight": "attention.dense.weight", "attn.wo.bias": "attention.dense.bias",
            "mlp.w_in.weight": "mlp.dense_h_to_4h.weight", "mlp.w_in.bias": "mlp.dense_h_to_4h.bias",
            "mlp.w_out.weight": "mlp.dense_4h_to_h.weight", "mlp.w_out.bias": "mlp.dense_4h_to_h.bias"}


def gguf_config(gf, key, floats) -> dict:
    parallel = gf.metadata.get("gptneox.use_parallel_residual", True)
    if not isinstance(parallel, bool):
        raise CamelidError(f"{gf.path}: metadata key 'gptneox.use_parallel_residual' should be bool, "
                           f"got {parallel!r}")
    # HF's NeoX uses the exact GELU (llama.cpp approximates it with tanh); camelid runs the original
    return dict(arch="gpt_neox", norm="layernorm", gated_mlp=False, activation="gelu", parallel_residual=parallel,
                norm_eps=key("attention.layer_norm_epsilon", float, 1e-5), qkv_bias=True, attn_out_bias=True,
                mlp_bias=True)


def gguf_layer_parts(cfg: ModelConfig):
    # llama.cpp's converter regroups NeoX's per-head QKV rows into camelid's [q; k; v] order
    return one_part({"attn_norm": "attn_norm", "attn.wqkv": "attn_qkv", "attn.wo": "attn_output",
                     "mlp_norm": "ffn_norm", "mlp.w_in": "ffn_up", "mlp.w_out": "ffn_down"})


def gguf_exports(cfg: ModelConfig) -> bool:
    return (cfg.positions == "rope" and not cfg.rope_interleaved and cfg.norm == "layernorm" and not cfg.gated_mlp
            and not cfg.shared_parallel_norm and cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias)


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_parallel_residual(cfg.parallel_residual)


FAMILY = Family(
    name="gpt_neox", hf_model_types=("gpt_neox",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="gpt_neox.", layer="layers.{i}.", layer_names=_layer_names,
                global_names={"tok_embeddings.weight": "embed_in.weight", "norm.weight": "final_layer_norm.weight",
                              "norm.bias": "final_layer_norm.bias", "output.weight": "embed_out.weight"},
                qkv_groups=lambda cfg: cfg.n_heads),
    gguf=GGUFLayout(arch="gptneox", config=gguf_config, layer_parts=gguf_layer_parts, exports=gguf_exports,
                    write_metadata=gguf_write_metadata, always_output=True))
