"""LoRA against Hugging Face PEFT: adapters written by camelid load in PEFT (and the reverse) with the same
logits, merged weights equal PEFT's merge_and_unload, and bad adapters or targets are clear errors."""

import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats import hf as hf_format
from camelid.formats.load import build_model
from camelid.formats.peft import load_adapter, save_adapter
from camelid.model.lora import LoRAConfig, add_lora, lora_layers, merge_lora

from conftest import make_hf_model

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


def peft_adapter(hf, targets: list[str], alpha: int, folder):
    """PEFT's own rank-4 adapter on `targets` of a transformers model, its B matrices random, saved to `folder`."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                                task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(folder)
    return peft_model


# families whose checkpoints fuse q/k/v (and Phi-3 gate/up) into one module: PEFT targets it whole
FUSED = {"bloom": ["query_key_value", "dense_4h_to_h"], "gpt_neox": ["query_key_value", "dense"],
         "falcon-40b-style": ["query_key_value"], "mpt": ["Wqkv", "up_proj"], "phi3": ["qkv_proj", "gate_up_proj"],
         "gpt2": ["c_attn", "c_proj"], "starcoder": ["c_attn"]}


@pytest.mark.parametrize("name", list(FUSED))
def test_adapters_on_fused_modules_round_trip_through_peft(tmp_path, name):
    """Per-head-grouped QKV rows (Bloom, NeoX, Falcon) regrouped, GPT-2's Conv1D marked fan_in_fan_out: PEFT's
    adapter runs in camelid with PEFT's logits, and camelid's in PEFT."""
    from peft import PeftModel

    peft_model = peft_adapter(make_hf_model(name, tmp_path / "base"), FUSED[name], 8, tmp_path / "theirs")
    ours = load_adapter(camelid_model(tmp_path / "base"), tmp_path / "theirs").eval()
    with torch.no_grad():
        expected = peft_model.eval()(IDS).logits
        torch.testing.assert_close(ours(IDS), expected, atol=1e-4, rtol=0)
    save_adapter(ours, tmp_path / "ours", "tiny")
    again = PeftModel.from_pretrained(make_hf_model(name, tmp_path / "base2"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, expected, atol=1e-4, rtol=0)


def test_targets_a_family_checkpoint_cannot_name_are_refused_before_training(tmp_path):
    make_hf_model("bloom", tmp_path / "base")
    ours = camelid_model(tmp_path / "base")
    add_lora(ours, LoRAConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(CamelidError, match="'q_proj': a bloom checkpoint has no such module.*qkv_proj"):
        save_adapter(ours, tmp_path / "adapter")


def test_peft_adapter_loads_in_camelid(tmp_path):
    peft_model = peft_adapter(make_hf_model("llama", tmp_path / "base"), ["q_proj", "v_proj", "up_proj"], 16,
                              tmp_path / "adapter")
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
    with pytest.raises(CamelidError, match="qkv_proj already covers"):
        add_lora(camelid_model(tmp_path / "base"), LoRAConfig(targets=["qkv_proj", "v_proj"]))
    save_adapter(ours, tmp_path / "adapter")
    # The same adapter on a model of another width.
    wider = tf.LlamaConfig(hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, vocab_size=96)
    tf.LlamaForCausalLM(wider).save_pretrained(tmp_path / "other")
    with pytest.raises(CamelidError, match="an adapter for a different base model"):
        load_adapter(camelid_model(tmp_path / "other"), tmp_path / "adapter")
    with pytest.raises(CamelidError, match="no adapter_config.json"):
        load_adapter(camelid_model(tmp_path / "base"), tmp_path / "base")


def _quantized(kind, linear):
    from gguf import GGMLQuantizationType, quants

    from camelid.model.quant import GGMLLinear, Int4Linear, Int8Linear

    if kind == "int8":
        return Int8Linear.from_linear(linear)
    if kind == "int4":
        layer = Int4Linear.from_linear(linear, 32)
        layer.kernel_weight()  # as loading leaves it: in the CPU kernel's layout
        return layer
    blocks = quants.quantize(linear.weight.detach().numpy(), GGMLQuantizationType.Q8_0)
    layer = GGMLLinear(linear.in_features, linear.out_features, int(GGMLQuantizationType.Q8_0), blocks.shape[1])
    layer.blocks = torch.from_numpy(blocks)
    return layer


@pytest.mark.parametrize("kind", ["int8", "int4", "q8_0"])
def test_qlora_gradients_equal_lora_over_the_dequantized_weight(kind):
    """LoRA over a frozen quantized layer (QLoRA): the packed kernels have no backward of their own, so
    camelid's gives dx = dy W with W dequantized; the adapter's gradients must be those of LoRA over an
    ordinary Linear holding the same dequantized weight."""
    from camelid.model.lora import LoRALinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True)
    quantized = _quantized(kind, linear)
    reference = torch.nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        reference.weight.copy_(quantized.dequantize())
        reference.bias.copy_(linear.bias)
        quantized.bias = linear.bias.detach().clone()
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=["q_proj"])
    torch.manual_seed(1)
    ours = LoRALinear(quantized, {"q_proj": (0, 64)}, cfg)
    torch.manual_seed(1)
    theirs = LoRALinear(reference, {"q_proj": (0, 64)}, cfg)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.lora_B["q_proj"].copy_(torch.linspace(-0.5, 0.5, 64 * 4).view(64, 4))
    x = torch.randn(3, 5, 128).bfloat16().float()  # the CPU kernels round activations to bf16
    target = torch.randn(3, 5, 96)
    grads = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        torch.nn.functional.mse_loss(torch.tanh(layer(xi)) * 3, target).backward()
        grads.append([xi.grad, layer.lora_A["q_proj"].grad, layer.lora_B["q_proj"].grad])
    for got, want in zip(*grads):
        assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9999
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())


def test_merging_an_adapter_over_a_quantized_base_gives_a_float_layer():
    from camelid.model.lora import LoRALinear
    from camelid.model.quant import Int4Linear

    torch.manual_seed(0)
    base = Int4Linear.from_linear(torch.nn.Linear(128, 64), 32)
    layer = LoRALinear(base, {"q_proj": (0, 64)}, LoRAConfig(rank=2, alpha=4, dropout=0.0, targets=["q_proj"]))
    with torch.no_grad():
        layer.lora_B["q_proj"].normal_()
    x = torch.randn(4, 128).bfloat16().float()
    want = x @ (base.dequantize() + layer.delta()).T
    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    model.attn.proj = layer
    merge_lora(model)
    merged = model.attn.proj
    assert type(merged) is torch.nn.Linear and not merged.weight.requires_grad
    torch.testing.assert_close(merged(x), want + merged.bias, atol=1e-4, rtol=0)
