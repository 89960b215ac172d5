"""ChatGLM2's and ChatGLM3's tokenizer as THUDM's own code computes it (tokenization_chatglm.py of
THUDM/chatglm3-6b, which ships no tokenizer.json): that code cannot be installed or downloaded here, so it was
run offline on a tiny vocabulary (tests/data/chatglm3/tokenizer.model) and what it gave, token ids of plain text
and of chat inputs (build_chat_input) and decoded text, is in tests/data/chatglm3/reference.json (written by
make_reference.py there). camelid must give the same."""

import json
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data" / "chatglm3"
TEXTS = ["Hello world", "KING HENRY:\nWhat say you?", "  two  spaces\tand a tab", "问答：你好", "Aesop was sopping wet",
         "unknown ζ∑ 日本"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are a king."}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "A king of\nEngland."}, {"role": "user", "content": "Of what sop?"}],
]


@pytest.fixture(scope="module")
def reference():
    return json.loads((DATA / "reference.json").read_text(encoding="utf-8"))


def _folder(folder: Path, name: str = "THUDM/chatglm3-6b") -> Path:
    folder.mkdir()
    shutil.copy(DATA / "tokenizer.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": name, "tokenizer_class": "ChatGLMTokenizer",
                                                              "remove_space": False, "do_lower_case": False}))
    return folder


def test_text_and_chat_inputs_are_thudms(reference, tmp_path):
    from camelid.tokenizer.chat_template import render_chat
    from camelid.tokenizer.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(_folder(tmp_path / "m"), {"eos_token_id": 2})
    specials = reference["specials"]
    assert [tok.token_id(name) for name in specials] == list(specials.values())
    assert tok.eos_ids == [2, specials["<|user|>"], specials["<|observation|>"]]
    for case in reference["texts"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]  # [gMASK] sop, then the text
        assert tok.decode(case["ids"]) == case["decoded"], case["text"]
    for case in reference["chats"]:
        text = render_chat(tok.chat_template, case["messages"], tok.special_tokens_map, add_generation_prompt=True)
        assert tok.encode(text, bos=False) == case["ids"], text


def test_chatglm2_folders_take_chatglm2s_rounds(tmp_path):
    from camelid.tokenizer.chat_template import render_chat
    from camelid.tokenizer.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(_folder(tmp_path / "m", "THUDM/chatglm2-6b"), {"eos_token_id": 2})
    assert tok.eos_ids == [2]
    text = render_chat(tok.chat_template, [{"role": "user", "content": "Hi"}], {}, add_generation_prompt=True)
    assert text == "[gMASK]sop[Round 1]\n\n问：Hi\n\n答："
    ids = tok.encode(text, bos=False)
    assert ids[:2] == [tok.token_id("[gMASK]"), tok.token_id("sop")] and ids == tok.encode(text[len("[gMASK]sop"):])


def test_a_saved_model_keeps_the_tokenizer(tmp_path):
    """camelid's own folder and a Hugging Face export read back with the same ids."""
    from camelid.tokenizer.storage import load_saved_tokenizer, save_tokenizer
    from camelid.tokenizer.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(_folder(tmp_path / "m"), {"eos_token_id": 2})
    (tmp_path / "saved").mkdir()
    back = load_saved_tokenizer(tmp_path / "saved", save_tokenizer(tok, tmp_path / "saved"))
    for text in TEXTS + ["[gMASK]sop<|user|>\nHi<|assistant|>"]:
        assert back.encode(text) == tok.encode(text)
    assert back.eos_ids == tok.eos_ids and back.chat_template == tok.chat_template
