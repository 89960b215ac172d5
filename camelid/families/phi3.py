"""Microsoft's Phi-3 / Phi-3.5 / Phi-4-mini: LLaMA's blocks with q/k/v and gate/up stored fused (in camelid's own
order), LongRoPE for the 128K-context models, a sliding window over every layer where the config sets one.

In GGUF, LongRoPE's factors are two tensors beside the weights. llama.cpp chooses between them once, by the
context window it runs with (long factors when that exceeds the original context); camelid chooses per
forward, as transformers does, by the furthest position. The two agree while the window stays within the
original context. llama.cpp's phi3 graph attends over the whole context (it turns Phi's sliding window off),
and a sliding window read from a file is dropped for the same reason."""

from __future__ import annotations

import torch

from camelid.errors import CamelidError
from camelid.families.spec import (
    ACTIVATION_TO_HF,
    Family,
    GGUFLayout,
    GGUFPart,
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


def gguf_config(gf, key, floats) -> dict:
    scaling = None
    if "rope_factors_long.weight" in gf.tensors:
        if "rope_factors_short.weight" not in gf.tensors:
            raise CamelidError(f"{gf.path}: tensor 'rope_factors_short.weight' is missing")
        scaling = {"type": "longrope", "long_factor": floats("rope_factors_long.weight").tolist(),
                   "short_factor": floats("rope_factors_short.weight").tolist(),
                   "original_max_position_embeddings": key("rope.scaling.original_context_length"),
                   "attention_factor": key("rope.scaling.attn_factor", float, 1.0)}
    elif gf.metadata.get("phi3.rope.scaling.type", "none") != "none":
        raise CamelidError(f"{gf.path}: phi3.rope.scaling.type={gf.metadata['phi3.rope.scaling.type']!r} is not "
                           f"supported (none, or LongRoPE's factor tensors)")
    return dict(arch="phi3", rope_scaling=scaling, norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-5))


def gguf_layer_parts(cfg: ModelConfig) -> dict[str, list[GGUFPart]]:
    return one_part({"attn_norm": "attn_norm", "attn.wqkv": "attn_qkv", "attn.wo": "attn_output",
                     "mlp_norm": "ffn_norm", "mlp.w_in": "ffn_up", "mlp.w_out": "ffn_down"})


def _scaling(cfg: ModelConfig) -> dict:
    return cfg.rope_scaling or {}


def gguf_exports(cfg: ModelConfig) -> bool:
    kind = _scaling(cfg).get("type", _scaling(cfg).get("rope_type"))
    return (kind in (None, "longrope") and cfg.norm == "rmsnorm" and cfg.pre_norm and not cfg.parallel_residual
            and cfg.gated_mlp and cfg.activation == "silu" and cfg.positions == "rope" and not cfg.rope_interleaved
            and not (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias or cfg.lm_head_bias or cfg.qk_norm))


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_sliding_window(cfg.sliding_window or 0)
    s = _scaling(cfg)
    w.add_rope_scaling_orig_ctx_len(s.get("original_max_position_embeddings", cfg.max_seq_len))
    if s:
        w.add_rope_scaling_attn_factors(cfg.rope_attention_factor)


def gguf_extra_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    s = _scaling(cfg)
    if not s:
        return {}
    return {"rope_factors_long.weight": torch.tensor(s["long_factor"], dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(s["short_factor"], dtype=torch.float32)}


FAMILY = Family(
    name="phi3", hf_model_types=("phi3",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf=HFLayout(prefix="model.", layer="layers.{i}.", layer_names=_layer_names,
                global_names={"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                              "output.weight": "lm_head.weight"}),
    gguf=GGUFLayout(arch="phi3", config=gguf_config, layer_parts=gguf_layer_parts, exports=gguf_exports,
                    write_metadata=gguf_write_metadata, rope_scaling_types=("longrope",),
                    extra_tensors=gguf_extra_tensors))
