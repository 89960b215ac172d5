"""LoRA adapters in Hugging Face PEFT's layout: `adapter_config.json` and `adapter_model.safetensors` with
PEFT's key names (base_model.model.<HF module>.lora_A.weight), so PEFT loads camelid's adapters and camelid
loads PEFT's. Available for the families whose Hugging Face layout has separate q/k/v (and gate/up)
projections: LLaMA (Alpaca, Vicuna, ...), Mistral, GPT-J and OPT."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from camelid.errors import CamelidError
from camelid.families import FAMILIES, family
from camelid.files import output_folder, read_json
from camelid.model.lora import LoRAConfig, add_lora, lora_layers

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def hf_module_names(cfg) -> dict[str, str]:
    """LoRA target name -> the Hugging Face module name inside a block (e.g. v_proj -> self_attn.v_proj)."""
    layout = family(cfg.arch).hf
    if not layout.qkv:
        adaptable = ", ".join(name for name, f in FAMILIES.items() if f.hf.qkv)
        raise CamelidError(f"PEFT adapters are supported for {adaptable} models, not {cfg.arch}")
    names = layout.layer_names(cfg)
    q, k, v = layout.qkv
    modules = {"q_proj": q, "k_proj": k, "v_proj": v, "o_proj": names["attn.wo.weight"].removesuffix(".weight"),
               "down_proj": names["mlp.w_out.weight"].removesuffix(".weight")}
    if layout.gate_up:
        modules["gate_proj"], modules["up_proj"] = layout.gate_up
    else:
        modules["up_proj"] = names["mlp.w_in.weight"].removesuffix(".weight")
    return modules


def _keys(model) -> dict[tuple[str, str], str]:
    """(camelid LoRA layer path, target) -> PEFT key stem."""
    cfg = model.cfg
    layout = family(cfg.arch).hf
    modules = hf_module_names(cfg)
    out = {}
    for path, layer in lora_layers(model).items():
        i = int(path.split(".")[1])
        for target in layer.slices:
            out[(path, target)] = f"{_PREFIX}{layout.prefix}{layout.layer.format(i=i)}{modules[target]}"
    return out


def save_adapter(model, folder: str | Path, base_model: str = "") -> Path:
    """Write the adapter; the folder appears whole (written under a temporary name, then renamed)."""
    cfg: LoRAConfig = model.lora_config
    layers = lora_layers(model)
    tensors = {}
    for (path, target), stem in _keys(model).items():
        tensors[f"{stem}.lora_A.weight"] = layers[path].lora_A[target].detach().cpu().contiguous()
        tensors[f"{stem}.lora_B.weight"] = layers[path].lora_B[target].detach().cpu().contiguous()
    folder = Path(folder)
    with output_folder(folder, force=True) as tmp:  # a folder camelid did not write is still refused
        _write_adapter(model, cfg, tensors, tmp, base_model)
    return folder


def _write_adapter(model, cfg: LoRAConfig, tensors: dict, tmp: Path, base_model: str):
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    hf_names = hf_module_names(model.cfg)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted({hf_names[t].split(".")[-1] for t in cfg.targets}),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2))


def read_adapter_config(folder: str | Path) -> LoRAConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CamelidError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)")
    raw = read_json(path)
    if raw.get("peft_type") != "LORA":
        raise CamelidError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    if raw.get("use_dora") or raw.get("fan_in_fan_out"):
        raise CamelidError(f"{path}: DoRA and fan_in_fan_out adapters are not supported")
    targets = _targets_from_modules(raw.get("target_modules"), path)
    try:
        return LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                          dropout=float(raw.get("lora_dropout", 0)), targets=targets)
    except KeyError as exc:
        raise CamelidError(f"{path}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError):
        raise CamelidError(f"{path}: r, lora_alpha and lora_dropout must be numbers") from None


def _targets_from_modules(modules, path) -> list[str]:
    names = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj", "out_proj": "o_proj",
             "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj", "fc1": "up_proj",
             "fc2": "down_proj", "fc_in": "up_proj", "fc_out": "down_proj"}
    if isinstance(modules, str) or not modules:
        raise CamelidError(f"{path}: target_modules must be a list of module names")
    unknown = [m for m in modules if m not in names]
    if unknown:
        raise CamelidError(f"{path}: LoRA target module {unknown[0]!r} is not one camelid can map")
    return [names[m] for m in modules]


def load_adapter(model, folder: str | Path):
    """Add the adapter in `folder` to `model` (unmerged: `merge_lora` folds it in)."""
    cfg = read_adapter_config(folder)
    add_lora(model, cfg)
    path = Path(folder) / WEIGHTS
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CamelidError(f"{folder}: no {WEIGHTS}") from None
    except Exception as exc:
        raise CamelidError(f"{path}: cannot be read as safetensors ({str(exc).splitlines()[0]})") from None
    layers = lora_layers(model)
    with torch.no_grad():
        for (layer_path, target), stem in _keys(model).items():
            for part, params in (("lora_A", layers[layer_path].lora_A), ("lora_B", layers[layer_path].lora_B)):
                key = f"{stem}.{part}.weight"
                if key not in tensors:
                    raise CamelidError(f"{path}: no tensor {key} (an adapter for a different base model?)")
                t = tensors.pop(key)
                if t.shape != params[target].shape:
                    raise CamelidError(f"{path}: {key} has shape {tuple(t.shape)}, this model needs "
                                       f"{tuple(params[target].shape)} (an adapter for a different base model)")
                params[target].copy_(t)
    if tensors:
        raise CamelidError(f"{path}: tensor {next(iter(tensors))} does not fit this model "
                           "(an adapter for a different base model)")
    return model
