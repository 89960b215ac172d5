"""Hugging Face checkpoint folders in and out, for every family camelid runs.

What each family calls its config keys and tensors is in its module under `camelid/families/`; this module
applies those specs: config.json <-> ModelConfig, and state dicts renamed, fused (q/k/v, gate/up) and split.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from camelid.errors import CamelidError
from camelid.families import HF_MODEL_TYPES, family
from camelid.families.spec import group_qkv, ungroup_qkv
from camelid.files import read_json, write_text
from camelid.formats.tensors import load_tensor_files, release_pages, save_safetensors
from camelid.model.config import ModelConfig
from camelid.model.quant import unpack_int4


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise CamelidError(f"{source}: model_type {mt!r} is not supported (supported: {', '.join(HF_MODEL_TYPES)})")
    _check_hf_types(hf, source)
    try:
        return ModelConfig(**_dynamic_context(HF_MODEL_TYPES[mt].config_from_hf(hf)))
    except KeyError as exc:
        raise CamelidError(f"{source}: missing key {exc.args[0]!r} for model_type {mt!r}") from None
    except CamelidError as exc:
        raise CamelidError(f"{source}: {exc}") from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise CamelidError(f"{source}: an implausible value ({exc})") from None


def _dynamic_context(fields: dict) -> dict:
    """Dynamic NTK scaling stretches the context config.json gives by its factor: that is the context camelid
    allows, while the scaling keeps the original length it grows the base from."""
    scaling = fields.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "dynamic" and isinstance(scaling.get("factor"), (int, float)):
        fields["max_seq_len"] = int(fields["max_seq_len"] * max(scaling["factor"], 1))
    return fields


# The types of the config.json keys the families read, so a wrong one is named as the file names it.
_HF_INTS = ("vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
            "num_key_value_heads", "num_kv_heads", "head_dim", "intermediate_size", "n_inner", "ffn_dim",
            "ffn_hidden_size", "max_position_embeddings", "n_positions", "rotary_dim", "word_embed_proj_dim",
            "sliding_window", "sliding_window_pattern", "max_window_layers", "original_max_position_embeddings",
            "num_layers", "padded_vocab_size", "kv_channels", "seq_length", "multi_query_group_num", "d_model", "d_kv",
            "d_ff", "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
            "relative_attention_max_distance")
_HF_FLOATS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rotary_emb_base", "rotary_pct",
              "partial_rotary_factor", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
              "rope_local_base_freq", "layernorm_epsilon", "rope_ratio")
_HF_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "bias", "use_parallel_residual", "parallel_attn",
             "multi_query", "new_decoder_architecture", "do_layer_norm_before", "enable_bias", "use_sliding_window",
             "use_bidirectional_attention", "multi_query_attention", "add_qkv_bias", "add_bias_linear", "rmsnorm",
             "post_layer_norm")
_HF_STRS = ("hidden_act", "hidden_activation", "activation_function", "activation", "feed_forward_proj")


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
    layer_types = hf.get("layer_types")
    if layer_types is not None and not (isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
        raise CamelidError(f"{source}: layer_types must be a list of strings, got {layer_types!r}")


# Buffers some checkpoints carry (causal masks, RoPE tables) that are recomputed, never loaded.
_IGNORED_BUFFERS = {("attn", "bias"), ("attn", "masked_bias"), ("attention", "bias"), ("attention", "masked_bias"),
                    ("rotary_emb", "inv_freq"),
                    ("rotary_pos_emb", "inv_freq")}


def _full_name(key: str, layout) -> str:
    """A checkpoint's tensor name with the family's whole wrapper prefix: some checkpoints (GPT-2's, the
    original OPT's) leave out all of it or its first part ("decoder." for "model.decoder.")."""
    if key in layout.unprefixed or key.startswith(layout.prefix):
        return key
    parts = layout.prefix.split(".")[:-1]
    for n in range(1, len(parts)):
        if key.startswith(".".join(parts[n:]) + "."):
            return ".".join(parts[:n]) + "." + key
    return layout.prefix + key


def state_dict_from_hf(hf_sd: dict, cfg: ModelConfig, source: str, convert=None) -> dict:
    """camelid's names (and fused q/k/v, gate/up) for a transformers state dict. `convert(name, tensor)` ->
    {name: tensor} is applied to each tensor as it is made, so a fused copy lives only until it is converted."""
    fam = family(cfg.arch)
    layout = fam.hf
    if layout.tensors is not None:
        return layout.tensors[0](hf_sd, cfg, source, convert)
    sd = _Converted(convert)
    remaining = {_full_name(name, layout): t for name, t in hf_sd.items()
                 if tuple(name.split(".")[-2:]) not in _IGNORED_BUFFERS}
    take = remaining.pop
    for ours, theirs in layout.global_names.items():
        full = theirs if theirs in layout.unprefixed else layout.prefix + theirs
        if ours == "output.weight" and cfg.tie_embeddings:
            remaining.pop(full, None)
            continue
        if full in remaining:
            sd[ours] = take(full)
            _take_scales(sd, take, remaining, full, ours)
    groups = layout.qkv_groups(cfg)
    layer_names = layout.all_layer_names(cfg)
    fusions = layout.fusions(cfg)
    for i in range(cfg.n_layers):
        base = layout.prefix + layout.layer.format(i=i)
        for ours, theirs in layer_names.items():
            if base + theirs in remaining:
                t = take(base + theirs)
                if layout.transposed and t.dim() == 2:
                    t = t.t()
                regroup = (lambda x: ungroup_qkv(x, groups, cfg)) if ours.startswith("attn.wqkv") and groups \
                    else None
                sd[f"layers.{i}.{ours}"] = regroup(t) if regroup else t
                _take_scales(sd, take, remaining, base + theirs, f"layers.{i}.{ours}", regroup, layout.transposed)
        _fuse(sd, take, remaining, i, base, fusions)
    if remaining:
        raise CamelidError(f"{source}: unexpected tensor {next(iter(remaining))!r} for {fam.name}")
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


def _take_scales(sd, take, remaining, theirs: str, ours: str, regroup=None, transposed: bool = False):
    """An int4 weight's scales and zeros (a GPTQ or AWQ checkpoint's, formats/gptq_awq.py) go with it:
    (groups, out, 2), the output rows on the second axis."""
    if not theirs.endswith(".weight") or theirs[:-6] + "scales_zeros" not in remaining:
        return
    if transposed:
        raise CamelidError(f"{theirs}: a quantized checkpoint of a family with transposed weights is not supported")
    sz = take(theirs[:-6] + "scales_zeros")
    sd[ours[:-6] + "scales_zeros"] = regroup(sz.transpose(0, 1)).transpose(0, 1).contiguous() if regroup else sz
    if theirs[:-6] + "in_perm" in remaining:  # an act-order layer's input order (its rows are not touched)
        sd[ours[:-6] + "in_perm"] = take(theirs[:-6] + "in_perm")


def _fuse(sd, take, remaining, i, base, fusions: dict[str, tuple[str, ...]]):
    for ours, parts in fusions.items():
        scales = [f"{base}{part}.scales_zeros" for part in parts]
        perms = [remaining.get(f"{base}{part}.in_perm") for part in parts]
        one_order = all(p is None for p in perms) or all(p is not None and torch.equal(p, perms[0]) for p in perms)
        if any(n in remaining for n in scales) and (not all(n in remaining for n in scales) or not one_order):
            # fused into one layer: all int4 with one input order, or all float, so the int4 parts go float
            for part in parts:
                if f"{base}{part}.scales_zeros" in remaining:
                    remaining[f"{base}{part}.weight"] = _int4_weight(
                        take(f"{base}{part}.weight"), take(f"{base}{part}.scales_zeros"),
                        take(f"{base}{part}.in_perm") if f"{base}{part}.in_perm" in remaining else None)
        if all(f"{base}{part}.in_perm" in remaining for part in parts):
            sd[f"layers.{i}.{ours}.in_perm"] = [take(f"{base}{part}.in_perm") for part in parts][0]
        for p in ("weight", "bias", "scales_zeros"):
            names = [f"{base}{part}.{p}" for part in parts]
            if all(n in remaining for n in names):
                tensors = [take(n) for n in names]
                sd[f"layers.{i}.{ours}.{p}"] = torch.cat(tensors, dim=1 if p == "scales_zeros" else 0)
                for t in tensors:  # copied: a memory-mapped part's pages can go
                    release_pages(t)


def _int4_weight(packed: torch.Tensor, scales_zeros: torch.Tensor, in_perm: torch.Tensor | None = None):
    """An int4 layer's float weight: (q - 8) * scale + zero per group (model/quant.py's layout), its columns
    back in the inputs' order where the layer takes them permuted."""
    q = unpack_int4(packed).float()
    scales, zeros = scales_zeros.float().permute(2, 1, 0)  # (N, groups) each
    g = q.reshape(q.shape[0], scales.shape[1], -1)
    w = ((g - 8) * scales[..., None] + zeros[..., None]).reshape(q.shape)
    if in_perm is None:
        return w
    out = torch.empty_like(w)
    out[:, in_perm] = w
    return out


def state_dict_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    fam = family(cfg.arch)
    layout = fam.hf
    if layout.tensors is not None:
        return layout.tensors[1](sd, cfg)
    out = {}
    for ours, theirs in layout.global_names.items():
        if ours in sd and not (ours == "output.weight" and cfg.tie_embeddings):
            out[theirs if theirs in layout.unprefixed else layout.prefix + theirs] = sd[ours]
    groups = layout.qkv_groups(cfg)
    layer_names = layout.all_layer_names(cfg)
    fusions = layout.fusions(cfg)
    hd = cfg.head_dim
    for i in range(cfg.n_layers):
        base = layout.prefix + layout.layer.format(i=i)
        for ours, theirs in layer_names.items():
            t = sd.get(f"layers.{i}.{ours}")
            if t is None:
                continue
            if ours.startswith("attn.wqkv") and groups:
                t = group_qkv(t, groups, cfg)
            if layout.transposed and t.dim() == 2:
                t = t.t()
            out[base + theirs] = t.contiguous()
        for ours, parts in fusions.items():
            for p in ("weight", "bias"):
                fused = sd.get(f"layers.{i}.{ours}.{p}")
                if fused is None:
                    continue
                pieces = fused.split((cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd)) \
                    if ours == "attn.wqkv" else fused.chunk(len(parts))
                for part, t in zip(parts, pieces):
                    out[f"{base}{part}.{p}"] = t.contiguous()
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32")
    if cfg.n_experts and family(cfg.arch).hf.experts is None:
        raise CamelidError(f"a {cfg.arch} model with experts has no Hugging Face form")
    hf = dict(common, **family(cfg.arch).config_to_hf(cfg))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "dynamic":  # the length transformers scales from
        hf["max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return hf


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


def save_hf_folder(sd: dict, cfg: ModelConfig, folder: Path, extra_json: dict | None = None,
                   hf_tensors: dict | None = None):
    """`hf_tensors`: tensors already under transformers' names (a GPTQ checkpoint's), written in place of sd's."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors if hf_tensors is not None else state_dict_to_hf(sd, cfg)
    save_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    hf = config_to_hf(cfg)
    for name, data in (extra_json or {}).items():
        if name == "config.json":
            hf.update(data)
        else:
            _write_json(folder / name, data)
    _write_json(folder / "config.json", hf)


def _write_json(path: Path, data: dict):
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
