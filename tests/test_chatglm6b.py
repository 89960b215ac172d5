"""ChatGLM-6B, the first ChatGLM, against THUDM's own code (modeling_chatglm.py and tokenization_chatglm.py from
the Hugging Face repository THUDM/chatglm-6b). That code cannot be installed or downloaded here, so it was run
offline on a tiny vocabulary (tests/data/chatglm6b/ice_text.model) and a tiny checkpoint whose weights are
integers from a seeded generator, rebuilt below; tests/data/chatglm6b/make_reference.py wrote what it gave
(token ids, decoded text, logits, greedy replies) to reference.json. camelid must give the same."""

import json
from pathlib import Path

import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats.load import load_model

DATA = Path(__file__).resolve().parent / "data" / "chatglm6b"
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
TEXTS = ["Hello world", "KING HENRY:\nWhat say you?", "  two  spaces\tand a tab   and three", "问答：你好",
         "a [gMASK] inside", "unknown ζ∑ 日本", "line\n\nbreaks\n"]
PROMPTS = ["[Round 0]\n问：Hello\n答：", "Once upon a time there was",
           "[Round 0]\n问：Who are you?\n答：I am a king.\n[Round 1]\n问：Of what?\n答："]


def tiny_config(tok) -> dict:
    """THUDM's config.json for a two-block model over the tiny vocabulary (`tok`: its tokenizer)."""
    ids = {p: tok.convert_tokens_to_ids(p) for p in ("[MASK]", "[gMASK]", "<sop>", "<eop>")} \
        if hasattr(tok, "convert_tokens_to_ids") else tok
    return dict(model_type="chatglm", architectures=["ChatGLMModel"], vocab_size=500, hidden_size=64, num_layers=2,
                num_attention_heads=4, inner_hidden_size=96, max_sequence_length=256, layernorm_epsilon=1e-5,
                bos_token_id=ids["<sop>"], eos_token_id=ids["<eop>"], mask_token_id=ids["[MASK]"],
                gmask_token_id=ids["[gMASK]"], pad_token_id=3, position_encoding_2d=True)


def tiny_weights(hf: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under THUDM's names: thousandths drawn from a seeded generator (the same on
    every machine), norms around 1."""
    d, f, v = hf["hidden_size"], hf["inner_hidden_size"], hf["vocab_size"]
    shapes = {"transformer.word_embeddings.weight": (v, d), "transformer.final_layernorm.weight": (d,),
              "transformer.final_layernorm.bias": (d,), "lm_head.weight": (v, d)}
    for i in range(hf["num_layers"]):
        b = f"transformer.layers.{i}."
        shapes.update({b + "input_layernorm.weight": (d,), b + "input_layernorm.bias": (d,),
                       b + "attention.query_key_value.weight": (3 * d, d), b + "attention.query_key_value.bias": (3 * d,),
                       b + "attention.dense.weight": (d, d), b + "attention.dense.bias": (d,),
                       b + "post_attention_layernorm.weight": (d,), b + "post_attention_layernorm.bias": (d,),
                       b + "mlp.dense_h_to_4h.weight": (f, d), b + "mlp.dense_h_to_4h.bias": (f,),
                       b + "mlp.dense_4h_to_h.weight": (d, f), b + "mlp.dense_4h_to_h.bias": (d,)})
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in sorted(shapes.items()):
        t = torch.randint(-1000, 1001, shape, generator=g).float() / 1000
        out[name] = 1 + 0.2 * t if name.endswith("norm.weight") else 0.3 * t
    return out


@pytest.fixture(scope="module")
def reference():
    return json.loads((DATA / "reference.json").read_text(encoding="utf-8"))


def _folder(folder: Path, images: int = 0) -> Path:
    """A ChatGLM-6B folder as the Hub has it: THUDM's config, tokenizer config and ice_text.model."""
    import shutil

    from safetensors.torch import save_file

    from camelid.tokenizer.thudm import ChatGLM6BBackend
    from camelid.tokenizer.tokenizer import load_sentencepiece

    folder.mkdir(parents=True)
    shutil.copy(DATA / "ice_text.model", folder / "ice_text.model")
    backend = ChatGLM6BBackend(load_sentencepiece(DATA / "ice_text.model"), 0)
    hf = tiny_config({p: backend.token_id(p) for p in ("[MASK]", "[gMASK]", "<sop>", "<eop>")})
    save_file(tiny_weights(hf), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "ChatGLMTokenizer", "bos_token": "<sop>", "eos_token": "<eop>", "mask_token": "[MASK]",
         "gmask_token": "[gMASK]", "pad_token": "<pad>", "unk_token": "<unk>", "num_image_tokens": images}))
    return folder


@pytest.mark.parametrize("images", [0, 20000])
def test_the_tokenizer_is_thudms(images, reference, tmp_path):
    """ids (with [gMASK] <sop> at the end) and decoded text as THUDM's ChatGLMTokenizer gives them, for its
    first release's 20000 image tokens before the text's and its last release's none."""
    from camelid.tokenizer.thudm import load_chatglm6b_tokenizer

    folder = _folder(tmp_path / "m", images)
    tok = load_chatglm6b_tokenizer(folder, json.loads((folder / "tokenizer_config.json").read_text()), {})
    cases = reference["tokens"][str(images)]
    assert [c["text"] for c in cases] == TEXTS
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"][:-2]) == case["decoded"], case["text"]
    assert tok.encode("Hello world", bos=False) == cases[0]["ids"][:-2]  # a template's text: no [gMASK] <sop>


def test_logits_and_greedy_replies_are_thudms(reference, tmp_path):
    from camelid.generate.generate import generate
    from camelid.generate.sampling import SamplingParams

    lm = load_model(_folder(tmp_path / "m"))
    assert lm.config.arch == "chatglm6b" and lm.template == "chatglm"
    for case in reference["model"]:
        ids = lm.tokenizer.encode(case["prompt"])
        assert ids == case["ids"]
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids]))[0]
        torch.testing.assert_close(logits[:, :128], torch.tensor(case["logits"]), atol=1e-4, rtol=0)
        torch.testing.assert_close(logits.logsumexp(-1), torch.tensor(case["logsumexp"]), atol=1e-4, rtol=0)
        assert logits.argmax(-1).tolist() == case["argmax"]
    replies = generate(lm, [c["prompt"] for c in reference["model"]], 12, SamplingParams.greedy())
    for case, reply in zip(reference["model"], replies):  # a batch of unequal prompts: each as THUDM alone
        want = case["greedy"]
        assert reply.tokens == (want[:-1] if want[-1] in lm.tokenizer.eos_ids else want), case["prompt"]


def test_chat_renders_thudms_rounds(reference, tmp_path):
    """THUDM's chat() prompt: "[Round n]\\n问：...\\n答：" rounds, each earlier reply ending in a newline, which
    its tokenizer ends with [gMASK] <sop>."""
    from camelid.tokenizer.chat_template import render_chat

    lm = load_model(_folder(tmp_path / "m"))
    messages = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am a king."},
                {"role": "user", "content": "Of what?"}]
    text = render_chat(lm.template, messages, lm.tokenizer.special_tokens_map, add_generation_prompt=True)
    assert text == reference["model"][2]["prompt"] + "[gMASK]<sop>"
    assert lm.tokenizer.encode(text, bos=False) == reference["model"][2]["ids"]


def test_generate_chat_and_convert_from_the_command_line(tmp_path, monkeypatch):
    """generate prints the greedy reply; chat answers two rounds, each prompt the whole conversation in THUDM's
    rounds; convert writes THUDM's layout back; the paths that cut, page or share prompts refuse it by name."""
    import io

    from conftest import run_main

    folder = _folder(tmp_path / "m")
    run = run_main("generate", folder, "Once upon a time there was", "-n", "6", "--temperature", "0")
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    monkeypatch.setattr("sys.stdin", io.StringIO("Who are you?\nOf what?\n/exit\n"))
    run = run_main("chat", folder, "-n", "5", "--temperature", "0")
    assert run.returncode == 0, run.stderr
    assert run_main("convert", folder, tmp_path / "hf", "--to", "hf").returncode == 0
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["position_encoding_2d"] and written["inner_hidden_size"] == 96
    a, b = load_model(folder), load_model(tmp_path / "hf")
    ids = torch.tensor([a.tokenizer.encode("Once upon a time")])
    with torch.no_grad():
        torch.testing.assert_close(a.model(ids), b.model(ids), atol=0, rtol=0)
    for command in (["eval", folder, "--tasks", "perplexity", "--data", folder / "config.json"], ["serve", folder],
                    ["generate", folder, "x", "--lookup"],
                    ["quantize", folder, tmp_path / "g", "--method", "gptq", "--mode", "int4", "--calibration",
                     folder / "config.json"]):
        run = run_main(*command)
        assert run.returncode == 1 and "ChatGLM-6B" in run.stderr, run.stderr


def test_bad_configs_are_named(tmp_path):
    folder = _folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    for key, value in (("quantization_bit", 4), ("pre_seq_len", 128), ("position_encoding_2d", False)):
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CamelidError, match=key):
            load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "bos_token_id": 7}))
    with pytest.raises(CamelidError, match="bos_token_id=7"):
        load_model(folder)
