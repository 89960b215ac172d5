"""camelid quantize: int8/int4 layers against their own dequantized weights, saved folders, GPTQ vs RTN."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from camelid.errors import CamelidError
from camelid.formats.load import load_model
from camelid.model.quant import Int4Linear, Int8Linear, pack_int4, quantize_int4
from camelid.quantize import calibration_batches, quantize

from conftest import run_main

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "models" / "stories260K"
SHAKESPEARE = REPO.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel_equals_its_dequantized_weight_and_round_trips(group):
    torch.manual_seed(0)
    lin = nn.Linear(256, 48, bias=True)
    layer = Int4Linear.from_linear(lin, group)
    x = torch.randn(7, 256)
    deq = layer.dequantize()
    assert (deq - lin.weight).abs().max() <= (lin.weight.max() - lin.weight.min()) / 15
    y = layer(x)  # repacks for the CPU kernel, which takes bf16 activations
    assert layer.cpu_layout and torch.allclose(y, x.bfloat16().float() @ deq.T + lin.bias, atol=2e-2)
    assert not torch.allclose(y, x @ (deq + 0.01).T + lin.bias, atol=2e-2)
    q, _, _ = quantize_int4(lin.weight.detach(), group)
    assert torch.equal(layer.state_dict()["weight"], pack_int4(q))  # saved in the portable layout
    again = Int4Linear(256, 48, group, bias=True)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(x), y)


def test_int8_kernel_equals_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 96)
    assert torch.allclose(layer(x), x.bfloat16().float() @ layer.dequantize().T, atol=2e-2)
    assert not torch.allclose(layer(x), x @ (layer.dequantize() + 0.01).T, atol=2e-2)
    assert (layer.dequantize() - lin.weight).abs().max() <= lin.weight.abs().max() / 127 / 2 + 1e-7


def test_int8_kernel_takes_bf16_rows_of_any_length():
    """torch's bf16 int8 kernel reads past rows whose length is not a multiple of 16 (QLoRA in bf16 crashed on
    stories260K's FFN of 172): such rows go in fp32, whatever dtype they come in."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(172, 40, bias=False))
    x = torch.randn(5, 172).bfloat16()
    got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), x.float() @ layer.dequantize().T, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_folder_loads_with_the_same_logits(tmp_path, mode):
    lm = load_model(STORIES)
    tokens = torch.tensor([[1, 403, 407, 261, 378, 434, 260, 395]])
    ref = lm.model(tokens)
    info = quantize(lm, mode)
    assert info["layers"]["int4" if mode == "int4" else "int8"] > 0
    out = run_main("quantize", STORIES, tmp_path / "q", "--mode", mode)
    assert out.returncode == 0, out.stderr
    loaded = load_model(tmp_path / "q")
    assert loaded.quantization["mode"] == mode
    assert torch.equal(loaded.model(tokens), lm.model(tokens))
    got = loaded.model(tokens)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > (0.999 if mode == "int8" else 0.98)
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert size < 0.5 * (STORIES / "model.safetensors").stat().st_size
    text = run_main("generate", tmp_path / "q", "--temperature", "0", "-n", "20", "")
    assert text.returncode == 0 and text.stdout.startswith("Once upon a time"), text.stderr


def _kl_to_float(base, lm, batches):
    total = 0.0
    for b in batches:
        p = torch.log_softmax(base.model(b), -1)
        q = torch.log_softmax(lm.model(b), -1)
        total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(batches)


@pytest.mark.parametrize("output", ["int8", "int4"])
def test_gptq_loses_less_than_round_to_nearest(tmp_path, output):
    text = SHAKESPEARE.read_text()
    (tmp_path / "calib.txt").write_text(text[:60_000])
    (tmp_path / "held.txt").write_text(text[-60_000:])
    base = load_model(STORIES)
    held = calibration_batches(base, [str(tmp_path / "held.txt")], 12, 128, seed=1)
    rtn, gptq = load_model(STORIES), load_model(STORIES)
    quantize(rtn, "int4", 32, output=output)
    quantize(gptq, "int4", 32, "gptq", [str(tmp_path / "calib.txt")], samples=24, seq_len=128, output=output)
    for lm in (rtn, gptq):
        assert isinstance(lm.model.output, Int8Linear if output == "int8" else Int4Linear)
        assert isinstance(lm.model.layers[0].attn.wqkv, Int4Linear)
    kl_rtn, kl_gptq = _kl_to_float(base, rtn, held), _kl_to_float(base, gptq, held)
    assert kl_gptq < 0.75 * kl_rtn, (kl_gptq, kl_rtn)


def test_an_int8_output_layer_loses_less_than_an_int4_one(tmp_path):
    """The default under int4 (as llama.cpp's 4-bit files keep the output layer at Q6_K)."""
    base = load_model(STORIES)
    text = SHAKESPEARE.read_text()
    (tmp_path / "held.txt").write_text(text[-60_000:])
    held = calibration_batches(base, [str(tmp_path / "held.txt")], 12, 128, seed=1)
    kl = {}
    for output in ("int8", "int4"):
        lm = load_model(STORIES)
        info = quantize(lm, "int4", 32, output=output)
        assert info["output"] == output
        kl[output] = _kl_to_float(base, lm, held)
    assert kl["int8"] < kl["int4"], kl


@pytest.mark.parametrize("args,message", [
    (["--method", "gptq"], "--method gptq needs --calibration"),
    (["--mode", "int8", "--method", "gptq", "--calibration", "x.txt"], "--method gptq quantizes to int4"),
    (["--group-size", "48"], "--group-size 48: use one of 32, 64, 128, 256"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--mode", "int8", "--output-mode", "int4"], "--output-mode: an int4 output layer needs --mode int4"),
])
def test_bad_quantize_input_is_one_line(tmp_path, args, message):
    out = run_main("quantize", STORIES, tmp_path / "q", *args)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "q").exists()


def test_a_quantized_model_is_not_quantized_again(tmp_path):
    lm = load_model(STORIES)
    quantize(lm, "int8")
    with pytest.raises(CamelidError, match="already quantized"):
        quantize(lm, "int4")


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "llama3-tied"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_while_loading_equals_quantizing_after(tmp_path, family, mode):
    """QLoRA's load: each tensor (fused q/k/v and gate/up included) is quantized as it is taken."""
    from camelid.model.quant import QuantSpec, quantize_model

    from conftest import make_hf_model

    make_hf_model(family, tmp_path)
    _word_tokenizer(tmp_path)
    after = load_model(tmp_path, "cpu", "fp32").model
    counts = quantize_model(after, mode, 32, "int8")
    during = load_model(tmp_path, "cpu", "fp32", quantize=QuantSpec(mode, 32, "int8")).model
    kinds = [type(m).__name__ for m in during.modules()]
    assert kinds.count("Int4Linear") == counts["int4"] and kinds.count("Int8Linear") == counts["int8"] - (
        family == "llama3-tied")  # a tied output layer is the embedding table: it stays float while loading
    ids = torch.tensor([[1, 40, 30, 22, 9, 87, 20, 13]])
    if family != "llama3-tied":
        expected, got = after.state_dict(), during.state_dict()
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
        assert torch.equal(during(ids), after(ids))
    bf16 = load_model(tmp_path, "cpu", "bf16", quantize=QuantSpec(mode, 32, "float")).model
    assert bf16.output.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16(ids).float(), during(ids), atol=0.15, rtol=0.05)


def test_quantizing_while_loading_never_holds_the_float_model(tmp_path):
    """A 200 MB fp32 checkpoint loaded in bf16, as int4 (25 MB) or as a bf16 copy (100 MB), grows memory by well
    under the file: memory-mapped pages are let go once converted."""
    import transformers as tf

    from conftest import make_hf_model

    folder = tmp_path / "wide"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                       num_attention_heads=8, vocab_size=256)).save_pretrained(folder)
    _word_tokenizer(folder)
    size = (folder / "model.safetensors").stat().st_size
    make_hf_model("llama", tmp_path / "tiny")  # loaded first, so what loading imports is not counted
    _word_tokenizer(tmp_path / "tiny")
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's, this test process's own peak
    script = f"""
import torch
from camelid.formats.load import load_model
from camelid.model.quant import QuantSpec
def status(key): return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
load_model({str(tmp_path / "tiny")!r}, "cpu", "{{dtype}}", quantize={{spec}})
before = status("VmRSS:")
lm = load_model({str(folder)!r}, "cpu", "{{dtype}}", quantize={{spec}})
print(status("VmHWM:") - before)
"""
    grown = {}
    for dtype, spec in (("bf16", "QuantSpec('int4', 64, 'float')"), ("bf16", "None")):
        run = subprocess.run([sys.executable, "-c", script.format(dtype=dtype, spec=spec)], capture_output=True,
                             text=True, cwd=REPO)
        assert run.returncode == 0, run.stderr[-2000:]
        grown[spec] = int(run.stdout.split()[-1])
    # Measured 70-160 MB for int4 and 120-145 MB for bf16, by the state of the page cache (a fault maps a whole
    # large folio of the file ahead of the tensor being converted); 270 and 320 MB without letting pages go.
    int4, bf16 = grown["QuantSpec('int4', 64, 'float')"], grown["None"]
    assert bf16 < 0.9 * size and int4 < 0.85 * size, grown


def test_quantizing_while_loading_names_a_tensor_of_the_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    from camelid.model.quant import QuantSpec

    from conftest import make_hf_model

    make_hf_model("llama", tmp_path)
    _word_tokenizer(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-32].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CamelidError, match=r"tensor 'layers.1.mlp.w_in.weight' has shape \(160, 64\), "
                                           r"the config needs \(192, 64\)"):
        load_model(tmp_path, "cpu", "fp32", quantize=QuantSpec("int4", 32))


def _word_tokenizer(folder):
    """The folder's models are random: any tokenizer that loads will do."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))


def test_a_partial_state_dict_load_keeps_packed_weights():
    """Loading a LoRA checkpoint (adapter tensors only) into a QLoRA model must not touch the int4 layout."""
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(nn.Linear(64, 32), 32)
    layer.kernel_weight()
    x = torch.randn(3, 64)
    before = layer(x)
    missing = nn.Sequential(layer).load_state_dict({}, strict=False).missing_keys
    assert missing and torch.equal(layer(x), before)


def test_cli_quantizes_an_untied_checkpoint_while_loading(tmp_path):
    """`camelid quantize` (round-to-nearest, output layer not tied) quantizes as it loads: the same folder as
    quantizing the loaded float model, and the same one-line errors."""
    from conftest import make_hf_model

    make_hf_model("llama", tmp_path / "hf")
    _word_tokenizer(tmp_path / "hf")
    cli = ["quantize", tmp_path / "hf"]
    done = run_main(*cli, tmp_path / "q", "--mode", "int4")
    assert done.returncode == 0, done.stderr
    assert "quantized 3 int8, 6 int4 layers (rtn)" in done.stdout  # w_out (96 inputs) cannot take int4
    lm = load_model(tmp_path / "hf")
    expected = quantize(lm, "int4")
    loaded = load_model(tmp_path / "q")
    assert loaded.quantization == expected
    ids = torch.tensor([[1, 40, 30, 22, 9, 87, 20, 13]])
    assert torch.equal(loaded.model(ids), lm.model(ids))
    bad = run_main(*cli, tmp_path / "b", "--group-size", "48")
    assert bad.returncode != 0 and bad.stderr.strip().endswith("--group-size 48: use one of 32, 64, 128, 256")
    again = run_main(*cli[:-1], tmp_path / "q", tmp_path / "qq")
    assert again.returncode != 0 and "already quantized (int4)" in again.stderr and "Traceback" not in again.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "qq").exists()
