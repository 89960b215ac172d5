"""GPTQ and AWQ checkpoints made by the reference tools' own code: AutoGPTQ 0.7.1's GPTQ (act-order and static
groups included) packed by its QuantLinear, and AutoAWQ 0.2.9's GEMM packing (`make test` downloads both and
keeps the few PyTorch-only files used here in .cache/quant-ref; their packages pull CUDA builds of torch).
camelid's layers hold exactly the weights the reference layers compute with, and its logits are the reference
model's (transformers' LLaMA with the reference quantized layers in place), within the bf16 activations camelid's
int4 kernel runs on."""

import importlib
import json
import sys
import types
from unittest import mock

import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats.load import load_model, plain_state_dict
from camelid.model.quant import Int4Linear

from conftest import REPO

REF = REPO / ".cache" / "quant-ref"
IDS = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 9]])
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def ref():
    if not (REF / ".done").exists():
        pytest.skip(f"{REF} not found (make test downloads AutoGPTQ's and AutoAWQ's code there)")
    sys.path.insert(0, str(REF))
    # gemm.py's two helpers outside the files kept: an extension probe and a device pick (the CPU here)
    sys.modules.setdefault("awq.utils.module", types.SimpleNamespace(try_import=lambda name: (None, "")))
    sys.modules.setdefault("awq.utils.utils", types.SimpleNamespace(get_best_device=lambda: "cpu"))
    try:
        return types.SimpleNamespace(
            GPTQ=importlib.import_module("auto_gptq.quantization.gptq").GPTQ,
            QuantLinear=importlib.import_module("auto_gptq.nn_modules.qlinear.qlinear_cuda").QuantLinear,
            WQLinear_GEMM=importlib.import_module("awq.modules.linear.gemm").WQLinear_GEMM)
    finally:
        sys.path.remove(str(REF))


def _tiny_llama(seed=0):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def _gptq_layer(ref, linear, bits, group, desc_act, static_groups=False):
    """AutoGPTQ's own GPTQ on random calibration inputs, packed by its QuantLinear."""
    gptq = ref.GPTQ(linear)
    gptq.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
    x = torch.randn(256, linear.in_features, generator=torch.Generator().manual_seed(1))
    gptq.add_batch(x, linear(x))
    with mock.patch("torch.cuda.synchronize", lambda *args: None):  # it times itself on a GPU
        scale, zero, g_idx = gptq.fasterquant(blocksize=128, percdamp=0.01, group_size=group, actorder=desc_act,
                                              static_groups=static_groups)
    layer = ref.QuantLinear(bits, group, linear.in_features, linear.out_features, linear.bias is not None)
    layer.pack(linear, scale, zero, g_idx)
    return layer


def _awq_layer(ref, linear, group):
    """AutoAWQ's GEMM packing of round-to-nearest 4-bit groups (the scales and zeros AWQ's search would
    refine; the layout is what matters here)."""
    w = linear.weight.detach().reshape(-1, group)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-5)
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    n = linear.out_features
    return ref.WQLinear_GEMM.from_linear(linear, 4, group, scales=scales.reshape(n, -1).t().half().float(),
                                         zeros=zeros.reshape(n, -1).t().contiguous())


def _quantized_folder(ref, folder, make_layer, config: dict | None, filename: str):
    """A tiny LLaMA with every projection replaced by the reference's quantized layer: the reference model,
    and its checkpoint written as the tool writes it."""
    model = _tiny_llama()
    for block in model.model.layers:
        for name in PROJ:
            parent, attr = name.split(".")
            owner = getattr(block, parent)
            setattr(owner, attr, make_layer(getattr(owner, attr)))
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / filename)
    model.config.save_pretrained(folder)
    if config is not None:
        (folder / "quantize_config.json").write_text(json.dumps(config))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(96)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<1>", eos_token="<2>").save_pretrained(folder)
    return model


def _reference_weight(layer, in_features):
    """The weight a reference layer computes with: AutoGPTQ's forward on the identity, in fp32; AutoAWQ's own
    dequantization (its forward runs in fp16)."""
    with torch.no_grad():
        if hasattr(layer, "w_bit"):
            dequantize = sys.modules["awq.utils.packing_utils"].dequantize_gemm
            return dequantize(layer.qweight, layer.qzeros, layer.scales.float(), layer.w_bit, layer.group_size).t()
        layer = layer.float()
        bias = layer.bias if getattr(layer, "bias", None) is not None else 0
        return (layer(torch.eye(in_features)) - bias).t()


GPTQ_CASES = {  # name: (bits, group, desc_act, static_groups, on the int4 kernel)
    "4bit-32g": (4, 32, False, False, True),
    "4bit-128g-act-order-static": (4, 64, True, True, True),
    "4bit-64g-act-order": (4, 64, True, False, True),  # its inputs sorted by group
    "3bit-64g": (3, 64, False, False, False),
    "2bit-32g": (2, 32, False, False, False),
    "8bit-per-row": (8, -1, False, False, False),
}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_checkpoints_give_the_reference_weights_and_logits(ref, case, tmp_path):
    bits, group, desc_act, static, kernel = GPTQ_CASES[case]
    made = {}

    def make(linear):
        layer = _gptq_layer(ref, linear, bits, group, desc_act, static)
        made[id(layer)] = linear.in_features
        return layer

    config = {"bits": bits, "group_size": group, "desc_act": desc_act, "sym": False, "static_groups": static,
              "checkpoint_format": "gptq", "quant_method": "gptq"}
    reference = _quantized_folder(ref, tmp_path / "m", make, config, f"gptq_model-{bits}bit-{group}g.safetensors")
    lm = load_model(tmp_path / "m")
    assert ("int4 kernel" in lm.load_note) and (("dequantized to float" in lm.load_note) != kernel), lm.load_note
    layers = dict(lm.model.named_modules())
    assert isinstance(layers["layers.0.attn.wo"], Int4Linear) == kernel
    ours = plain_state_dict(lm)
    q = _reference_weight(reference.model.layers[1].self_attn.o_proj, 128)
    torch.testing.assert_close(ours["layers.1.attn.wo.weight"].float(), q, atol=1e-3, rtol=1e-3)
    gate = _reference_weight(reference.model.layers[0].mlp.gate_proj, 128)
    up = _reference_weight(reference.model.layers[0].mlp.up_proj, 128)
    torch.testing.assert_close(ours["layers.0.mlp.w_in.weight"].float(), torch.cat([gate, up]), atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        want = reference.float()(IDS).logits[0]
    got = lm.model(IDS)[0]
    torch.testing.assert_close(got, want, atol=0.05 if kernel else 2e-3, rtol=0)
    if desc_act and not static:  # q/k/v and gate/up share their input, so its order: fused, still on the kernel
        assert isinstance(layers["layers.0.attn.wqkv"], Int4Linear) and layers["layers.0.attn.wqkv"].in_perm is not None
        from camelid.formats.load import export_gptq

        for layer in lm.model.modules():  # GPTQ's layout keeps fp16 scales (these layers were packed in fp32)
            if isinstance(layer, Int4Linear):
                scales, zeros = layer.scales_zeros.unbind(-1)
                fp16 = scales.half().float()
                layer.scales_zeros = torch.stack((fp16, fp16 * (8 - (8 - zeros / scales).round())), -1)
        ours = plain_state_dict(lm)
        export_gptq(lm, tmp_path / "again", group)  # written back with its g_idx, read back the same
        assert json.loads((tmp_path / "again" / "quantize_config.json").read_text())["desc_act"]
        again = plain_state_dict(load_model(tmp_path / "again"))
        for name in ("layers.1.attn.wo.weight", "layers.0.mlp.w_in.weight", "layers.0.attn.wqkv.weight"):
            torch.testing.assert_close(again[name].float(), ours[name].float(), atol=1e-6, rtol=0)


def test_gptq_for_llama_files_without_a_config_and_awq_gemm(ref, tmp_path):
    """GPTQ-for-LLaMa's .pt (no quantize_config: bits and groups read from the tensors) and AutoAWQ's GEMM layout
    (quantization_config in config.json)."""
    reference = _quantized_folder(ref, tmp_path / "old", lambda lin: _gptq_layer(ref, lin, 4, 128, False), None,
                                  "llama-7b-4bit-128g.safetensors")
    pt = tmp_path / "old" / "llama-7b-4bit-128g.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(pt), tmp_path / "old" / "llama-7b-4bit-128g.pt")
    pt.unlink()
    with torch.no_grad():
        want = reference.float()(IDS).logits[0]
    torch.testing.assert_close(load_model(tmp_path / "old").model(IDS)[0], want, atol=0.05, rtol=0)

    reference = _quantized_folder(ref, tmp_path / "awq", lambda lin: _awq_layer(ref, lin, 32), None,
                                  "model.safetensors")
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                  "version": "gemm"}
    (tmp_path / "awq" / "config.json").write_text(json.dumps(cfg))
    lm = load_model(tmp_path / "awq")
    assert isinstance(dict(lm.model.named_modules())["layers.0.mlp.w_out"], Int4Linear)
    ours = plain_state_dict(lm)
    torch.testing.assert_close(ours["layers.1.attn.wo.weight"].float(),
                               _reference_weight(reference.model.layers[1].self_attn.o_proj, 128), atol=1e-3,
                               rtol=1e-3)
    with torch.no_grad():
        want = reference(IDS).logits[0].float()  # AutoAWQ's layers in fp16, the rest in fp32
    torch.testing.assert_close(lm.model(IDS)[0], want, atol=0.05, rtol=0)


def test_bad_gptq_checkpoints_are_named(ref, tmp_path):
    _quantized_folder(ref, tmp_path / "m", lambda lin: _gptq_layer(ref, lin, 4, 32, False),
                      {"bits": 4, "group_size": 32}, "model.safetensors")
    config = tmp_path / "m" / "quantize_config.json"
    for bad, message in (({"bits": 5, "group_size": 32}, "bits=5 is not supported for gptq"),
                         ({"bits": 4, "group_size": 64}, "groups of scales, but group_size=64"),
                         ({"bits": 4, "group_size": "x"}, "group_size='x' must be a positive integer"),
                         ({"bits": 4, "group_size": 32, "quant_method": "exl2"}, "quant_method 'exl2'")):
        config.write_text(json.dumps(bad))
        with pytest.raises(CamelidError, match=message):
            load_model(tmp_path / "m")
    config.write_text(json.dumps({"bits": 4, "group_size": 32}))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.qzeros"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CamelidError, match=r"model.layers.0.self_attn.q_proj.'qzeros' is missing"):
        load_model(tmp_path / "m")


def test_camelid_gptq_writes_gptqmodels_layout(ref, tmp_path):
    """`quantize --method gptq --format gptq`: GPTQ's zero points and fp16 scales, q/k/v and gate/up split back
    into transformers' modules; AutoGPTQ's QuantLinear loads each layer and computes camelid's weights, and
    transformers' LLaMA with those layers gives camelid's logits."""
    from safetensors.torch import load_file

    from camelid.cli import main
    from camelid.quantize import quantize_folder

    _quantized_folder(ref, tmp_path / "float", lambda lin: lin, None, "model.safetensors")
    words = torch.randint(3, 96, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "calib.txt").write_text(" ".join(f"<{w}>" for w in words))
    out = tmp_path / "gptq"
    assert main(["quantize", str(tmp_path / "float"), str(out), "--format", "gptq"]) == 1  # RTN has no such layout
    quantized = load_model(tmp_path / "float")
    quantize_folder(quantized, out, layout="gptq", mode="int4", method="gptq", group=32,
                    calibration=[str(tmp_path / "calib.txt")], samples=16, seq_len=48)
    made = plain_state_dict(quantized)  # the layers as camelid's GPTQ made them, before they were written
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["checkpoint_format"]) == \
        ("gptq", 4, 32, "gptq")
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.k_proj.qweight" in tensors and "model.layers.0.self_attn.k_proj.weight" \
        not in tensors and tensors["lm_head.weight"].dtype == torch.float16

    reference = _tiny_llama()
    for i, block in enumerate(reference.model.layers):
        for name in PROJ:
            parent, attr = name.split(".")
            owner = getattr(block, parent)
            linear = getattr(owner, attr)
            layer = ref.QuantLinear(4, 32, linear.in_features, linear.out_features, False)
            layer.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                                   if k.startswith(f"model.layers.{i}.{name}.")})
            setattr(owner, attr, layer)
    reference.load_state_dict({k: v for k, v in tensors.items() if k.endswith(("norm.weight", "embed_tokens.weight",
                                                                                 "lm_head.weight"))}, strict=False)
    lm = load_model(out)
    ours = plain_state_dict(lm)
    q, k, v = (_reference_weight(getattr(reference.model.layers[1].self_attn, p), 128)
               for p in ("q_proj", "k_proj", "v_proj"))
    torch.testing.assert_close(ours["layers.1.attn.wqkv.weight"].float(), torch.cat([q, k, v]), atol=1e-6, rtol=0)
    int4 = {f"{n}.weight" for n, m in quantized.model.named_modules() if isinstance(m, Int4Linear)}
    assert len(int4) == 2 * 4  # each block's q/k/v, o, gate/up and down
    for name, weight in made.items():  # the int4 layers exactly, the rest as fp16 holds them
        torch.testing.assert_close(ours[name].float(), weight.float(), atol=1e-6 if name in int4 else 1e-3,
                                   rtol=0 if name in int4 else 1e-3)
    with torch.no_grad():
        want = reference.float()(IDS).logits[0]
    torch.testing.assert_close(lm.model(IDS)[0], want, atol=0.05, rtol=0)
