"""Presets reproduce the published parameter counts; info and estimate answer "will it run here?"."""

import pytest

from camelid.cli import main
from camelid.model.config import preset
from camelid.model.transformer import count_parameters

# Published totals: LLaMA paper / model cards, GPT-2 (HF), GPT-J (EleutherAI), Pythia (paper table),
# Falcon (the released checkpoints' safetensors index), OPT (HF model cards).
PUBLISHED = {
    "llama-7b": 6.7e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9,
    "llama2-70b": 69.0e9, "llama3-8b": 8.03e9, "tinyllama-1.1b": 1.1e9,
    "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6,
    "gptj-6b": 6053e6, "pythia-12b": 11846e6, "dolly-v2-12b": 11846e6, "pythia-1.4b": 1414e6,
    "falcon-7b": 6.92e9, "falcon-40b": 41.8e9,
    "opt-125m": 125e6, "opt-350m": 331e6, "opt-1.3b": 1.32e9, "opt-2.7b": 2.65e9, "opt-6.7b": 6.7e9,
    "opt-13b": 12.9e9, "opt-30b": 30.0e9, "opt-66b": 65.7e9,
    # as their model cards give them
    "mistral-7b": 7.24e9, "mixtral-8x7b": 46.7e9, "qwen2.5-0.5b": 0.49e9, "qwen2.5-7b": 7.61e9, "qwen3-8b": 8.19e9,
    "qwen3-30b-a3b": 30.5e9, "gemma-2b": 2.51e9, "gemma-2-2b": 2.61e9, "gemma-3-1b": 1.0e9, "phi-3-mini": 3.82e9,
    "bloom-560m": 559e6, "mpt-7b": 6.7e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    assert abs(count_parameters(preset(name)) / PUBLISHED[name] - 1) < 0.01


def test_info_and_estimate(capsys):
    assert main(["info", "vicuna-13b"]) == 0
    out = capsys.readouterr().out
    assert "13,015,864,320" in out and "int4" in out and "context        2048" in out
    assert main(["estimate", "--preset", "llama-7b", "--quant", "int4"]) == 0
    assert "fits" in capsys.readouterr().out
    # 65B at fp32 needs ~270 GB: more than any machine this suite runs on.
    assert main(["estimate", "--preset", "llama-65b", "--quant", "fp32"]) == 2
    assert "does not fit" in capsys.readouterr().out


@pytest.mark.parametrize("name, active", [("mixtral-8x7b", "12.88B"), ("qwen3-30b-a3b", "3.35B")])
def test_info_gives_a_mixture_of_experts_active_parameters(name, active):
    """As their model cards give them: 12.9B of Mixtral's 46.7B, 3.3B of Qwen3-30B-A3B's 30.5B per token."""
    from camelid.info import describe

    text = describe(name)
    assert f"{active} active per token" in text and "experts" in text
