"""BigScience's BLOOM (and BLOOMZ): ALiBi instead of positions, a LayerNorm on the token embeddings, LayerNorm
blocks with biases everywhere, a tanh-GELU MLP, and a fused QKV grouped per head (llama.cpp's converter
regroups it into camelid's [q; k; v] order)."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import Family, GGUFLayout, HFLayout, first, one_part
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise CamelidError("apply_residual_connection_post_layernorm=true is not supported")
    dim = first(hf, "hidden_size", "n_embed")
    return dict(arch="bloom", vocab_size=hf["vocab_size"], dim=dim, n_layers=first(hf, "n_layer", "num_hidden_layers"),
                n_heads=first(hf, "n_head", "num_attention_heads"), ffn_dim=4 * dim,
                max_seq_len=first(hf, "seq_length", default=2048), norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu_tanh", gated_mlp=False,
                positions="alibi", embed_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True))


def config_to_hf(cfg: ModelConfig) -> dict:
    return dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=cfg.dim, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, layer_norm_epsilon=cfg.norm_eps, seq_length=cfg.max_seq_len,
                apply_residual_connection_post_layernorm=False)


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.wqkv": "self_attention.query_key_value", "attn.wo": "self_attention.dense",
             "mlp.w_in": "mlp.dense_h_to_4h", "mlp.w_out": "mlp.dense_4h_to_h"}
    return {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in names.items() for p in ("weight", "bias")}


def _shaped(cfg: ModelConfig) -> bool:
    """Bloom's own graph in llama.cpp: nothing of it is read from flags."""
    return (cfg.positions == "alibi" and cfg.alibi_max_bias == 8.0 and cfg.embed_norm and cfg.norm == "layernorm"
            and cfg.norm_bias and cfg.pre_norm and not cfg.parallel_residual and not cfg.gated_mlp
            and cfg.activation == "gelu_tanh" and cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias
            and cfg.n_kv_heads == cfg.n_heads and not cfg.qkv_clip)


def gguf_config(gf, key, floats) -> dict:
    return dict(arch="bloom", norm="layernorm", norm_eps=key("attention.layer_norm_epsilon", float, 1e-5),
                activation="gelu_tanh", gated_mlp=False, positions="alibi", embed_norm=True, qkv_bias=True,
                attn_out_bias=True, mlp_bias=True)


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_head_count_kv(cfg.n_kv_heads)


FAMILY = Family(
    name="bloom", hf_model_types=("bloom",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="transformer.", layer="h.{i}.", layer_names=_layer_names,
                global_names={"tok_embeddings.weight": "word_embeddings.weight",
                              "embed_norm.weight": "word_embeddings_layernorm.weight",
                              "embed_norm.bias": "word_embeddings_layernorm.bias",
                              "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias",
                              "output.weight": "lm_head.weight"},
                qkv_groups=lambda cfg: cfg.n_heads),
    gguf=GGUFLayout(arch="bloom", config=gguf_config,
                    layer_parts=lambda cfg: one_part({"attn_norm": "attn_norm", "attn.wqkv": "attn_qkv",
                                                      "attn.wo": "attn_output", "mlp_norm": "ffn_norm",
                                                      "mlp.w_in": "ffn_up", "mlp.w_out": "ffn_down"}),
                    exports=_shaped, write_metadata=gguf_write_metadata))
