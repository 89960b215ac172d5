"""LoRA adapters in Hugging Face PEFT's layout: `adapter_config.json` and `adapter_model.safetensors` with
PEFT's key names (base_model.model.<HF module>.lora_A.weight), so PEFT loads camelid's adapters and camelid
loads PEFT's. Targets are the family's own modules: separate q/k/v (and gate/up) projections where its
checkpoints have them (LLaMA, Mistral, Qwen, Gemma, GPT-J, OPT), else the fused module as one target
(`qkv_proj`: Bloom's and NeoX's query_key_value, MPT's Wqkv, Phi-3's qkv_proj, GPT-2's c_attn; Phi-3's
`gate_up_proj`). Where the checkpoint groups a fused QKV by head, lora_B's rows are regrouped to match."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from camelid.errors import CamelidError
from camelid.families import family
from camelid.families.spec import group_qkv, ungroup_qkv
from camelid.files import output_folder, read_json
from camelid.model.lora import LoRAConfig, add_lora, lora_layers, model_targets, t5_targets

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def hf_module_names(cfg) -> dict[str, str]:
    """LoRA target name -> the Hugging Face module name inside a block (e.g. v_proj -> self_attn.v_proj)."""
    layout = family(cfg.arch).hf
    if layout.peft_module is not None:  # T5: its modules' own names, in both stacks
        return {t: t for t in t5_targets(cfg)}
    names = layout.layer_names(cfg)

    def module(ours: str) -> str:
        return names[ours].removesuffix(".weight")

    modules = {"o_proj": module("attn.wo.weight"), "down_proj": module("mlp.w_out.weight")}
    if layout.qkv:
        modules["q_proj"], modules["k_proj"], modules["v_proj"] = layout.qkv
    else:
        modules["qkv_proj"] = module("attn.wqkv.weight")
    if layout.gate_up:
        modules["gate_proj"], modules["up_proj"] = layout.gate_up
    elif cfg.gated_mlp:
        modules["gate_up_proj"] = module("mlp.w_in.weight")
    else:
        modules["up_proj"] = module("mlp.w_in.weight")
    return modules


def check_targets(cfg, targets: list[str]) -> None:
    """Targets this family's PEFT adapters can name, before anything trains."""
    modules = hf_module_names(cfg)
    for t in model_targets(cfg, targets):
        if t not in modules:
            raise CamelidError(f"LoRA target {t!r}: a {cfg.arch} checkpoint has no such module for a PEFT adapter "
                               f"(its targets: {', '.join(modules)})")


def _rows(cfg, target: str, b: torch.Tensor, to_hf: bool) -> torch.Tensor:
    """lora_B's rows in the checkpoint's order (to_hf) or camelid's: a fused QKV grouped per head moves."""
    groups = family(cfg.arch).hf.qkv_groups(cfg)
    if target != "qkv_proj" or not groups:
        return b
    return group_qkv(b, groups, cfg) if to_hf else ungroup_qkv(b, groups, cfg)


def _keys(model) -> dict[tuple[str, str], str]:
    """(camelid LoRA layer path, target) -> PEFT key stem."""
    cfg = model.cfg
    layout = family(cfg.arch).hf
    modules = hf_module_names(cfg)
    out = {}
    for path, layer in lora_layers(model).items():
        i = int(path.split(".")[1])
        for target in layer.slices:
            module = layout.peft_module(path, target) if layout.peft_module else \
                f"{layout.prefix}{layout.layer.format(i=i)}{modules[target]}"
            out[(path, target)] = _PREFIX + module
    return out


def save_adapter(model, folder: str | Path, base_model: str = "") -> Path:
    """Write the adapter; the folder appears whole (written under a temporary name, then renamed)."""
    cfg: LoRAConfig = model.lora_config
    check_targets(model.cfg, cfg.targets)
    layers = lora_layers(model)
    tensors = {}
    for (path, target), stem in _keys(model).items():
        tensors[f"{stem}.lora_A.weight"] = layers[path].lora_A[target].detach().cpu().contiguous()
        b = layers[path].lora_B[target].detach().cpu()
        tensors[f"{stem}.lora_B.weight"] = _rows(model.cfg, target, b, to_hf=True).contiguous()
    folder = Path(folder)
    with output_folder(folder, force=True) as tmp:  # a folder camelid did not write is still refused
        _write_adapter(model, cfg, tensors, tmp, base_model)
    return folder


def _write_adapter(model, cfg: LoRAConfig, tensors: dict, tmp: Path, base_model: str):
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    hf_names = hf_module_names(model.cfg)
    task = "SEQ_2_SEQ_LM" if model.cfg.n_encoder_layers else "CAUSAL_LM"
    config = {"peft_type": "LORA", "task_type": task, "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted({_module_key(hf_names, t) for t in cfg.targets}),
              # GPT-2's Conv1D stores its weights transposed, as PEFT marks it; lora_A/lora_B are as usual
              "bias": "none", "fan_in_fan_out": family(model.cfg.arch).hf.transposed, "inference_mode": True,
              "base_model_name_or_path": base_model}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2))


def _module_key(hf_names: dict[str, str], target: str) -> str:
    """How target_modules names a target: its module's last name, or its name in the block where another
    module shares that last name (GPT-2's attn.c_proj and mlp.c_proj), as PEFT matches either."""
    last = hf_names[target].split(".")[-1]
    shared = sum(m.split(".")[-1] == last for m in hf_names.values()) > 1
    return hf_names[target] if shared else last


def read_adapter_config(folder: str | Path, model_cfg=None) -> LoRAConfig:
    """The adapter's settings; with the base model's config, its target modules as that family names them."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CamelidError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)")
    raw = read_json(path)
    if raw.get("peft_type") != "LORA":
        raise CamelidError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    transposed = model_cfg is not None and family(model_cfg.arch).hf.transposed
    if raw.get("use_dora") or (raw.get("fan_in_fan_out") and not transposed):
        raise CamelidError(f"{path}: DoRA and fan_in_fan_out adapters are not supported")
    targets = _targets_from_modules(raw.get("target_modules"), path, model_cfg)
    try:
        return LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                          dropout=float(raw.get("lora_dropout", 0)), targets=targets)
    except KeyError as exc:
        raise CamelidError(f"{path}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError):
        raise CamelidError(f"{path}: r, lora_alpha and lora_dropout must be numbers") from None


def _targets_from_modules(modules, path, model_cfg=None) -> list[str]:
    names = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj", "out_proj": "o_proj",
             "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj", "fc1": "up_proj",
             "fc2": "down_proj", "fc_in": "up_proj", "fc_out": "down_proj"}
    many = {}
    if model_cfg is not None:  # the family's own module names (query_key_value, c_attn, Wqkv, ...), whole or last
        hf_names = hf_module_names(model_cfg)
        names = {module: target for target, module in hf_names.items()}
        for target, module in hf_names.items():
            many.setdefault(module.split(".")[-1], []).append(target)
    if isinstance(modules, str) or not modules:
        raise CamelidError(f"{path}: target_modules must be a list of module names")
    unknown = [m for m in modules if m not in names and m not in many]
    if unknown:
        raise CamelidError(f"{path}: LoRA target module {unknown[0]!r} is not one camelid can map")
    return list(dict.fromkeys(t for m in modules for t in ([names[m]] if m in names else many[m])))


def load_adapter(model, folder: str | Path):
    """Add the adapter in `folder` to `model` (unmerged: `merge_lora` folds it in)."""
    cfg = read_adapter_config(folder, model.cfg)
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
                if part == "lora_B" and t.shape == params[target].shape:
                    t = _rows(model.cfg, target, t, to_hf=False)
                if t.shape != params[target].shape:
                    raise CamelidError(f"{path}: {key} has shape {tuple(t.shape)}, this model needs "
                                       f"{tuple(params[target].shape)} (an adapter for a different base model)")
                params[target].copy_(t)
    if tensors:
        raise CamelidError(f"{path}: tensor {next(iter(tensors))} does not fit this model "
                           "(an adapter for a different base model)")
    return model
