"""EleutherAI's GPT-J: parallel attention and MLP under one norm, partial rotary on interleaved pairs.
llama.cpp has no GPT-J graph, so there are no GGUF files of it."""

from __future__ import annotations

from camelid.families.spec import ACTIVATION_TO_HF, Family, HFLayout, activation, first, rope_from_hf
from camelid.model.config import ModelConfig


def config_from_hf(hf: dict) -> dict:
    dim, n_heads = hf["n_embd"], hf["n_head"]
    theta, _ = rope_from_hf(hf)
    return dict(arch="gptj", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=n_heads,
                ffn_dim=first(hf, "n_inner", default=4 * dim), max_seq_len=hf.get("n_positions", 2048),
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=activation(hf.get("activation_function", "gelu_new")), gated_mlp=False,
                parallel_residual=True, shared_parallel_norm=True, rope_interleaved=True, rope_theta=theta,
                rotary_pct=hf.get("rotary_dim", dim // n_heads) / (dim // n_heads), mlp_bias=True,
                lm_head_bias=True, tie_embeddings=hf.get("tie_word_embeddings", False))


def config_to_hf(cfg: ModelConfig) -> dict:
    return dict(model_type="gptj", architectures=["GPTJForCausalLM"], n_embd=cfg.dim, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, n_inner=cfg.ffn_dim, n_positions=cfg.max_seq_len, rotary_dim=cfg.rotary_dim,
                layer_norm_epsilon=cfg.norm_eps, activation_function=ACTIVATION_TO_HF[cfg.activation])


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    return {"attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
            "attn.wo.weight": "attn.out_proj.weight",
            "mlp.w_in.weight": "mlp.fc_in.weight", "mlp.w_in.bias": "mlp.fc_in.bias",
            "mlp.w_out.weight": "mlp.fc_out.weight", "mlp.w_out.bias": "mlp.fc_out.bias"}


FAMILY = Family(
    name="gptj", hf_model_types=("gptj",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="transformer.", layer="h.{i}.", layer_names=_layer_names,
                global_names={"tok_embeddings.weight": "wte.weight", "norm.weight": "ln_f.weight",
                              "norm.bias": "ln_f.bias", "output.weight": "lm_head.weight",
                              "output.bias": "lm_head.bias"},
                qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj")))
