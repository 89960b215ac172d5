"""Zhipu/THUDM's GLM chat models. ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat are LLaMA-like blocks (RMSNorm,
SwiGLU with gate and up fused, q/k/v biases, grouped "multi-query" attention) whose rotary embedding turns
neighbouring pairs in the first half of each head only. They ship in two layouts of the same weights: THUDM's
own (`ChatGLMModel`, model_type chatglm: `transformer.encoder.layers.*`, a fused `query_key_value`) and the one
transformers has natively (`GlmForCausalLM`, model_type glm: LLaMA's names). GLM-4-0414 (`Glm4ForCausalLM`)
adds a norm after the attention and after the MLP, before each residual sum.

llama.cpp runs the first two as its `chatglm` architecture (a fused attn_qkv from THUDM's layout, attn_q/k/v
from transformers'), GLM-4-0414 as `glm4`; camelid names the family after the tensors a file holds, so each
file is written back as it came. ChatGLM-6B (the first version: GLM-130B's GeLU blocks and blank-infilling
positions, model/transformer.py's positions "glm_2d") shares only model_type chatglm with them: its family,
chatglm6b, is read from THUDM's layout as its own code reads it."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families.spec import (
    ACTIVATION_TO_HF,
    Family,
    GGUFLayout,
    GGUFPart,
    HFLayout,
    activation,
    first,
    kv_rows,
    q_rows,
    rope_from_hf,
)
from camelid.model.config import ModelConfig


def _glm_config(hf: dict, arch: str) -> dict:
    theta, scaling = rope_from_hf(hf)
    params = hf.get("rope_parameters") or {}
    return dict(
        arch=arch, rope_interleaved=True, vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=first(hf, "num_key_value_heads"),
        head_dim=first(hf, "head_dim"), ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 131072), norm_eps=hf.get("rms_norm_eps", 1.5625e-07),
        activation=activation(hf.get("hidden_act", "silu")), rope_theta=theta, rope_scaling=scaling,
        rotary_pct=first(hf, "partial_rotary_factor", default=params.get("partial_rotary_factor", 0.5)),
        qkv_bias=hf.get("attention_bias", True), tie_embeddings=hf.get("tie_word_embeddings", False),
        post_norms=arch == "glm4")


def glm_from_hf(hf: dict) -> dict:
    return _glm_config(hf, "glm")


def glm4_from_hf(hf: dict) -> dict:
    return _glm_config(hf, "glm4")


def chatglm_from_hf(hf: dict) -> dict:
    """THUDM's config.json, read as transformers' GLM conversion script maps it (ChatGLM-6B's, the first
    version's, as its own modeling code reads it)."""
    if "position_encoding_2d" in hf or "inner_hidden_size" in hf:
        return chatglm6b_from_hf(hf)
    for key, want in (("rmsnorm", True), ("post_layer_norm", True), ("apply_residual_connection_post_layernorm", False),
                      ("fp32_residual_connection", False)):
        if hf.get(key, want) != want:
            raise CamelidError(f"{key}={hf[key]!r} is not supported (ChatGLM2/3 and GLM-4 have {want!r})")
    heads = hf["num_attention_heads"]
    bias = hf.get("add_bias_linear", False)
    return dict(
        arch="chatglm", rope_interleaved=True, vocab_size=first(hf, "padded_vocab_size", "vocab_size"),
        dim=hf["hidden_size"], n_layers=hf["num_layers"], n_heads=heads,
        n_kv_heads=hf["multi_query_group_num"] if hf.get("multi_query_attention") else heads,
        head_dim=first(hf, "kv_channels"), ffn_dim=hf["ffn_hidden_size"], max_seq_len=hf.get("seq_length", 2048),
        norm_eps=hf.get("layernorm_epsilon", 1e-5), rope_theta=10000.0 * hf.get("rope_ratio", 1),
        rotary_pct=0.5, qkv_bias=hf.get("add_qkv_bias", False), attn_out_bias=bias, mlp_bias=bias)


# THUDM's code builds every block with GLMBlock's default num_layers=28: sqrt(2 x 28), whatever the depth
_DEEPNORM = (2 * 28) ** 0.5


def chatglm6b_from_hf(hf: dict) -> dict:
    """ChatGLM-6B: GLM-130B's blocks (LayerNorm, GeLU, q/k/v fused per head, a residual of the normalized input
    times sqrt(2 x 28)) and its blank-infilling positions, as THUDM's modeling_chatglm.py computes them."""
    for key, why in (("pre_seq_len", "a P-tuning v2 prefix"), ("quantization_bit", "THUDM's own quantized weights")):
        if hf.get(key):
            raise CamelidError(f"{key}={hf[key]!r} ({why}) is not supported; use the float checkpoint")
    if not hf.get("position_encoding_2d", True):
        raise CamelidError("position_encoding_2d=false (GLM's one-position variant) is not supported")
    layers, dim = hf["num_layers"], hf["hidden_size"]
    return dict(arch="chatglm6b", vocab_size=hf["vocab_size"], dim=dim, n_layers=layers,
                n_heads=hf["num_attention_heads"], ffn_dim=hf.get("inner_hidden_size") or 4 * dim,
                max_seq_len=hf.get("max_sequence_length", 2048), norm="layernorm",
                norm_eps=hf.get("layernorm_epsilon", 1e-5), activation="gelu_tanh", gated_mlp=False,
                positions="glm_2d", rotary_pct=0.5, rope_fp16_freqs=True, glm_start_id=hf.get("bos_token_id", 130004),
                glm_mask_ids=[hf.get("gmask_token_id", 130001), hf.get("mask_token_id", 130000)],
                residual_scale=_DEEPNORM, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                tie_embeddings=False)


def chatglm6b_to_hf(cfg: ModelConfig) -> dict:
    if cfg.positions != "glm_2d" or cfg.residual_scale != _DEEPNORM or cfg.norm != "layernorm" \
            or cfg.gated_mlp or cfg.head_dim * cfg.n_heads != cfg.dim:
        raise CamelidError(f"this {cfg.arch} model's blocks are not ChatGLM-6B's; it has no ChatGLM-6B form")
    gmask, mask = cfg.glm_mask_ids
    return dict(model_type="chatglm", architectures=["ChatGLMModel"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.dim, num_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                inner_hidden_size=cfg.ffn_dim, max_sequence_length=cfg.max_seq_len, layernorm_epsilon=cfg.norm_eps,
                position_encoding_2d=True, bos_token_id=cfg.glm_start_id, gmask_token_id=gmask, mask_token_id=mask,
                use_cache=True)


def _chatglm6b_layer_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"attn.wqkv": "attention.query_key_value", "attn.wo": "attention.dense", "attn_norm": "input_layernorm",
             "mlp_norm": "post_attention_layernorm", "mlp.w_in": "mlp.dense_h_to_4h", "mlp.w_out": "mlp.dense_4h_to_h"}
    return {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in names.items() for p in ("weight", "bias")}


def _check_exportable(cfg: ModelConfig, what: str):
    if not cfg.rope_interleaved or cfg.norm != "rmsnorm" or not cfg.gated_mlp or cfg.positions != "rope" \
            or cfg.parallel_residual or not cfg.pre_norm:
        raise CamelidError(f"this {cfg.arch} model's blocks are not GLM's; it has no {what} form")


def _glm_to_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict:
    _check_exportable(cfg, model_type)
    if cfg.attn_out_bias or cfg.mlp_bias:
        raise CamelidError(f"transformers' {architecture} has no output or MLP biases")
    return dict(model_type=model_type, architectures=[architecture], hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, intermediate_size=cfg.ffn_dim, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, hidden_act=ACTIVATION_TO_HF[cfg.activation], rope_theta=cfg.rope_theta,
                rope_scaling=cfg.rope_scaling, partial_rotary_factor=cfg.rotary_pct, attention_bias=cfg.qkv_bias,
                pad_token_id=None)  # GlmConfig's default (151329) lies outside smaller vocabularies


def glm_to_hf(cfg: ModelConfig) -> dict:
    return _glm_to_hf(cfg, "glm", "GlmForCausalLM")


def glm4_to_hf(cfg: ModelConfig) -> dict:
    return _glm_to_hf(cfg, "glm4", "Glm4ForCausalLM")


def chatglm_to_hf(cfg: ModelConfig) -> dict:
    _check_exportable(cfg, "ChatGLM")
    if cfg.rotary_pct != 0.5 or cfg.tie_embeddings or cfg.rope_scaling or cfg.attn_out_bias != cfg.mlp_bias:
        raise CamelidError("THUDM's ChatGLM layout rotates half of each head, has its own output layer, no rope "
                           "scaling and one switch for the output and MLP biases: this model does not fit it")
    return dict(model_type="chatglm", architectures=["ChatGLMModel"], padded_vocab_size=cfg.vocab_size,
                hidden_size=cfg.dim, num_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                multi_query_attention=cfg.n_kv_heads != cfg.n_heads, multi_query_group_num=cfg.n_kv_heads,
                kv_channels=cfg.head_dim, ffn_hidden_size=cfg.ffn_dim, seq_length=cfg.max_seq_len,
                layernorm_epsilon=cfg.norm_eps, rope_ratio=cfg.rope_theta / 10000.0, add_qkv_bias=cfg.qkv_bias,
                add_bias_linear=cfg.mlp_bias, rmsnorm=True, post_layer_norm=True,
                apply_residual_connection_post_layernorm=False, fp32_residual_connection=False, original_rope=True,
                apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, hidden_dropout=0.0,
                attention_dropout=0.0)


def _glm_layer_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
             "attn.wo.weight": "self_attn.o_proj.weight", "mlp.w_in.weight": "mlp.gate_up_proj.weight",
             "mlp.w_out.weight": "mlp.down_proj.weight"}
    if cfg.post_norms:
        names.update({"post_attn_norm.weight": "post_self_attn_layernorm.weight",
                      "post_mlp_norm.weight": "post_mlp_layernorm.weight"})
    return names


def _chatglm_layer_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
             "attn.wqkv.weight": "self_attention.query_key_value.weight",
             "attn.wqkv.bias": "self_attention.query_key_value.bias", "attn.wo.weight": "self_attention.dense.weight",
             "attn.wo.bias": "self_attention.dense.bias", "mlp.w_in.weight": "mlp.dense_h_to_4h.weight",
             "mlp.w_in.bias": "mlp.dense_h_to_4h.bias", "mlp.w_out.weight": "mlp.dense_4h_to_h.weight",
             "mlp.w_out.bias": "mlp.dense_4h_to_h.bias"}
    return names


def gguf_config(gf, key, floats) -> dict:
    arch = gf.metadata["general.architecture"]
    if gf.metadata.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise CamelidError(f"{gf.path}: {arch}.rope.scaling.type={gf.metadata[f'{arch}.rope.scaling.type']!r} is "
                           f"not supported for {arch} (none)")
    fused = "blk.0.attn_qkv.weight" in gf.tensors
    bias = "blk.0.attn_qkv.bias" if fused else "blk.0.attn_q.bias"
    return dict(arch="glm4" if arch == "glm4" else "chatglm" if fused else "glm", rope_interleaved=True,
                          norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-5), qkv_bias=bias in gf.tensors,
                          attn_out_bias="blk.0.attn_output.bias" in gf.tensors,
                          mlp_bias="blk.0.ffn_up.bias" in gf.tensors, post_norms=arch == "glm4")


def _gguf_parts(fused_qkv: bool):
    def layer_parts(cfg: ModelConfig) -> dict[str, list[GGUFPart]]:
        b = "blk.{i}."
        parts = {}
        for p in ("weight", "bias"):
            parts[f"attn.wqkv.{p}"] = [GGUFPart(f"{b}attn_qkv.{p}")] if fused_qkv else [
                GGUFPart(f"{b}attn_q.{p}", q_rows), GGUFPart(f"{b}attn_k.{p}", kv_rows),
                GGUFPart(f"{b}attn_v.{p}", kv_rows)]
            parts.update({f"attn.wo.{p}": [GGUFPart(f"{b}attn_output.{p}")],
                          f"mlp.w_in.{p}": [GGUFPart(f"{b}ffn_up.{p}")],  # gate | up, as llama.cpp's swiglu splits
                          f"mlp.w_out.{p}": [GGUFPart(f"{b}ffn_down.{p}")]})
        parts.update({"attn_norm.weight": [GGUFPart(b + "attn_norm.weight")],
                      "mlp_norm.weight": [GGUFPart(b + "ffn_norm.weight")]})
        if cfg.post_norms:
            parts.update({"post_attn_norm.weight": [GGUFPart(b + "post_attention_norm.weight")],
                          "post_mlp_norm.weight": [GGUFPart(b + "post_ffw_norm.weight")]})
        return parts
    return layer_parts


def _gguf_exports(post_norms: bool):
    def exports(cfg: ModelConfig) -> bool:
        return (cfg.rope_interleaved and cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.pre_norm
                and not cfg.parallel_residual and cfg.gated_mlp and cfg.activation == "silu"
                and cfg.post_norms == post_norms and not cfg.norm_plus_one and not cfg.qk_norm
                and cfg.sliding_window is None and not cfg.lm_head_bias and cfg.attn_scale is None
                and cfg.head_dim * cfg.n_heads == cfg.dim)  # llama.cpp's graphs size heads as dim / heads
    return exports


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)


def _gguf(arch: str, fused_qkv: bool) -> GGUFLayout:
    return GGUFLayout(arch=arch, config=gguf_config, layer_parts=_gguf_parts(fused_qkv),
                      exports=_gguf_exports(arch == "glm4"), write_metadata=gguf_write_metadata, always_output=True)


_GLOBALS = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
            "output.weight": "lm_head.weight"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# GLM-4's chat format; a GLM folder brings its own template, which takes precedence
_STOP = ["<|user|>", "<|observation|>", "<|endoftext|>"]

GLM = Family(name="glm", hf_model_types=("glm",), config_from_hf=glm_from_hf, config_to_hf=glm_to_hf,
             hf=HFLayout(prefix="model.", layer="layers.{i}.", layer_names=_glm_layer_names, global_names=_GLOBALS,
                         qkv=_QKV),
             gguf=_gguf("chatglm", fused_qkv=False), template="chatglm4", stop=_STOP)
GLM4 = Family(name="glm4", hf_model_types=("glm4",), config_from_hf=glm4_from_hf, config_to_hf=glm4_to_hf,
              hf=HFLayout(prefix="model.", layer="layers.{i}.", layer_names=_glm_layer_names, global_names=_GLOBALS,
                          qkv=_QKV),
              gguf=_gguf("glm4", fused_qkv=False), template="chatglm4", stop=_STOP)
CHATGLM = Family(name="chatglm", hf_model_types=("chatglm",), config_from_hf=chatglm_from_hf,
                 config_to_hf=chatglm_to_hf,
                 hf=HFLayout(prefix="transformer.", layer="encoder.layers.{i}.", layer_names=_chatglm_layer_names,
                             global_names={"tok_embeddings.weight": "embedding.word_embeddings.weight",
                                           "norm.weight": "encoder.final_layernorm.weight",
                                           "output.weight": "output_layer.weight"}),
                 gguf=_gguf("chatglm", fused_qkv=True), template="chatglm4", stop=_STOP)
# model_type chatglm too: read by CHATGLM's config_from_hf, named by its config
CHATGLM6B = Family(name="chatglm6b", hf_model_types=(), config_from_hf=chatglm6b_from_hf,
                   config_to_hf=chatglm6b_to_hf,
                   hf=HFLayout(prefix="transformer.", layer="layers.{i}.", layer_names=_chatglm6b_layer_names,
                               global_names={"tok_embeddings.weight": "word_embeddings.weight",
                                             "norm.weight": "final_layernorm.weight",
                                             "norm.bias": "final_layernorm.bias", "output.weight": "lm_head.weight"},
                               qkv_groups=lambda cfg: cfg.n_heads),
                   template="chatglm")  # THUDM's chat(): [Round n] 问/答 turns
