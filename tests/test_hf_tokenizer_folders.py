"""Tokenizers and chat templates read from Hugging Face model folders, as transformers reads them."""

import json
import shutil

from camelid.cli import main
from camelid.formats.load import load_model
from camelid.tokenizer.chat_template import render_chat

from conftest import SHARED, make_hf_model, shared_file

TEXTS = ["Hello world", " leading space", "Füh 🦙 ½ — 我想", "a\n\nb  c"]
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] "
          "+ eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n' + message['content'] + "
          "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
          "{% endif %}\n{% endfor %}")


def test_tokenizer_json_folder_with_chat_template(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    make_hf_model("gpt2", tmp_path)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(shared_file("tokenizers/gpt2_tokenizer.json")),
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf_tok.chat_template = ZEPHYR
    hf_tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 50257
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # the random model has a 96-token vocabulary; only the tokenizer is compared here
    from camelid.tokenizer.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(tmp_path, cfg)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == ref(text).input_ids
        assert tok.decode(tok.encode(text)) == text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    assert tok.chat_template == ZEPHYR
    assert render_chat(tok.chat_template, messages, tok.special_tokens_map) == \
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.eos_ids == [50256]


def test_sentencepiece_folder_adds_bos_and_reads_generation_config(tmp_path):
    import sentencepiece as spm

    make_hf_model("llama", tmp_path)
    shutil.copy(SHARED / "tokenizers" / "llama2_tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 32]}))
    lm = load_model(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in TEXTS:
        assert lm.tokenizer.encode(text) == [1] + sp.encode(text)
    assert lm.tokenizer.eos_ids == [2, 32] and lm.template == "raw"


def test_info_on_a_model_path(capsys):
    from conftest import REPO

    assert main(["info", str(REPO / "models" / "stories260K")]) == 0
    out = capsys.readouterr().out
    assert "260,544" in out or "260K" in out or "0.26M" in out
    assert "grouped-query attention (4 KV heads)" in out and "context        512" in out
