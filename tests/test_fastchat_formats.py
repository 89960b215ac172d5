"""FastChat's conversation formats: camelid's Jinja renders exactly what FastChat's own `conversation.py`
(fschat 0.2.36) gets as the prompt, and a model without a template gets the format FastChat's adapters pick
for its name."""

import json

import pytest

from camelid.errors import CamelidError
from camelid.tokenizer.chat_template import render_chat, resolve_template
from camelid.tokenizer.fastchat_formats import ALIASES, FORMATS, fastchat_template, template_for_model

conversation = pytest.importorskip("fastchat.conversation", reason="fschat (a dev dependency) is not installed")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief.\nVery brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4.\n\nFour, that is."}, {"role": "user", "content": "And 3+3?\r\n\r\nSay it."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c 'q' \\"},
     {"role": "assistant", "content": "d"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
     {"role": "user", "content": "再见"}],
]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def fastchat_prompt(name: str, messages: list[dict], add_generation_prompt: bool) -> str:
    conv = conversation.get_conv_template(name)
    if messages[0]["role"] == "system":
        conv.set_system_message(messages[0]["content"])
        messages = messages[1:]
    for m in messages:
        conv.append_message(conv.roles[0] if m["role"] == "user" else conv.roles[1], m["content"])
    if add_generation_prompt:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_renders_fastchats_prompt(name):
    begin = render_chat(f"fastchat:{name}", [], SPECIAL, add_generation_prompt=False)[:10]
    begin = "[gMASK]sop" if begin.startswith("[gMASK]sop") else "<s>" if begin.startswith("<s>") else ""
    for messages in CONVERSATIONS:
        for generation in (True, False):
            ours = render_chat(f"fastchat:{name}", messages, SPECIAL, add_generation_prompt=generation)
            assert ours == begin + fastchat_prompt(name, messages, generation), (name, messages, generation)


def test_fastchats_names_and_aliases():
    assert resolve_template("vicuna_v1.1") == fastchat_template("vicuna_v1.1")
    assert resolve_template("wizardlm")[0] == fastchat_template("vicuna_v1.1")[0]
    assert resolve_template("vicuna_v0")[0] == resolve_template("fastchat-t5")[0] == fastchat_template("one_shot")[0]
    # camelid's own built-ins keep their names; FastChat's format of the same name is fastchat:NAME
    assert resolve_template("alpaca") != resolve_template("fastchat:alpaca")
    assert resolve_template("one_shot")[1] == ["###"] and resolve_template("falcon")[1] == ["\nUser"]
    assert set(ALIASES.values()) <= set(FORMATS)


def test_the_eos_a_format_writes_is_the_models_own():
    """FastChat writes a LLaMA tokenizer's `</s>` as text; the template writes the model's EOS token."""
    text = render_chat("vicuna_v1.1", CONVERSATIONS[2], {"bos_token": "<|bos|>", "eos_token": "<|end|>"},
                       add_generation_prompt=False)
    assert text.startswith("<|bos|>A chat") and text.endswith("ASSISTANT: d<|end|>") and "</s>" not in text


def test_a_role_the_format_has_no_place_for_is_a_clear_error():
    with pytest.raises(CamelidError, match="not tool"):
        render_chat("koala_v1", [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], SPECIAL)


MODEL_NAMES = [
    "lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-delta-v0", "vicuna-7b-v0", "lmsys/longchat-7b-16k",
    "lmsys/fastchat-t5-3b-v1.0", "google/flan-t5-xl", "young-geng/koala", "koala-13b", "chavinlo/alpaca-native",
    "THUDM/chatglm2-6b", "THUDM/chatglm3-6b", "THUDM/chatglm-6b", "databricks/dolly-v2-12b",
    "OpenAssistant/oasst-sft-4-pythia-12b-epoch-3.5", "OpenAssistant/oasst-sft-6-llama-30b",
    "stabilityai/stablelm-tuned-alpha-7b", "project-baize/baize-v2-7b", "mosaicml/mpt-7b-chat",
    "mosaicml/mpt-30b-chat", "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardLM-7B-V1.0", "tiiuae/falcon-7b-instruct",
    "tiiuae/falcon-180B-chat", "EleutherAI/pythia-1.4b", "meta-llama/Llama-2-7b-chat-hf", "TheBloke/stable-vicuna-13B-HF",
    "jondurbin/airoboros-l2-70b", "timdettmers/guanaco-65b", "/models/vicuna-7b-v1.5", "/data/koala/weights",
    "models/Llama-2-13b-chat.Q4_0.gguf", "vicuna-7b-v1.5.Q4_K_M.gguf", "models/stories260K", "gpt2",
]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_model_without_a_template_gets_the_format_fastchat_picks_for_its_name(name):
    """FastChat's last adapter takes any name (one_shot); camelid gives such a model its family's default."""
    adapters = pytest.importorskip("fastchat.model.model_adapter")
    picked = adapters.get_conversation_template(name).name
    if type(adapters.get_model_adapter(name)) is adapters.BaseModelAdapter or picked not in FORMATS:
        picked = None
    assert template_for_model(name) == picked


def test_loading_a_model_without_a_template_says_which_format_it_took(tmp_path):
    import torch
    import transformers as tf

    from camelid.formats.load import load_model

    folder = tmp_path / "vicuna-7b-v1.5"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2)).save_pretrained(folder)
    vocab = {f"<{i}>": i for i in range(64)}
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel(vocab, unk_token="<0>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<1>", "eos_token": "<2>"}))
    lm = load_model(folder)
    assert lm.template == "vicuna_v1.1" and "FastChat's 'vicuna_v1.1'" in lm.template_note


def test_an_unknown_template_on_the_command_line_is_a_clear_error(capsys):
    from camelid.cli import main

    from conftest import REPO

    assert main(["chat", str(REPO / "models" / "stories260K"), "--template", "vicuna_v9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("camelid: error: unknown chat template 'vicuna_v9'") and "vicuna_v1.1" in err
