import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
REPO = Path(__file__).resolve().parents[1]


def tiny_hf_configs():
    """One tiny configuration per family and layout variant, built offline from transformers configs."""
    import transformers as tf

    common = dict(vocab_size=96)
    return {
        "llama": tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, **common),
        "llama3-tied": tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True, rope_theta=500000.0,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                      **common),
        "gpt2": tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common),
        "gptj": tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, **common),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, rotary_pct=0.25, max_position_embeddings=64, **common),
        "falcon-7b-style": tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                           bias=False, max_position_embeddings=64, **common),
        "falcon-40b-style": tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                            num_kv_heads=2, new_decoder_architecture=True, bias=False,
                                            max_position_embeddings=64, **common),
        "opt": tf.OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                            max_position_embeddings=64, word_embed_proj_dim=64, **common),
        "mistral": tf.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, sliding_window=5, **common),
        "qwen2": tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                                **common),
        "qwen2-sliding": tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        use_sliding_window=True, sliding_window=6, max_window_layers=1, **common),
        "qwen3": tf.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, max_position_embeddings=64, **common),
        "gemma": tf.GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=32, max_position_embeddings=64, **common),
        "gemma2": tf.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                  attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                  max_position_embeddings=64, **common),
        "gemma3": tf.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      query_pre_attn_scalar=16, sliding_window=5, sliding_window_pattern=3,
                                      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                          "rope_theta": 1e6},
                                                       "sliding_attention": {"rope_type": "default",
                                                                             "rope_theta": 1e4}},
                                      max_position_embeddings=64, **common),
        "phi3": tf.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, sliding_window=7, pad_token_id=0,
                              **common),
        "phi3-longrope": tf.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                       original_max_position_embeddings=16, partial_rotary_factor=0.75,
                                       rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 10 for i in range(6)],
                                                     "long_factor": [2.0 + i for i in range(6)]},
                                       pad_token_id=0, **common),
        "qwen2-yarn": tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64,
                                     rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 16}, **common),
        "llama-dynamic": tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                                        rope_scaling={"rope_type": "dynamic", "factor": 4.0}, **common),
        "starcoder": tf.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True, **common),
        "starcoder-mha": tf.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=False,
                                             **common),
        "mixtral": tf.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                    max_position_embeddings=64, **common),
        "qwen2_moe": tf.Qwen2MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                       mlp_only_layers=[1], max_position_embeddings=64, **common),
        "qwen3_moe": tf.Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                       max_position_embeddings=64, **common),
        "bloom": tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common),
        "bloom-6-heads": tf.BloomConfig(hidden_size=96, n_layer=2, n_head=6, **common),
        "mpt": tf.MptConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **common),
        "mpt-clipped": tf.MptConfig(d_model=96, n_layers=2, n_heads=6, max_seq_len=64,
                                    attn_config={"clip_qkv": 0.8, "softmax_scale": 0.3},
                                    **common),
        # GLM-4-9B's shape: half of each head rotated in pairs, q/k/v biases, grouped queries; GLM-4-0414's adds
        # post norms; the head_dim of both is not dim / heads
        "glm": tf.GlmConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=24, max_position_embeddings=64, pad_token_id=None,
                            **common),
        "glm4": tf.Glm4Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=None,
                              rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                               "partial_rotary_factor": 0.75}, **common),
        "opt-350m-style": tf.OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                       max_position_embeddings=64, word_embed_proj_dim=32,
                                       do_layer_norm_before=False, **common),
    }


def run_main(*args):
    """The command line's entry point in this process (an interpreter and torch started per call cost seconds):
    its exit code, stdout and stderr, as subprocess.run gives them."""
    import contextlib
    import io
    import types

    from camelid.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def make_hf_model(name: str, folder: Path, seed: int = 0):
    """Save a random-weight transformers model; every parameter is randomised so norms and biases matter."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_hf_configs()[name]
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return model


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without ../shared beside the repository (a plain clone), a test that fails because it reads a file
    from there is reported as skipped, naming what it needs; every other test runs as usual."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and not SHARED.exists() and str(SHARED) in str(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs {SHARED} (the shared data folder)")


def shared_file(relative: str) -> Path:
    """A file of ../shared/data; a clone without it skips the test, naming the path it needs."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder beside the repository)")
    return path


@pytest.fixture(scope="session")
def shakespeare() -> str:
    return shared_file("corpora/tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def stories_path():
    path = STORIES / "stories260K.bin"
    if not path.exists():
        pytest.skip("shared stories260K model not found")
    return path
