"""OpenAI's GPT-2: learned positions, LayerNorm, GELU, a fused QKV stored as Conv1D (in, out) weights."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import ACTIVATION_TO_HF, Family, GGUFLayout, HFLayout, activation, first, one_part
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CamelidError(f"GPT-2 option {flag}=true is not supported")
    dim = hf["n_embd"]
    return dict(arch="gpt2", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                ffn_dim=first(hf, "n_inner", default=4 * dim), max_seq_len=hf["n_positions"],
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=activation(hf.get("activation_function", "gelu_new")), gated_mlp=False,
                positions="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True))


def config_to_hf(cfg: ModelConfig) -> dict:
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.dim, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, n_inner=cfg.ffn_dim, n_positions=cfg.max_seq_len,
                layer_norm_epsilon=cfg.norm_eps, activation_function=ACTIVATION_TO_HF[cfg.activation])


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    return {"attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
            "mlp_norm.weight": "ln_2.weight", "mlp_norm.bias": "ln_2.bias",
            "attn.wqkv.weight": "attn.c_attn.weight", "attn.wqkv.bias": "attn.c_attn.bias",
            "attn.wo.weight": "attn.c_proj.weight", "attn.wo.bias": "attn.c_proj.bias",
            "mlp.w_in.weight": "mlp.c_fc.weight", "mlp.w_in.bias": "mlp.c_fc.bias",
            "mlp.w_out.weight": "mlp.c_proj.weight", "mlp.w_out.bias": "mlp.c_proj.bias"}


def gguf_config(gf, key, floats) -> dict:
    return dict(arch="gpt2", norm="layernorm", gated_mlp=False, activation="gelu_tanh", positions="learned",
                norm_eps=key("attention.layer_norm_epsilon", float, 1e-5), qkv_bias=True, attn_out_bias=True,
                mlp_bias=True)


def gguf_layer_parts(cfg: ModelConfig):
    return one_part({"attn_norm": "attn_norm", "attn.wqkv": "attn_qkv", "attn.wo": "attn_output",
                     "mlp_norm": "ffn_norm", "mlp.w_in": "ffn_up", "mlp.w_out": "ffn_down"})


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_layer_norm_eps(cfg.norm_eps)


FAMILY = Family(
    name="gpt2", hf_model_types=("gpt2",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="transformer.", layer="h.{i}.", layer_names=_layer_names, transposed=True,
                global_names={"tok_embeddings.weight": "wte.weight", "pos_embeddings.weight": "wpe.weight",
                              "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias",
                              "output.weight": "lm_head.weight"}),
    gguf=GGUFLayout(arch="gpt2", config=gguf_config, layer_parts=gguf_layer_parts, exports=lambda cfg: True,
                    write_metadata=gguf_write_metadata))
