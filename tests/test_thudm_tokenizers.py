"""THUDM's tokenizers, which its releases ship as Python code rather than a tokenizer.json.

ChatGLM2's and ChatGLM3's (tokenization_chatglm.py of THUDM/chatglm3-6b): that code cannot be installed or
downloaded here, so it was run offline on a tiny vocabulary (tests/data/chatglm3/tokenizer.model) and what it
gave, token ids of plain text and of chat inputs (build_chat_input) and decoded text, is in
tests/data/chatglm3/reference.json (written by make_reference.py there). GLM-4's is tiktoken with its pattern
and special tokens, which runs here. camelid must give the same."""

import json
import shutil
from pathlib import Path

import pytest

from camelid.errors import CamelidError

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


def _tiktoken_folder(folder: Path) -> tuple[Path, dict]:
    """A GLM-4 folder whose tokenizer.model holds GPT-2's vocabulary as tiktoken ranks (any byte-level BPE)."""
    import base64

    from camelid.tokenizer.thudm import _byte_chars

    from conftest import SHARED

    byte_of = {c: b for b, c in _byte_chars().items()}
    vocab = json.loads((SHARED / "tokenizers" / "gpt2_tokenizer.json").read_text())["model"]["vocab"]
    ranks = {bytes(byte_of[c] for c in piece): i for piece, i in vocab.items() if i < 50256}
    folder.mkdir()
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    return folder, ranks


def test_glm4s_tiktoken_tokenizer_is_tiktokens(tmp_path):
    """GLM-4's ChatGLM4Tokenizer is tiktoken over its ranks with its pattern, special tokens numbered after the
    ranks: camelid's BPE gives tiktoken's ids for text (with [gMASK] <sop> first, as its code adds them) and
    for a chat input built as its build_chat_input builds one."""
    tiktoken = pytest.importorskip("tiktoken")
    from camelid.tokenizer.thudm import GLM4_PATTERN, GLM4_SPECIALS
    from camelid.tokenizer.tokenizer import load_hf_tokenizer

    folder, ranks = _tiktoken_folder(tmp_path / "glm4")
    special = {t: len(ranks) + i for i, t in enumerate(GLM4_SPECIALS)}
    ref = tiktoken.Encoding(name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    tok = load_hf_tokenizer(folder, {})
    assert tok.eos_ids == [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]]
    texts = TEXTS + ["It's 2024: 12345 apples!!\n\n\tdone   ", "naïve café — ünïcode", "x" * 300]
    for text in texts:
        want = [special["[gMASK]"], special["<sop>"]] + ref.encode(text, disallowed_special=())
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text
        assert tok.backend.tok.encode(text).ids == want  # a tokenizer.json written from it adds them too
    for messages in CONVERSATIONS:
        want = [special["[gMASK]"], special["<sop>"]]
        for m in messages:  # build_single_message: the role, "{metadata}\n" and the message each encoded alone
            want += [special[f"<|{m['role']}|>"]] + ref.encode("\n") + ref.encode(m["content"], disallowed_special=())
        want.append(special["<|assistant|>"])
        text = "[gMASK]<sop>" + "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages) + "<|assistant|>"
        assert tok.encode(text, bos=False) == want, text  # the text GLM-4's chat template writes
    (folder / "tokenizer.model").write_text("not base64 0\n")
    with pytest.raises(CamelidError, match="tokenizer.model:1: not a tiktoken line"):
        load_hf_tokenizer(folder, {})


def test_glm4s_tokenizer_saved_by_camelid_keeps_its_prompt_start(tmp_path):
    from camelid.tokenizer.storage import load_saved_tokenizer, save_tokenizer
    from camelid.tokenizer.tokenizer import load_hf_tokenizer

    folder, _ = _tiktoken_folder(tmp_path / "glm4")
    tok = load_hf_tokenizer(folder, {})
    (tmp_path / "saved").mkdir()
    back = load_saved_tokenizer(tmp_path / "saved", save_tokenizer(tok, tmp_path / "saved"))
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
