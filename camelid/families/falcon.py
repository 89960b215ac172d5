"""TII's Falcon: 7B's multi-query attention with one norm for the parallel attention and MLP, 40B's
grouped-query "new decoder architecture" with two. Falcon-RW's ALiBi positions are not supported."""

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
    if hf.get("alibi"):
        raise CamelidError("Falcon with alibi positions (Falcon-RW) is not supported")
    n_heads = hf["num_attention_heads"]
    new_arch = hf.get("new_decoder_architecture", False)
    n_kv = hf.get("num_kv_heads", n_heads) if new_arch else (1 if hf.get("multi_query", True) else n_heads)
    parallel = new_arch or hf.get("parallel_attn", True)
    one_norm = parallel and (not new_arch or hf.get("num_ln_in_parallel_attn") == 1)
    theta, scaling = rope_from_hf(hf)
    dim = hf["hidden_size"]
    bias = hf.get("bias", False)
    return dict(arch="falcon", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=n_kv, head_dim=first(hf, "head_dim"),
                ffn_dim=first(hf, "ffn_hidden_size", default=4 * dim),
                max_seq_len=hf.get("max_position_embeddings", 2048), norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=activation(hf.get("activation", "gelu")),
                gated_mlp=False, parallel_residual=parallel, shared_parallel_norm=one_norm, rope_theta=theta,
                rope_scaling=scaling, qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias,
                tie_embeddings=hf.get("tie_word_embeddings", True), extra={"new_decoder_architecture": new_arch})


def config_to_hf(cfg: ModelConfig) -> dict:
    new_arch = bool(cfg.extra.get("new_decoder_architecture"))
    return dict(model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_kv_heads=cfg.n_kv_heads,
                new_decoder_architecture=new_arch, multi_query=cfg.n_kv_heads == 1 and not new_arch,
                parallel_attn=cfg.parallel_residual, bias=cfg.qkv_bias, alibi=False,
                num_ln_in_parallel_attn=(1 if cfg.shared_parallel_norm else 2) if new_arch else None,
                ffn_hidden_size=cfg.ffn_dim, layer_norm_epsilon=cfg.norm_eps, rope_theta=cfg.rope_theta,
                max_position_embeddings=cfg.max_seq_len, activation=ACTIVATION_TO_HF[cfg.activation])


def _norm_names(cfg: ModelConfig) -> dict[str, str]:
    if cfg.extra.get("new_decoder_architecture") and not cfg.shared_parallel_norm:
        return {"attn_norm": "ln_attn", "mlp_norm": "ln_mlp"}
    if cfg.shared_parallel_norm:
        return {"attn_norm": "input_layernorm"}
    return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"attn.wqkv.weight": "self_attention.query_key_value.weight",
             "attn.wqkv.bias": "self_attention.query_key_value.bias",
             "attn.wo.weight": "self_attention.dense.weight", "attn.wo.bias": "self_attention.dense.bias",
             "mlp.w_in.weight": "mlp.dense_h_to_4h.weight", "mlp.w_in.bias": "mlp.dense_h_to_4h.bias",
             "mlp.w_out.weight": "mlp.dense_4h_to_h.weight", "mlp.w_out.bias": "mlp.dense_4h_to_h.bias"}
    for ours, theirs in _norm_names(cfg).items():
        names.update({f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"})
    return names


def _qkv_groups(cfg: ModelConfig) -> int | None:
    """7B's multi-query QKV is already q | k | v; the others group each KV head with its queries."""
    return cfg.n_kv_heads if cfg.extra.get("new_decoder_architecture") or cfg.n_kv_heads == cfg.n_heads else None


def gguf_config(gf, key, floats) -> dict:
    two_norms = "blk.0.attn_norm_2.weight" in gf.tensors  # Falcon-40B's ln_attn and ln_mlp
    # HF's Falcon uses the exact GELU (llama.cpp approximates it with tanh); camelid runs the original
    return dict(arch="falcon", norm="layernorm", gated_mlp=False, activation="gelu", parallel_residual=True,
                shared_parallel_norm=not two_norms, norm_eps=key("attention.layer_norm_epsilon", float, 1e-5))


def gguf_layer_parts(cfg: ModelConfig):
    # llama.cpp's attn_norm feeds the MLP; Falcon-40B's attention has attn_norm_2. Its converter regroups the
    # per-head QKV rows into camelid's [q; k; v] order.
    names = {"attn_norm": "attn_norm", "attn.wqkv": "attn_qkv", "attn.wo": "attn_output", "mlp.w_in": "ffn_up",
             "mlp.w_out": "ffn_down"}
    if not cfg.shared_parallel_norm:
        names.update(attn_norm="attn_norm_2", mlp_norm="attn_norm")
    return one_part(names)


def gguf_exports(cfg: ModelConfig) -> bool:
    return (cfg.positions == "rope" and not cfg.rope_interleaved and cfg.rotary_pct == 1.0
            and cfg.norm == "layernorm" and cfg.parallel_residual and not cfg.gated_mlp
            and not (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias))


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)


FAMILY = Family(
    name="falcon", hf_model_types=("falcon",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="transformer.", layer="h.{i}.", layer_names=_layer_names, qkv_groups=_qkv_groups,
                global_names={"tok_embeddings.weight": "word_embeddings.weight", "norm.weight": "ln_f.weight",
                              "norm.bias": "ln_f.bias", "output.weight": "lm_head.weight"}),
    gguf=GGUFLayout(arch="falcon", config=gguf_config, layer_parts=gguf_layer_parts, exports=gguf_exports,
                    write_metadata=gguf_write_metadata, q4_output_type="Q8_0"))
