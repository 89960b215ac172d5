"""Hugging Face checkpoint folders in and out, for every family camelid runs.

Each family is data: how its config.json maps onto ModelConfig, and how its tensor names map onto ours.
The fused QKV layouts of NeoX and Falcon are the same grouped layout with different group sizes, so one
pair of functions (`ungroup_qkv` / `group_qkv`) converts them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from camelid.errors import CamelidError
from camelid.files import read_json, write_text
from camelid.formats.tensors import load_tensor_files, release_pages, save_safetensors
from camelid.model.config import ModelConfig

SUPPORTED = ("llama", "mistral", "gpt2", "gptj", "gpt_neox", "falcon", "opt")


def _get(hf: dict, *keys, default=None):
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    return default


def _rope(hf: dict, default_theta=10000.0):
    params = hf.get("rope_parameters") or {}
    theta = _get(hf, "rope_theta", "rotary_emb_base", default=params.get("rope_theta", default_theta))
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta), scaling


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise CamelidError(f"{source}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})")
    _check_hf_types(hf, source)
    try:
        return ModelConfig(**_FROM_HF[mt](hf))
    except KeyError as exc:
        raise CamelidError(f"{source}: missing key {exc.args[0]!r} for model_type {mt!r}") from None
    except CamelidError as exc:
        raise CamelidError(f"{source}: {exc}") from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise CamelidError(f"{source}: an implausible value ({exc})") from None


# The types of the config.json keys the families read, so a wrong one is named as the file names it.
_HF_INTS = ("vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
            "num_key_value_heads", "num_kv_heads", "head_dim", "intermediate_size", "n_inner", "ffn_dim",
            "ffn_hidden_size", "max_position_embeddings", "n_positions", "rotary_dim", "word_embed_proj_dim")
_HF_FLOATS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rotary_emb_base", "rotary_pct",
              "partial_rotary_factor")
_HF_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "bias", "use_parallel_residual", "parallel_attn",
             "multi_query", "new_decoder_architecture", "do_layer_norm_before", "enable_bias")
_HF_STRS = ("hidden_act", "activation_function", "activation")


def _check_hf_types(hf: dict, source: str):
    checks = [(_HF_INTS, (int,), "an integer"), (_HF_FLOATS, (int, float), "a number"),
              (_HF_BOOLS, (bool,), "true or false"), (_HF_STRS, (str,), "a string")]
    for keys, kinds, words in checks:
        for key in keys:
            value = hf.get(key)
            if value is None:
                continue
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise CamelidError(f"{source}: {key} must be {words}, got {value!r}")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CamelidError(f"{source}: {key} must be an object or null, got {hf[key]!r}")


def _llama_cfg(hf):
    theta, scaling = _rope(hf)
    bias = hf.get("attention_bias", False)
    return dict(arch="llama", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], n_kv_heads=_get(hf, "num_key_value_heads"),
                head_dim=_get(hf, "head_dim"), ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                activation=_act(hf.get("hidden_act", "silu")), rope_theta=theta, rope_scaling=scaling,
                qkv_bias=bias, attn_out_bias=bias, mlp_bias=hf.get("mlp_bias", False),
                tie_embeddings=hf.get("tie_word_embeddings", False))


def _gpt2_cfg(hf):
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CamelidError(f"config.json: GPT-2 option {flag}=true is not supported")
    dim = hf["n_embd"]
    return dict(arch="gpt2", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                ffn_dim=_get(hf, "n_inner", default=4 * dim), max_seq_len=hf["n_positions"],
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=_act(hf.get("activation_function", "gelu_new")), gated_mlp=False, positions="learned",
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def _gptj_cfg(hf):
    dim, n_heads = hf["n_embd"], hf["n_head"]
    theta, _ = _rope(hf)
    return dict(arch="gptj", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=n_heads,
                ffn_dim=_get(hf, "n_inner", default=4 * dim), max_seq_len=hf.get("n_positions", 2048),
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=_act(hf.get("activation_function", "gelu_new")), gated_mlp=False,
                parallel_residual=True, shared_parallel_norm=True, rope_interleaved=True, rope_theta=theta,
                rotary_pct=hf.get("rotary_dim", dim // n_heads) / (dim // n_heads), mlp_bias=True,
                lm_head_bias=True, tie_embeddings=hf.get("tie_word_embeddings", False))


def _neox_cfg(hf):
    theta, scaling = _rope(hf)
    params = hf.get("rope_parameters") or {}
    pct = _get(hf, "rotary_pct", "partial_rotary_factor", default=params.get("partial_rotary_factor", 1.0))
    bias = hf.get("attention_bias", True)
    return dict(arch="gpt_neox", vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
                activation=_act(hf.get("hidden_act", "gelu")),
                gated_mlp=False, parallel_residual=hf.get("use_parallel_residual", True), rotary_pct=pct,
                rope_theta=theta, rope_scaling=scaling, qkv_bias=bias, attn_out_bias=bias, mlp_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", False))


def _falcon_cfg(hf):
    if hf.get("alibi"):
        raise CamelidError("config.json: Falcon with alibi positions (Falcon-RW) is not supported")
    n_heads = hf["num_attention_heads"]
    new_arch = hf.get("new_decoder_architecture", False)
    n_kv = hf.get("num_kv_heads", n_heads) if new_arch else (1 if hf.get("multi_query", True) else n_heads)
    parallel = new_arch or hf.get("parallel_attn", True)
    one_norm = parallel and (not new_arch or hf.get("num_ln_in_parallel_attn") == 1)
    theta, scaling = _rope(hf)
    dim = hf["hidden_size"]
    return dict(arch="falcon", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=n_kv, head_dim=_get(hf, "head_dim"),
                ffn_dim=_get(hf, "ffn_hidden_size", default=4 * dim),
                max_seq_len=hf.get("max_position_embeddings", 2048), norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_act(hf.get("activation", "gelu")),
                gated_mlp=False, parallel_residual=parallel, shared_parallel_norm=one_norm, rope_theta=theta,
                rope_scaling=scaling, qkv_bias=hf.get("bias", False), attn_out_bias=hf.get("bias", False),
                mlp_bias=hf.get("bias", False), tie_embeddings=hf.get("tie_word_embeddings", True),
                extra={"new_decoder_architecture": new_arch})


def _opt_cfg(hf):
    if hf.get("layer_norm_elementwise_affine") is False:
        raise CamelidError("config.json: OPT with layer_norm_elementwise_affine=false is not supported")
    dim = hf["hidden_size"]
    proj = hf.get("word_embed_proj_dim", dim)
    pre = hf.get("do_layer_norm_before", True)
    bias = hf.get("enable_bias", True)
    return dict(arch="opt", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], ffn_dim=hf["ffn_dim"],
                max_seq_len=hf.get("max_position_embeddings", 2048), norm="layernorm", norm_eps=1e-5,
                activation=_act(hf.get("activation_function", "relu")), gated_mlp=False, positions="learned",
                learned_pos_offset=2, pre_norm=pre, qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias,
                tie_embeddings=hf.get("tie_word_embeddings", True), embed_proj_dim=proj if proj != dim else None,
                final_norm=pre and not hf.get("_remove_final_layer_norm", False))


_FROM_HF = {"llama": _llama_cfg, "mistral": _llama_cfg, "gpt2": _gpt2_cfg, "gptj": _gptj_cfg,
            "gpt_neox": _neox_cfg, "falcon": _falcon_cfg, "opt": _opt_cfg}
_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _act(name: str) -> str:
    if name not in _ACTS:
        raise CamelidError(f"config.json: activation {name!r} is not supported ({', '.join(_ACTS)})")
    return _ACTS[name]


# ---------------------------------------------------------------- tensor names

# Per family: (prefix stripped from HF names, {our per-layer name: HF per-layer name}, {our global: HF global}).
# "{i}" is the layer index. Fused tensors (QKV, gate+up) are handled by _fused below.
_NAMES = {
    "llama": ("model.", "layers.{i}.", {
        "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
        "attn.wo.weight": "self_attn.o_proj.weight", "attn.wo.bias": "self_attn.o_proj.bias",
        "mlp.w_out.weight": "mlp.down_proj.weight", "mlp.w_out.bias": "mlp.down_proj.bias"},
        {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
         "output.weight": "lm_head.weight"}),
    "gpt2": ("transformer.", "h.{i}.", {
        "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
        "mlp_norm.weight": "ln_2.weight", "mlp_norm.bias": "ln_2.bias",
        "attn.wqkv.weight": "attn.c_attn.weight", "attn.wqkv.bias": "attn.c_attn.bias",
        "attn.wo.weight": "attn.c_proj.weight", "attn.wo.bias": "attn.c_proj.bias",
        "mlp.w_in.weight": "mlp.c_fc.weight", "mlp.w_in.bias": "mlp.c_fc.bias",
        "mlp.w_out.weight": "mlp.c_proj.weight", "mlp.w_out.bias": "mlp.c_proj.bias"},
        {"tok_embeddings.weight": "wte.weight", "pos_embeddings.weight": "wpe.weight",
         "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias", "output.weight": "lm_head.weight"}),
    "gptj": ("transformer.", "h.{i}.", {
        "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
        "attn.wo.weight": "attn.out_proj.weight",
        "mlp.w_in.weight": "mlp.fc_in.weight", "mlp.w_in.bias": "mlp.fc_in.bias",
        "mlp.w_out.weight": "mlp.fc_out.weight", "mlp.w_out.bias": "mlp.fc_out.bias"},
        {"tok_embeddings.weight": "wte.weight", "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias",
         "output.weight": "lm_head.weight", "output.bias": "lm_head.bias"}),
    "gpt_neox": ("gpt_neox.", "layers.{i}.", {
        "attn_norm.weight": "input_layernorm.weight", "attn_norm.bias": "input_layernorm.bias",
        "mlp_norm.weight": "post_attention_layernorm.weight", "mlp_norm.bias": "post_attention_layernorm.bias",
        "attn.wqkv.weight": "attention.query_key_value.weight", "attn.wqkv.bias": "attention.query_key_value.bias",
        "attn.wo.weight": "attention.dense.weight", "attn.wo.bias": "attention.dense.bias",
        "mlp.w_in.weight": "mlp.dense_h_to_4h.weight", "mlp.w_in.bias": "mlp.dense_h_to_4h.bias",
        "mlp.w_out.weight": "mlp.dense_4h_to_h.weight", "mlp.w_out.bias": "mlp.dense_4h_to_h.bias"},
        {"tok_embeddings.weight": "embed_in.weight", "norm.weight": "final_layer_norm.weight",
         "norm.bias": "final_layer_norm.bias", "output.weight": "embed_out.weight"}),
    "falcon": ("transformer.", "h.{i}.", {
        "attn.wqkv.weight": "self_attention.query_key_value.weight",
        "attn.wqkv.bias": "self_attention.query_key_value.bias",
        "attn.wo.weight": "self_attention.dense.weight", "attn.wo.bias": "self_attention.dense.bias",
        "mlp.w_in.weight": "mlp.dense_h_to_4h.weight", "mlp.w_in.bias": "mlp.dense_h_to_4h.bias",
        "mlp.w_out.weight": "mlp.dense_4h_to_h.weight", "mlp.w_out.bias": "mlp.dense_4h_to_h.bias"},
        {"tok_embeddings.weight": "word_embeddings.weight", "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias",
         "output.weight": "lm_head.weight"}),
    "opt": ("model.decoder.", "layers.{i}.", {
        "attn_norm.weight": "self_attn_layer_norm.weight", "attn_norm.bias": "self_attn_layer_norm.bias",
        "mlp_norm.weight": "final_layer_norm.weight", "mlp_norm.bias": "final_layer_norm.bias",
        "attn.wo.weight": "self_attn.out_proj.weight", "attn.wo.bias": "self_attn.out_proj.bias",
        "mlp.w_in.weight": "fc1.weight", "mlp.w_in.bias": "fc1.bias",
        "mlp.w_out.weight": "fc2.weight", "mlp.w_out.bias": "fc2.bias"},
        {"tok_embeddings.weight": "embed_tokens.weight", "pos_embeddings.weight": "embed_positions.weight",
         "embed_proj_in.weight": "project_in.weight", "embed_proj_out.weight": "project_out.weight",
         "norm.weight": "final_layer_norm.weight", "norm.bias": "final_layer_norm.bias",
         "output.weight": "lm_head.weight"}),
}
_NAMES["mistral"] = _NAMES["llama"]
# Names outside the prefix, kept as they are.
_UNPREFIXED = {"lm_head.weight", "lm_head.bias", "embed_out.weight"}
# Buffers some checkpoints carry (causal masks, RoPE tables) that are recomputed, never loaded.
_IGNORED_BUFFERS = {("attn", "bias"), ("attn", "masked_bias"), ("attention", "bias"), ("attention", "masked_bias"),
                    ("rotary_emb", "inv_freq")}


def _falcon_norm_names(cfg: ModelConfig) -> dict:
    if cfg.extra.get("new_decoder_architecture") and not cfg.shared_parallel_norm:
        return {"attn_norm": "ln_attn", "mlp_norm": "ln_mlp"}
    if cfg.shared_parallel_norm:
        return {"attn_norm": "input_layernorm"}
    return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def _layer_names(cfg: ModelConfig, family: str) -> dict:
    names = dict(_NAMES[family][2])
    if family == "falcon":
        for ours, theirs in _falcon_norm_names(cfg).items():
            for p in ("weight", "bias"):
                names[f"{ours}.{p}"] = f"{theirs}.{p}"
    return names


def _qkv_groups(cfg: ModelConfig, family: str) -> int | None:
    """Number of groups in a family's fused QKV layout (None: already q|k|v, or separate tensors)."""
    if family == "gpt_neox":
        return cfg.n_heads  # per head: q, k, v
    if family == "falcon":
        return cfg.n_kv_heads if cfg.extra.get("new_decoder_architecture") or cfg.n_kv_heads == cfg.n_heads else None
    return None


def ungroup_qkv(t: torch.Tensor, groups: int, cfg: ModelConfig) -> torch.Tensor:
    """(groups, q_per_group + 2, head_dim, ...) rows -> our q | k | v rows."""
    per = cfg.n_heads // groups
    g = t.reshape(groups, per + 2, cfg.head_dim, *t.shape[1:])
    q = g[:, :per].reshape(-1, *t.shape[1:])
    k = g[:, per].reshape(-1, *t.shape[1:])
    v = g[:, per + 1].reshape(-1, *t.shape[1:])
    return torch.cat((q, k, v))


def group_qkv(t: torch.Tensor, groups: int, cfg: ModelConfig) -> torch.Tensor:
    per = cfg.n_heads // groups
    hd = cfg.head_dim
    q, k, v = t.split((cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd))
    q = q.reshape(groups, per, hd, *t.shape[1:])
    k = k.reshape(groups, 1, hd, *t.shape[1:])
    v = v.reshape(groups, 1, hd, *t.shape[1:])
    return torch.cat((q, k, v), dim=1).reshape(t.shape)


def state_dict_from_hf(hf_sd: dict, cfg: ModelConfig, source: str, convert=None) -> dict:
    """camelid's names (and fused q/k/v, gate/up) for a transformers state dict. `convert(name, tensor)` ->
    {name: tensor} is applied to each tensor as it is made, so a fused copy lives only until it is converted."""
    family = cfg.arch if cfg.arch in _NAMES else "llama"
    prefix, layer_fmt, layer_names, global_names = _NAMES[family]
    sd = _Converted(convert)
    remaining = {}
    for name, t in hf_sd.items():
        if tuple(name.split(".")[-2:]) in _IGNORED_BUFFERS:
            continue
        key = name
        if family == "opt" and key.startswith("decoder."):
            key = "model." + key
        if key not in _UNPREFIXED and not key.startswith(prefix):
            key = prefix + key  # some checkpoints (gpt2, the original OPT) omit the wrapper prefix
        remaining[key] = t
    take = remaining.pop
    layer_names = _layer_names(cfg, family)
    for ours, theirs in global_names.items():
        full = theirs if theirs in _UNPREFIXED else prefix + theirs
        if ours == "output.weight" and cfg.tie_embeddings:
            remaining.pop(full, None)
            continue
        if full in remaining:
            sd[ours] = take(full)
    groups = _qkv_groups(cfg, family)
    for i in range(cfg.n_layers):
        base = prefix + layer_fmt.format(i=i)
        for ours, theirs in layer_names.items():
            if base + theirs in remaining:
                t = take(base + theirs)
                if family == "gpt2" and t.dim() == 2:
                    t = t.t()  # GPT-2 stores Conv1D weights as (in, out)
                if ours.startswith("attn.wqkv") and groups:
                    t = ungroup_qkv(t, groups, cfg)
                sd[f"layers.{i}.{ours}"] = t
        _fused(sd, take, remaining, i, base, family)
    if remaining:
        raise CamelidError(f"{source}: unexpected tensor {next(iter(remaining))!r} for {family}")
    return dict(sd)


class _Converted(dict):
    """A dict that stores `convert(key, value)`'s entries in place of key: value."""

    def __init__(self, convert):
        super().__init__()
        self.convert = convert

    def __setitem__(self, key, value):
        if self.convert is None:
            super().__setitem__(key, value)
        else:
            self.update(self.convert(key, value))


_SPLIT_QKV = {"llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mistral": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "gptj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
              "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
_SPLIT_GATE_UP = {"llama": ("mlp.gate_proj", "mlp.up_proj"), "mistral": ("mlp.gate_proj", "mlp.up_proj")}


def _fused(sd, take, remaining, i, base, family):
    for ours, parts in (("attn.wqkv", _SPLIT_QKV.get(family)), ("mlp.w_in", _SPLIT_GATE_UP.get(family))):
        if not parts:
            continue
        for p in ("weight", "bias"):
            names = [f"{base}{part}.{p}" for part in parts]
            if all(n in remaining for n in names):
                tensors = [take(n) for n in names]
                sd[f"layers.{i}.{ours}.{p}"] = torch.cat(tensors)
                for t in tensors:  # copied: a memory-mapped part's pages can go
                    release_pages(t)


def state_dict_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    family = cfg.arch
    prefix, layer_fmt, _, global_names = _NAMES[family]
    layer_names = _layer_names(cfg, family)
    out = {}
    for ours, theirs in global_names.items():
        if ours in sd and not (ours == "output.weight" and cfg.tie_embeddings):
            out[theirs if theirs in _UNPREFIXED else prefix + theirs] = sd[ours]
    groups = _qkv_groups(cfg, family)
    hd = cfg.head_dim
    for i in range(cfg.n_layers):
        base = prefix + layer_fmt.format(i=i)
        for ours, theirs in layer_names.items():
            t = sd.get(f"layers.{i}.{ours}")
            if t is None:
                continue
            if ours.startswith("attn.wqkv") and groups:
                t = group_qkv(t, groups, cfg)
            if family == "gpt2" and t.dim() == 2:
                t = t.t()
            out[base + theirs] = t.contiguous()
        for p in ("weight", "bias"):
            qkv = sd.get(f"layers.{i}.attn.wqkv.{p}")
            if family in _SPLIT_QKV and qkv is not None:
                sizes = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd)
                for part, t in zip(_SPLIT_QKV[family], qkv.split(sizes)):
                    out[f"{base}{part}.{p}"] = t.contiguous()
            w_in = sd.get(f"layers.{i}.mlp.w_in.{p}")
            if family in _SPLIT_GATE_UP and w_in is not None:
                for part, t in zip(_SPLIT_GATE_UP[family], w_in.chunk(2)):
                    out[f"{base}{part}.{p}"] = t.contiguous()
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32")
    a = cfg.arch
    if a == "llama":
        return dict(common, model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=cfg.dim,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                    num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.ffn_dim,
                    max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                    hidden_act=_ACT_TO_HF[cfg.activation], rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                    attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if a == "gpt2":
        return dict(common, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.dim,
                    n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim, n_positions=cfg.max_seq_len,
                    layer_norm_epsilon=cfg.norm_eps, activation_function=_ACT_TO_HF[cfg.activation])
    if a == "gptj":
        return dict(common, model_type="gptj", architectures=["GPTJForCausalLM"], n_embd=cfg.dim,
                    n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim, n_positions=cfg.max_seq_len,
                    rotary_dim=cfg.rotary_dim, layer_norm_epsilon=cfg.norm_eps,
                    activation_function=_ACT_TO_HF[cfg.activation])
    if a == "gpt_neox":
        return dict(common, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=cfg.dim,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim,
                    max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
                    hidden_act=_ACT_TO_HF[cfg.activation], use_parallel_residual=cfg.parallel_residual,
                    rotary_pct=cfg.rotary_pct, partial_rotary_factor=cfg.rotary_pct, rotary_emb_base=cfg.rope_theta,
                    rope_theta=cfg.rope_theta, attention_bias=cfg.qkv_bias)
    if a == "falcon":
        new_arch = bool(cfg.extra.get("new_decoder_architecture"))
        return dict(common, model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=cfg.dim,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_kv_heads=cfg.n_kv_heads,
                    new_decoder_architecture=new_arch, multi_query=cfg.n_kv_heads == 1 and not new_arch,
                    parallel_attn=cfg.parallel_residual, bias=cfg.qkv_bias, alibi=False,
                    num_ln_in_parallel_attn=(1 if cfg.shared_parallel_norm else 2) if new_arch else None,
                    ffn_hidden_size=cfg.ffn_dim, layer_norm_epsilon=cfg.norm_eps, rope_theta=cfg.rope_theta,
                    max_position_embeddings=cfg.max_seq_len, activation=_ACT_TO_HF[cfg.activation])
    if a == "opt":
        return dict(common, model_type="opt", architectures=["OPTForCausalLM"], hidden_size=cfg.dim,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim,
                    max_position_embeddings=cfg.max_seq_len, do_layer_norm_before=cfg.pre_norm,
                    word_embed_proj_dim=cfg.embed_proj_dim or cfg.dim, activation_function=cfg.activation,
                    enable_bias=cfg.qkv_bias, _remove_final_layer_norm=cfg.pre_norm and not cfg.final_norm)
    raise CamelidError(f"architecture {a!r} cannot be exported to a Hugging Face folder")


# ---------------------------------------------------------------- folders


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise CamelidError(f"{folder}: no config.json (not a Hugging Face model folder)")
    return read_json(path)


def load_hf_folder(folder: Path) -> tuple[ModelConfig, dict]:
    hf = read_hf_config(folder)
    cfg = config_from_hf(hf, str(folder / "config.json"))
    return cfg, state_dict_from_hf(load_tensor_files(folder), cfg, str(folder))


def save_hf_folder(sd: dict, cfg: ModelConfig, folder: Path, extra_json: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict_to_hf(sd, cfg), folder / "model.safetensors", metadata={"format": "pt"})
    hf = config_to_hf(cfg)
    for name, data in (extra_json or {}).items():
        if name == "config.json":
            hf.update(data)
        else:
            _write_json(folder / name, data)
    _write_json(folder / "config.json", hf)


def _write_json(path: Path, data: dict):
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
