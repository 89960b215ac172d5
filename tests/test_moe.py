"""Mixtures of experts beyond logit parity (tests/test_hf_families.py and tests/test_gguf.py check those against
transformers and llama.cpp): decoding runs only the experts a token picks, quantization keeps the routers in
float, LoRA adapts the attention, and a config that cannot route is refused by key."""

import pytest
import torch
from torch import nn

from camelid.errors import CamelidError
from camelid.formats import hf as hf_format
from camelid.formats.load import build_model
from camelid.model.config import ModelConfig
from camelid.model.lora import LoRAConfig, add_lora
from camelid.model.quant import Int8Linear, quantize_model

from conftest import make_hf_model

IDS = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61]])


def _model(name, folder):
    make_hf_model(name, folder)
    cfg, sd = hf_format.load_hf_folder(folder)
    return build_model(cfg, sd, str(folder))


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_decoding_runs_only_the_picked_experts(name, tmp_path):
    model = _model(name, tmp_path)
    cfg = model.cfg
    calls = []
    for i, block in enumerate(model.layers):
        for e, expert in enumerate(getattr(block.mlp, "experts", [])):
            expert.register_forward_hook(lambda m, a, out, i=i, e=e: calls.append((i, e, a[0].shape[0])))
    cache = model.new_kv_cache(1, IDS.shape[1])
    with torch.no_grad():
        model(IDS[:, :-1], 0, cache)
        calls.clear()
        model(IDS[:, -1:], IDS.shape[1] - 1, cache)
    moe_layers = [i for i in range(cfg.n_layers) if cfg.moe(i)]
    assert cfg.n_experts > cfg.n_experts_used
    for i in moe_layers:
        assert len({e for layer, e, _ in calls if layer == i}) == cfg.n_experts_used
    assert all(rows == 1 for _, _, rows in calls)
    assert not any(layer not in moe_layers for layer, _, _ in calls)  # Qwen2-MoE's dense block has no experts


def test_int8_quantization_keeps_routers_in_float(tmp_path):
    model = _model("mixtral", tmp_path)
    with torch.no_grad():
        want = model(IDS)
    quantize_model(model, "int8")
    mlp = model.layers[0].mlp
    assert type(mlp.router) is nn.Linear and isinstance(mlp.experts[0].w_in, Int8Linear)
    with torch.no_grad():
        got = model(IDS)
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.999


def test_lora_adapts_the_attention_of_a_mixture_of_experts(tmp_path):
    model = _model("mixtral", tmp_path)
    add_lora(model, LoRAConfig(targets=["q_proj", "v_proj"], rank=4, alpha=8))
    model(IDS).sum().backward()
    assert model.layers[0].attn.wqkv.lora_A["q_proj"].grad is not None
    other = _model("mixtral", tmp_path / "again")
    with pytest.raises(CamelidError, match="attention of a mixture-of-experts model"):
        add_lora(other, LoRAConfig(targets=["down_proj"], rank=4, alpha=8))


@pytest.mark.parametrize("fields, key", [(dict(n_experts=4, n_experts_used=5), "n_experts_used"),
                                         (dict(n_experts=4, n_experts_used=0), "n_experts_used"),
                                         (dict(n_experts=4, n_experts_used=2, expert_ffn_dim=0), "expert_ffn_dim"),
                                         (dict(n_experts=4, n_experts_used=2, dense_layers=[9]), "dense_layers")])
def test_configs_that_cannot_route_are_refused_by_key(fields, key):
    with pytest.raises(CamelidError, match=key):
        ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=96, vocab_size=96, **fields)
