"""LoRA against Hugging Face PEFT: adapters written by camelid load in PEFT (and the reverse) with the same
logits, merged weights equal PEFT's merge_and_unload, and bad adapters or targets are clear errors."""

import pytest
import torch
from conftest import make_hf_model

from camelid.errors import CamelidError
from camelid.formats import hf as hf_format
from camelid.formats.load import build_model
from camelid.formats.peft import load_adapter, save_adapter
from camelid.model.lora import LoRAConfig, add_lora, lora_layers, merge_lora

IDS = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 9]])


def camelid_model(folder):
    cfg, sd = hf_format.load_hf_folder(folder)
    return build_model(cfg, sd, str(folder))


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]])
def test_camelid_adapter_loads_in_peft_with_the_same_logits(tmp_path, targets):
    from peft import PeftModel

    hf = make_hf_model("llama", tmp_path / "base")
    ours = camelid_model(tmp_path / "base")
    add_lora(ours, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=targets))
    randomize(ours)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    save_adapter(ours, tmp_path / "adapter", "tiny-llama")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    ours.eval()
    with torch.no_grad():
        expected = peft_model(IDS).logits
        torch.testing.assert_close(ours(IDS), expected, atol=1e-4, rtol=0)
        merged_peft = peft_model.merge_and_unload()(IDS).logits
        merge_lora(ours)
        assert not lora_layers(ours)
        torch.testing.assert_close(ours(IDS), merged_peft, atol=1e-4, rtol=0)


def test_peft_adapter_loads_in_camelid(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = make_hf_model("llama", tmp_path / "base")
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(camelid_model(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), peft_model.eval()(IDS).logits, atol=1e-4, rtol=0)


def test_only_lora_weights_train_and_bad_adapters_are_refused(tmp_path):
    import transformers as tf

    make_hf_model("llama", tmp_path / "base")
    ours = camelid_model(tmp_path / "base")
    add_lora(ours, LoRAConfig(rank=2, targets=["v_proj"]))
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n and "wqkv" in n for n in names)
    with pytest.raises(CamelidError, match="LoRA target module 'qkv' does not exist"):
        add_lora(camelid_model(tmp_path / "base"), LoRAConfig(targets=["qkv"]))
    save_adapter(ours, tmp_path / "adapter")
    # The same adapter on a model of another width.
    wider = tf.LlamaConfig(hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, vocab_size=96)
    tf.LlamaForCausalLM(wider).save_pretrained(tmp_path / "other")
    with pytest.raises(CamelidError, match="an adapter for a different base model"):
        load_adapter(camelid_model(tmp_path / "other"), tmp_path / "adapter")
    with pytest.raises(CamelidError, match="no adapter_config.json"):
        load_adapter(camelid_model(tmp_path / "base"), tmp_path / "base")
