"""Meta's OPT: learned positions two rows in, ReLU, pre-norm but for 350m (post-norm, with its embeddings
projected from 512 to the model's width). llama.cpp has no OPT graph, so there are no GGUF files of it."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import Family, HFLayout, activation
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    if hf.get("layer_norm_elementwise_affine") is False:
        raise CamelidError("OPT with layer_norm_elementwise_affine=false is not supported")
    dim = hf["hidden_size"]
    proj = hf.get("word_embed_proj_dim", dim)
    pre = hf.get("do_layer_norm_before", True)
    bias = hf.get("enable_bias", True)
    return dict(arch="opt", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], ffn_dim=hf["ffn_dim"],
                max_seq_len=hf.get("max_position_embeddings", 2048), norm="layernorm", norm_eps=1e-5,
                activation=activation(hf.get("activation_function", "relu")), gated_mlp=False, positions="learned",
                learned_pos_offset=2, pre_norm=pre, qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias,
                tie_embeddings=hf.get("tie_word_embeddings", True), embed_proj_dim=proj if proj != dim else None,
                final_norm=pre and not hf.get("_remove_final_layer_norm", False))


def config_to_hf(cfg: ModelConfig) -> dict:
    return dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim,
                max_position_embeddings=cfg.max_seq_len, do_layer_norm_before=cfg.pre_norm,
                word_embed_proj_dim=cfg.embed_proj_dim or cfg.dim, activation_function=cfg.activation,
                enable_bias=cfg.qkv_bias, _remove_final_layer_norm=cfg.pre_norm and not cfg.final_norm)


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    return {"attn_norm.weight": "self_attn_layer_norm.weight", "attn_norm.bias": "self_attn_layer_norm.bias",
            "mlp_norm.weight": "final_layer_norm.weight", "mlp_norm.bias": "final_layer_norm.bias",
            "attn.wo.weight": "self_attn.out_proj.weight", "attn.wo.bias": "self_attn.out_proj.bias",
            "mlp.w_in.weight": "fc1.weight", "mlp.w_in.bias": "fc1.bias",
            "mlp.w_out.weight": "fc2.weight", "mlp.w_out.bias": "fc2.bias"}


FAMILY = Family(
    name="opt", hf_model_types=("opt",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="model.decoder.", layer="layers.{i}.", layer_names=_layer_names,
                global_names={"tok_embeddings.weight": "embed_tokens.weight",
                              "pos_embeddings.weight": "embed_positions.weight",
                              "embed_proj_in.weight": "project_in.weight",
                              "embed_proj_out.weight": "project_out.weight",
                              "norm.weight": "final_layer_norm.weight", "norm.bias": "final_layer_norm.bias",
                              "output.weight": "lm_head.weight"},
                qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")))
