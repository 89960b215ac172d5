"""MosaicML's MPT (MPT-7B and its -Instruct, -Chat and -StoryWriter versions, MPT-30B): ALiBi, LayerNorms
without biases, no biases in the projections, an exact-GELU MLP, and optionally q/k/v clamped to a range.
transformers' MPT always uses ALiBi and reads neither `learned_pos_emb` nor `logit_scale`; camelid does as it
does. It also ignores `attn_config.alibi_bias_max` (its slopes are always those for 8); camelid reads it, as
MosaicML's own code and llama.cpp do (every released MPT checkpoint has 8)."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import Family, GGUFLayout, HFLayout, one_part
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    attn = hf.get("attn_config") or {}
    if not isinstance(attn, dict):
        raise CamelidError(f"attn_config must be an object, got {attn!r}")
    for key in ("qk_ln", "prefix_lm", "attn_uses_sequence_id"):
        if attn.get(key):
            raise CamelidError(f"attn_config.{key}=true is not supported")
    if not hf.get("no_bias", True):
        raise CamelidError("no_bias=false is not supported (transformers' MPT has no biases)")
    return dict(arch="mpt", vocab_size=hf["vocab_size"], dim=hf["d_model"], n_layers=hf["n_layers"],
                n_heads=hf["n_heads"], ffn_dim=4 * hf["d_model"], max_seq_len=hf.get("max_seq_len", 2048),
                norm="layernorm", norm_bias=False, norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu",
                gated_mlp=False, positions="alibi", alibi_max_bias=float(attn.get("alibi_bias_max", 8)),
                qkv_clip=attn.get("clip_qkv"), attn_scale=attn.get("softmax_scale"),
                tie_embeddings=True)


def config_to_hf(cfg: ModelConfig) -> dict:
    return dict(model_type="mpt", architectures=["MptForCausalLM"], d_model=cfg.dim, n_layers=cfg.n_layers,
                n_heads=cfg.n_heads, max_seq_len=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps, no_bias=True,
                expansion_ratio=cfg.ffn_dim // cfg.dim,
                attn_config=dict(alibi=True, alibi_bias_max=int(cfg.alibi_max_bias) if cfg.alibi_max_bias.is_integer()
                                 else cfg.alibi_max_bias, clip_qkv=cfg.qkv_clip,
                                 softmax_scale=cfg.attn_scale))


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    return {"attn_norm.weight": "norm_1.weight", "mlp_norm.weight": "norm_2.weight",
            "attn.wqkv.weight": "attn.Wqkv.weight", "attn.wo.weight": "attn.out_proj.weight",
            "mlp.w_in.weight": "ffn.up_proj.weight", "mlp.w_out.weight": "ffn.down_proj.weight"}


def _shaped(cfg: ModelConfig) -> bool:
    return (cfg.positions == "alibi" and cfg.norm == "layernorm" and not cfg.norm_bias and cfg.pre_norm
            and not cfg.parallel_residual and not cfg.gated_mlp and cfg.activation == "gelu" and not cfg.embed_norm
            and not (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias) and cfg.n_kv_heads == cfg.n_heads
            and cfg.attn_scale in (None, cfg.head_dim ** -0.5))


def gguf_config(gf, key, floats) -> dict:
    clamp = gf.metadata.get("mpt.attention.clamp_kqv")
    # llama.cpp approximates GELU with tanh; MPT uses the exact one, which camelid runs
    return dict(arch="mpt", norm="layernorm", norm_bias="blk.0.attn_norm.bias" in gf.tensors,
                norm_eps=key("attention.layer_norm_epsilon", float, 1e-5), activation="gelu", gated_mlp=False,
                positions="alibi", alibi_max_bias=key("attention.max_alibi_bias", float, 8.0),
                qkv_clip=key("attention.clamp_kqv", float) if clamp else None)


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_max_alibi_bias(cfg.alibi_max_bias)
    if cfg.qkv_clip:
        w.add_clamp_kqv(cfg.qkv_clip)


FAMILY = Family(
    name="mpt", hf_model_types=("mpt",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="transformer.", layer="blocks.{i}.", layer_names=_layer_names,
                global_names={"tok_embeddings.weight": "wte.weight", "norm.weight": "norm_f.weight",
                              "output.weight": "lm_head.weight"}),
    gguf=GGUFLayout(arch="mpt", config=gguf_config,
                    layer_parts=lambda cfg: one_part({"attn_norm": "attn_norm", "attn.wqkv": "attn_qkv",
                                                      "attn.wo": "attn_output", "mlp_norm": "ffn_norm",
                                                      "mlp.w_in": "ffn_up", "mlp.w_out": "ffn_down"}),
                    exports=_shaped, write_metadata=gguf_write_metadata))
