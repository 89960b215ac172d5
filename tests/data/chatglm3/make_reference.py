"""Writes reference.json (and, once, tokenizer.model) for tests/test_thudm_tokenizers.py from THUDM's own
ChatGLM3 tokenizer (tokenization_chatglm.py of the Hugging Face repository THUDM/chatglm3-6b), run offline on a
tiny SentencePiece vocabulary. That code is not part of camelid: put it in a package folder and run

    python tests/data/chatglm3/make_reference.py PATH/TO/FOLDER_ABOVE_THE_PACKAGE PACKAGE_NAME"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from test_thudm_tokenizers import CONVERSATIONS, TEXTS  # noqa: E402


def vocabulary(path: Path):
    """A byte-fallback BPE SentencePiece model with ChatGLM3's numbering (unknown 0, BOS 1, EOS 2, no pad)."""
    import sentencepiece as spm

    corpus = HERE.parents[3] / "shared" / "data" / "corpora" / "tinyshakespeare.txt"
    text = HERE / "corpus.txt"
    text.write_text(corpus.read_text(encoding="utf-8")[:200_000] + "\n问答：你好。\n" * 50, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=600,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   normalization_rule_name="identity", minloglevel=2, num_threads=1)
    text.unlink()
    path.with_suffix(".vocab").unlink()


def main(root: str, package: str):
    sys.path.insert(0, root)
    tokenization = __import__(f"{package}.tokenization_chatglm", fromlist=["x"])

    class ChatGLMTokenizer(tokenization.ChatGLMTokenizer):
        """THUDM's, with the two calls transformers 5 changed: _pad now gets padding_side, and
        batch_encode_plus is gone (for ids, it added the special tokens: build_inputs_with_special_tokens)."""

        def _pad(self, encoded_inputs, *args, padding_side=None, **kwargs):
            return super()._pad(encoded_inputs, *args, **kwargs)

        def batch_encode_plus(self, batch, return_tensors=None, is_split_into_words=False):
            import torch

            return {"input_ids": torch.tensor([self.build_inputs_with_special_tokens(ids) for ids in batch])}

    vocab = HERE / "tokenizer.model"
    if not vocab.exists():
        vocabulary(vocab)
    tok = ChatGLMTokenizer(vocab_file=str(vocab))
    out = {"texts": [], "chats": []}
    for t in TEXTS:
        ids = tok(t)["input_ids"]
        out["texts"].append({"text": t, "ids": ids, "decoded": tok.decode(ids[2:], skip_special_tokens=True)})
    for messages in CONVERSATIONS:
        *history, last = messages
        ids = tok.build_chat_input(last["content"], history=history, role=last["role"])["input_ids"][0].tolist()
        out["chats"].append({"messages": messages, "ids": ids})
    out["specials"] = {name: tok.get_command(name) for name in ["[gMASK]", "sop", "<|user|>", "<|assistant|>",
                                                                "<|observation|>", "<|system|>"]}
    (HERE / "reference.json").write_text(json.dumps(out, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
