"""GGUF files made by llama.cpp's own converter (`convert_hf_to_gguf.py`, from the llama-cpp-python source
distribution `make test` unpacks into .cache/llama.cpp): tiny random-weight transformers models of each family,
converted to F32 and quantized to Q8_0 by llama.cpp, run in camelid with transformers' logits and llama.cpp's.

The families missing here are the ones this converter cannot convert from transformers 5's configs (GPT-2:
`n_ctx`; GPT-NeoX: `rotary_pct`; Falcon's fused QKV; Qwen2's BPE hash for GPT-2's vocabulary; MPT, which it
does not register); tests/test_gguf.py covers them through camelid's own export, which llama.cpp runs."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_gguf import llama_cpp_logits, llama_quantize

from camelid.formats.load import load_model

from conftest import REPO, SHARED, tiny_hf_configs

CONVERTER = REPO / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"
SPM = {"llama", "mixtral", "gemma", "gemma2", "gemma3", "phi3"}  # SentencePiece vocabularies; the rest GPT-2's
FAMILIES = ["llama", "mixtral", "gemma", "gemma2", "gemma3", "phi3", "qwen3", "qwen3_moe", "starcoder", "bloom", "glm",
            "glm4"]
GLM_SPECIALS = ["<|user|>", "<|assistant|>", "<|system|>"]  # the converter marks <|user|> the end of a turn
IDS = [5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 9, 250, 301, 77, 480]
# Where the tiny configs set what a GGUF file cannot say, values llama.cpp's graphs compute as transformers does:
# Gemma 2's score scale comes from its size there, Gemma 3 slides in five blocks of six with unscaled RoPE
# (its released configuration), and llama.cpp turns Phi-3's sliding window off.
# Its chatglm writer takes a head as dim / heads, the RoPE base as 10000 x THUDM's rope_ratio and the norms' epsilon
# from THUDM's layernorm_epsilon (1e-5 when absent), whatever a transformers GLM config says.
OVERRIDES = {"gemma2": dict(query_pre_attn_scalar=16), "phi3": dict(sliding_window=None),
             "glm": dict(head_dim=16, rms_norm_eps=1e-5)}


def _config(name: str):
    import transformers as tf

    if name == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                   max_position_embeddings=64)
    cfg = tiny_hf_configs()[name]
    for key, value in OVERRIDES.get(name, {}).items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    import transformers as tf

    if not CONVERTER.exists():
        pytest.skip(f"{CONVERTER} not found (make test unpacks llama.cpp's converter)")
    name, folder = request.param, tmp_path_factory.mktemp(request.param)
    cfg = _config(name)
    cfg.vocab_size = 512 if name in SPM else 50257 + len(GLM_SPECIALS)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder / "hf")
    if name in SPM:
        shutil.copy(SHARED / "models" / "stories260K" / "tok512.model", folder / "hf" / "tokenizer.model")
    else:
        tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(SHARED / "tokenizers" / "gpt2_tokenizer.json"))
        if name.startswith("glm"):
            tok.add_special_tokens({"additional_special_tokens": GLM_SPECIALS})
        tok.save_pretrained(folder / "hf")
    f32 = folder / "model-F32.gguf"
    run = subprocess.run([sys.executable, str(CONVERTER), str(folder / "hf"), "--outfile", str(f32), "--outtype",
                          "f32"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        want = model(torch.tensor([IDS])).logits[0].numpy()
    return name, folder, f32, want


def test_files_llama_cpp_converts_run_with_transformers_logits(converted):
    name, folder, f32, want = converted
    ours = load_model(f32).model(torch.tensor([IDS]))[0].detach().numpy()
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_they_run_as_llama_cpp_runs_them(converted):
    name, folder, f32, want = converted
    for path in (f32, folder / "model-Q8_0.gguf"):
        if not path.exists():
            llama_quantize(f32, path, "Q8_0")
        ours = load_model(path).model(torch.tensor([IDS]))[0].detach().numpy()
        ref = llama_cpp_logits(path, IDS)
        assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] >= 0.999, (name, path.name)
