"""The same code on a CUDA GPU, against transformers and against camelid's own CPU results.

Skipped where there is no GPU (CI has none). On a GPU machine: `pytest tests/test_cuda.py`. Nothing here reads
`../shared`: the models are built in the test or are the bundled stories260K."""

import json
import subprocess
import sys

import pytest
import torch

from camelid.formats import hf as hf_format
from camelid.formats.load import build_model, load_model
from camelid.generate.generate import generate_tokens
from camelid.generate.sampling import SamplingParams

from conftest import REPO, make_hf_model, tiny_hf_configs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

STORIES = REPO / "models" / "stories260K"
IDS = [1, 403, 407, 261, 378, 434, 260, 395, 17, 88, 300, 12]
VOCAB = 512


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 comparisons at 1e-4 need true fp32 matmuls; TF32 keeps 10 mantissa bits."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("name", list(tiny_hf_configs()))
def test_logits_match_transformers_on_cuda(name, tmp_path):
    ref = make_hf_model(name, tmp_path).cuda()
    cfg, sd = hf_format.load_hf_folder(tmp_path)
    ours = build_model(cfg, sd, str(tmp_path), device="cuda")
    ids = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 9]], device="cuda")
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=0)
        cache = ours.new_kv_cache(1, ids.shape[1])
        stepped = torch.cat([ours(ids[:, i:i + 1], i, cache) for i in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(stepped, expected, atol=1e-4, rtol=0)


def test_stories_on_cuda_generates_what_it_generates_on_cpu():
    cpu, gpu = load_model(STORIES, "cpu", "fp32"), load_model(STORIES, "cuda", "fp32")
    tokens = torch.tensor([IDS])
    with torch.no_grad():
        torch.testing.assert_close(gpu.model(tokens.cuda()).cpu(), cpu.model(tokens), atol=1e-4, rtol=0)
    greedy = SamplingParams.greedy()
    on_cpu = [t[0] for t in generate_tokens(cpu.model, [IDS[:3]], 40, greedy)]
    assert [t[0] for t in generate_tokens(gpu.model, [IDS[:3]], 40, greedy)] == on_cpu
    half = load_model(STORIES, "cuda", "bf16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        got = half.model(tokens.cuda()).float().cpu()
    assert (got.argmax(-1) == cpu.model(tokens).argmax(-1)).float().mean() >= 0.9


def _dequantized(model):
    """The model with every quantized layer an nn.Linear of its dequantized weight: what a quantized layer
    computes off the CPU (the CPU kernels, tested against the same weights in test_quantize and test_gguf,
    round activations to bf16 or int8 on the way)."""
    from camelid.model.quant import QUANTIZED

    for name, module in list(model.named_modules()):
        if isinstance(module, QUANTIZED):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize().float()
            if module.bias is not None:
                linear.bias.data = module.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_on_cuda_equals_its_dequantized_weights(tmp_path, mode):
    from camelid.quantize import quantize_folder

    quantize_folder(load_model(STORIES), tmp_path / "q", mode=mode)
    gpu = load_model(tmp_path / "q", "cuda", "fp32")  # a GPU loads in bf16 by default
    assert gpu.quantization["mode"] == mode
    tokens = torch.tensor([IDS])
    with torch.no_grad():
        want = _dequantized(load_model(tmp_path / "q", "cpu").model)(tokens)
        torch.testing.assert_close(gpu.model(tokens.cuda()).cpu(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_gguf_file_on_cuda(tmp_path, quant):
    """Off the CPU the 4-bit types are int4 groups exactly and the 5-8-bit ones int8 per channel (README):
    the GPU computes what those layers hold, close to the file's own weights."""
    from camelid.formats.gguf_export import export_gguf

    path = export_gguf(load_model(STORIES), tmp_path, quant)
    tokens = torch.tensor([IDS])
    gpu = load_model(path, "cuda", "fp32").model
    with torch.no_grad():
        got = gpu(tokens.cuda())
        torch.testing.assert_close(got, _dequantized(gpu)(tokens.cuda()), atol=1e-4, rtol=0)
        exact = _dequantized(load_model(path, "cpu").model)(tokens)  # the file's weights
    got = got.cpu()
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    assert torch.corrcoef(torch.stack([got.flatten(), exact.flatten()]))[0, 1] > 0.999


def _shards(root):
    import numpy as np
    from tokenizers import Tokenizer, models

    from camelid.data.shards import write_shards

    # One cycle through 64 tokens, each always followed by the same one: learnt within tens of steps.
    cycle = np.random.default_rng(0).permutation(VOCAB - 1)[:64]
    docs = [np.roll(cycle, -i)[np.arange(320) % 64].tolist() for i in range(64)]
    write_shards(docs, root / "shards", VOCAB - 1, VOCAB)
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(root / "tokenizer.json"))
    return root / "shards", root / "tokenizer.json"


def _train_config(root, out, **over):
    from camelid.train.config import TrainConfig

    data, tok = _shards(root)
    cfg = dict(out_dir=str(out), data=str(data), tokenizer=str(tok), seq_len=64, micro_batch=4, grad_accum=2,
               model=dict(dim=64, n_layers=2, n_heads=4, ffn_dim=128, dropout=0.0), max_steps=20, lr=3e-3,
               warmup_steps=2, log_every=1, eval_every=10 ** 6, ckpt_every=10, device="cuda", seed=5)
    return TrainConfig(**(cfg | over))


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def test_pretraining_on_cuda_gives_the_cpu_losses(tmp_path):
    from camelid.train.trainer import train

    train(_train_config(tmp_path, tmp_path / "gpu"))
    train(_train_config(tmp_path, tmp_path / "cpu", device="cpu"))
    gpu, cpu = _losses(tmp_path / "gpu"), _losses(tmp_path / "cpu")
    assert gpu == pytest.approx(cpu, rel=1e-3)
    assert gpu[-1] < gpu[0] - 1.0
    assert load_model(tmp_path / "gpu" / "model").model.cfg.dim == 64  # the final folder loads on CPU


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_pretraining_on_cuda_learns(tmp_path, dtype):
    from camelid.train.trainer import train

    train(_train_config(tmp_path, tmp_path / "run", dtype=dtype, compile=dtype == "bf16"))
    losses = _losses(tmp_path / "run")
    assert all(loss == loss for loss in losses)  # fp16's grad scaler skips overflowing steps, never NaN
    assert losses[-1] < losses[0] - 1.0, losses


def test_resume_on_cuda_continues_bit_for_bit(tmp_path):
    """Resumed from the step-10 checkpoint, a run logs what the uninterrupted one did: dropout draws from the
    CUDA generator, whose state the checkpoint carries."""
    import shutil

    from camelid.train.trainer import train

    over = dict(model=dict(dim=64, n_layers=2, n_heads=4, ffn_dim=128, dropout=0.1))
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(_train_config(tmp_path, whole, **over))
    (split / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "checkpoints" / "step_00000010.pt", split / "checkpoints")
    (split / "log.jsonl").write_text("".join((whole / "log.jsonl").read_text().splitlines(keepends=True)[:10]))
    train(_train_config(tmp_path, split, **over), resume="auto")
    assert _losses(split) == _losses(whole)


@pytest.mark.parametrize("fsdp", [False, True])
def test_torchrun_with_nccl(tmp_path, fsdp):
    """One process per GPU over NCCL: with one GPU, one process, which must give the plain run's losses."""
    from camelid.train.trainer import train

    train(_train_config(tmp_path, tmp_path / "plain", max_steps=6))
    cfg = _train_config(tmp_path, tmp_path / "torchrun", max_steps=6)
    args = [f"{k}={getattr(cfg, k)}" for k in ("out_dir", "data", "tokenizer", "seq_len", "micro_batch",
                                                "grad_accum", "max_steps", "lr", "warmup_steps", "log_every",
                                                "ckpt_every", "device", "seed")]
    args += [f"model.{k}={v}" for k, v in cfg.model.items()]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          "-m", "camelid", "pretrain", *args] + ["--fsdp"] * fsdp,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _losses(tmp_path / "torchrun") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-4)


def _alpaca(path):
    rows = [{"instruction": f"Repeat the word {w} three times.", "input": "", "output": f"{w} {w} {w}"}
            for w in ("cat", "dog", "sun", "tree", "boat", "rain", "milk", "bird", "fish", "road", "star", "lamp")]
    path.write_text(json.dumps(rows * 3))
    return path


@pytest.mark.parametrize("dtype, quantize_base", [("fp32", ""), ("bf16", ""), ("bf16", "int4")])
def test_lora_finetuning_on_cuda(tmp_path, dtype, quantize_base):
    from camelid.train.config import FinetuneConfig
    from camelid.train.finetune import finetune

    cfg = FinetuneConfig(base=str(STORIES), data=str(_alpaca(tmp_path / "data.json")), template="alpaca",
                         max_len=256, epochs=3, micro_batch=4, grad_accum=2, lr=3e-3, out_dir=str(tmp_path / "run"),
                         log_every=1, eval_every=10 ** 6, ckpt_every=10 ** 6, method="lora", lora_rank=4,
                         dtype=dtype, quantize_base=quantize_base, quantize_group=32, device="cuda", seed=3)
    folder = finetune(cfg)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.5, losses
    tuned = load_model(folder, "cuda")
    prompt = tuned.tokenizer.encode("### Instruction:\nRepeat the word cat three times.\n\n### Response:\n")
    assert len([t for t in generate_tokens(tuned.model, [prompt], 8, SamplingParams.greedy())]) == 8
