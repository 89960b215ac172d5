"""BigCode's StarCoder and SantaCoder (`gpt_bigcode`): GPT-2's blocks with multi-query attention, its fused
q | k | v in camelid's order, learned positions, the tanh GELU."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families import gpt2
from camelid.families.spec import ACTIVATION_TO_HF, Family, GGUFLayout, HFLayout, activation, first
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    if hf.get("scale_attn_weights") is False:
        raise CamelidError("scale_attn_weights=false (unscaled attention scores) is not supported")
    dim, n_heads = hf["n_embd"], hf["n_head"]
    return dict(arch="starcoder", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=n_heads,
                n_kv_heads=1 if hf.get("multi_query", True) else n_heads,
                ffn_dim=first(hf, "n_inner", default=4 * dim), max_seq_len=hf.get("n_positions", 8192),
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=activation(hf.get("activation_function", "gelu_pytorch_tanh")), gated_mlp=False,
                positions="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True))


def config_to_hf(cfg: ModelConfig) -> dict:
    act = "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else ACTIVATION_TO_HF[cfg.activation]
    return dict(model_type="gpt_bigcode", architectures=["GPTBigCodeForCausalLM"], n_embd=cfg.dim,
                n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim, n_positions=cfg.max_seq_len,
                multi_query=cfg.n_kv_heads == 1, layer_norm_epsilon=cfg.norm_eps, activation_function=act)


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.wqkv": "attn.c_attn", "attn.wo": "attn.c_proj",
             "mlp.w_in": "mlp.c_fc", "mlp.w_out": "mlp.c_proj"}
    return {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in names.items() for p in ("weight", "bias")}


def gguf_config(gf, key, floats) -> dict:
    return dict(arch="starcoder", norm="layernorm", gated_mlp=False, activation="gelu_tanh", positions="learned",
                norm_eps=key("attention.layer_norm_epsilon", float, 1e-5), qkv_bias=True, attn_out_bias=True,
                mlp_bias=True)


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_eps(cfg.norm_eps)


FAMILY = Family(
    name="starcoder", hf_model_types=("gpt_bigcode",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="transformer.", layer="h.{i}.", layer_names=_layer_names,
                # multi-head (not multi-query) checkpoints interleave q, k and v per head
                qkv_groups=lambda cfg: cfg.n_heads if cfg.n_kv_heads == cfg.n_heads else None,
                global_names={"tok_embeddings.weight": "wte.weight", "pos_embeddings.weight": "wpe.weight",
                              "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias",
                              "output.weight": "lm_head.weight"}),
    gguf=GGUFLayout(arch="starcoder", config=gguf_config, layer_parts=gpt2.gguf_layer_parts,  # GPT-2's tensor names
                    exports=lambda cfg: cfg.positions == "learned" and cfg.norm == "layernorm" and not cfg.gated_mlp
                    and cfg.activation == "gelu_tanh" and cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias,
                    write_metadata=gguf_write_metadata))
