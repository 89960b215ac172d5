"""Chat templates render exactly as transformers' apply_chat_template; built-ins match their reference code."""

import pytest

from camelid.errors import CamelidError
from camelid.tokenizer.chat_template import BUILTIN_TEMPLATES, render_chat

from conftest import shared_file

# Verbatim from the models' tokenizer_config.json files.
REAL_TEMPLATES = {
    "zephyr": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",  # noqa: E501
    "mistral-instruct": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",  # noqa: E501
    "llama3-instruct": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",  # noqa: E501
    "qwen2": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",  # noqa: E501
    "tojson-and-generation": "{% for m in messages %}{{ m | tojson }}\n{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}",  # noqa: E501
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you? ¿Qué tal? 🦙"}],
    [{"role": "user", "content": "Name a camelid."}, {"role": "assistant", "content": "  The alpaca. "},
     {"role": "user", "content": "And another?"}],
]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(shared_file("tokenizers/gpt2_tokenizer.json")),
                                   bos_token="<s>", eos_token="</s>")


def _hf_render(tok, template, messages, add_generation_prompt):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", list(REAL_TEMPLATES) + list(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(hf_tokenizer, name, add_generation_prompt):
    template = REAL_TEMPLATES.get(name) or BUILTIN_TEMPLATES[name][0]
    for messages in CONVERSATIONS:
        expected = _hf_render(hf_tokenizer, template, messages, add_generation_prompt)
        assert render_chat(template, messages, SPECIALS, add_generation_prompt) == expected


def test_system_prompt_in_llama2_and_zephyr(hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}] + CONVERSATIONS[1]
    for template in (BUILTIN_TEMPLATES["llama2"][0], REAL_TEMPLATES["zephyr"]):
        assert render_chat(template, messages, SPECIALS) == _hf_render(hf_tokenizer, template, messages, True)


def test_alpaca_matches_stanford_prompt():
    # stanford_alpaca/train.py PROMPT_DICT, with the output and EOS appended as in training.
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\nName a camelid.\n\n### Response:")
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\nTranslate.\n\n### Input:\nllama\n\n### Response:")
    assert render_chat("alpaca", [{"role": "user", "content": "Name a camelid."}], SPECIALS) == "<s>" + no_input
    msg = [{"role": "user", "content": "Translate.", "input": "llama"}, {"role": "assistant", "content": "lama"}]
    assert render_chat("alpaca", msg, SPECIALS) == "<s>" + with_input + "lama</s>"


def test_vicuna_matches_fastchat():
    # FastChat conversation.py, vicuna_v1.1: sep " ", sep2 "</s>", roles USER/ASSISTANT.
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    expected = f"<s>{system} USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT:"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    assert render_chat("vicuna", messages, SPECIALS) == expected


def test_template_errors_are_clear():
    with pytest.raises(CamelidError, match="roles must alternate"):
        render_chat("llama2", [{"role": "assistant", "content": "x"}], SPECIALS)
    with pytest.raises(CamelidError, match="syntax error"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}], SPECIALS)
    with pytest.raises(CamelidError, match="unknown chat template"):
        render_chat("alpacca", [{"role": "user", "content": "x"}], SPECIALS)
    with pytest.raises(CamelidError, match="'role' and a 'content'"):
        render_chat("chatml", [{"content": "x"}], SPECIALS)
