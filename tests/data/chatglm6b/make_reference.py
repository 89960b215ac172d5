"""Writes reference.json (and, once, ice_text.model) for tests/test_chatglm6b.py from THUDM's own ChatGLM-6B code
(configuration_chatglm.py, modeling_chatglm.py and tokenization_chatglm.py of the Hugging Face repository
THUDM/chatglm-6b), run offline on a tiny vocabulary and a tiny checkpoint. That code is not part of camelid:
put the three files in a package folder and run

    python tests/data/chatglm6b/make_reference.py PATH/TO/FOLDER_ABOVE_THE_PACKAGE PACKAGE_NAME

The checkpoint's weights come from tests/test_chatglm6b.py's tiny_weights (integers from a seeded generator),
so the test rebuilds exactly what was run here."""

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from test_chatglm6b import PROMPTS, SPECIALS, TEXTS, tiny_config, tiny_weights  # noqa: E402


def vocabulary(path: Path):
    import sentencepiece as spm

    corpus = HERE.parents[3] / "shared" / "data" / "corpora" / "tinyshakespeare.txt"
    text = HERE / "corpus.txt"
    text.write_text(corpus.read_text(encoding="utf-8")[:200_000] + "\n问答：你好。\n" * 50, encoding="utf-8")
    symbols = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)] + SPECIALS
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=500,
                                   model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   user_defined_symbols=symbols, normalization_rule_name="identity",
                                   minloglevel=2, num_threads=1)
    text.unlink()
    path.with_suffix(".vocab").unlink()


def main(root: str, package: str):
    sys.path.insert(0, root)
    configuration = __import__(f"{package}.configuration_chatglm", fromlist=["x"])
    modeling = __import__(f"{package}.modeling_chatglm", fromlist=["x"])
    tokenization = __import__(f"{package}.tokenization_chatglm", fromlist=["x"])

    class ChatGLMTokenizer(tokenization.ChatGLMTokenizer):
        """THUDM's, with its SentencePiece model opened before PreTrainedTokenizer's __init__, which asks for
        the vocabulary in transformers 5 (as THUDM's later tokenizers do), and _pad taking the padding_side it now
        passes."""

        def __init__(self, vocab_file, num_image_tokens=20000, **kwargs):
            self.sp_tokenizer = tokenization.SPTokenizer(vocab_file, num_image_tokens=num_image_tokens)
            super().__init__(vocab_file, num_image_tokens=num_image_tokens, **kwargs)

        def _pad(self, encoded_inputs, *args, padding_side=None, **kwargs):  # transformers 5 passes the side
            return super()._pad(encoded_inputs, *args, **kwargs)
    vocab = HERE / "ice_text.model"
    if not vocab.exists():
        vocabulary(vocab)
    out = {"tokens": {}}
    for images in (0, 20000):
        tok = ChatGLMTokenizer(vocab_file=str(vocab), num_image_tokens=images)
        out["tokens"][str(images)] = [{"text": t, "ids": tok(t)["input_ids"],
                                       "decoded": tok.decode(tok(t)["input_ids"][:-2], skip_special_tokens=True)} for t in TEXTS]
    tok = ChatGLMTokenizer(vocab_file=str(vocab), num_image_tokens=0)
    hf = tiny_config(tok)
    model = modeling.ChatGLMForConditionalGeneration(configuration.ChatGLMConfig(**hf), empty_init=False).float()
    missing = model.load_state_dict(tiny_weights(hf), strict=False)
    assert all(k.endswith("inv_freq") for k in missing.missing_keys) and not missing.unexpected_keys
    model.eval()
    out["model"] = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            greedy = list(ids)
            for _ in range(12):  # THUDM's forward on the whole sequence each step, as its generate runs it
                nxt = int(model(input_ids=torch.tensor([greedy])).logits[0, -1].argmax())
                greedy.append(nxt)
                if nxt == hf["eos_token_id"]:
                    break
            # every position's first 128 logits, and over the whole vocabulary its log-sum-exp and best token
            out["model"].append({"prompt": prompt, "ids": ids,
                                 "logits": [[round(v, 5) for v in row] for row in logits[:, :128].tolist()],
                                 "logsumexp": [round(v, 5) for v in logits.logsumexp(-1).tolist()],
                                 "argmax": logits.argmax(-1).tolist(), "greedy": greedy[len(ids):]})
    (HERE / "reference.json").write_text(json.dumps(out, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
