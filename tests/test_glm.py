"""ChatGLM2/3 and GLM-4 in THUDM's own layout (`ChatGLMModel`): the weights of a transformers GLM model renamed
as transformers' GLM conversion script maps them (its STATE_DICT_MAPPING and convert_config, read backwards)
give transformers' logits in camelid, and go back out in that layout, to GGUF as llama.cpp's `chatglm` with a
fused attn_qkv, and into llama.cpp. The chat format against llama.cpp's built-in chatglm4 template."""

import ctypes
import json

import numpy as np
import pytest
import torch
from test_gguf import llama_cpp_logits

from camelid.errors import CamelidError
from camelid.formats import hf as hf_format
from camelid.formats.gguf_export import export_gguf
from camelid.formats.gguf_file import read_gguf
from camelid.formats.load import build_model, export_hf, load_model
from camelid.formats.loaded import LoadedModel
from camelid.tokenizer.chat_template import render_chat
from camelid.tokenizer.piece_vocab import PieceVocab
from camelid.tokenizer.tokenizer import load_hf_tokenizer, piece_tokenizer

from conftest import SHARED

IDS = [5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 9]


def _transformers_glm(rope_theta: float):
    import transformers as tf

    cfg = tf.GlmConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=None,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                                          "partial_rotary_factor": 0.5})
    torch.manual_seed(3)
    model = tf.GlmForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _thudm_folder(model, folder, rope_ratio: float):
    """The model as THUDM ships ChatGLM3 / GLM-4-9B-chat: config.json keys and tensor names."""
    from safetensors.torch import save_file

    cfg = model.config
    sd = {"transformer.embedding.word_embeddings.weight": model.model.embed_tokens.weight,
          "transformer.encoder.final_layernorm.weight": model.model.norm.weight,
          "transformer.output_layer.weight": model.lm_head.weight,
          "transformer.rotary_pos_emb.inv_freq": torch.ones(4)}  # a buffer THUDM's checkpoints carry
    for i, layer in enumerate(model.model.layers):
        b, a = f"transformer.encoder.layers.{i}.", layer.self_attn
        for p in ("weight", "bias"):
            sd[f"{b}self_attention.query_key_value.{p}"] = torch.cat(
                [getattr(a.q_proj, p), getattr(a.k_proj, p), getattr(a.v_proj, p)])
        sd.update({f"{b}input_layernorm.weight": layer.input_layernorm.weight,
                   f"{b}post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                   f"{b}self_attention.dense.weight": a.o_proj.weight,
                   f"{b}mlp.dense_h_to_4h.weight": layer.mlp.gate_up_proj.weight,
                   f"{b}mlp.dense_4h_to_h.weight": layer.mlp.down_proj.weight})
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    config = dict(model_type="chatglm", architectures=["ChatGLMModel"], padded_vocab_size=cfg.vocab_size,
                  hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
                  num_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  multi_query_attention=True, multi_query_group_num=cfg.num_key_value_heads,
                  kv_channels=cfg.head_dim, seq_length=cfg.max_position_embeddings, layernorm_epsilon=1e-5,
                  rope_ratio=rope_ratio, rmsnorm=True, apply_residual_connection_post_layernorm=False,
                  post_layer_norm=True, add_qkv_bias=True, add_bias_linear=False, original_rope=True,
                  hidden_dropout=0.0, attention_dropout=0.0, use_cache=True, eos_token_id=2, pad_token_id=0)
    (folder / "config.json").write_text(json.dumps(config))
    return sd


@pytest.fixture(scope="module")
def thudm(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm")
    model = _transformers_glm(rope_theta=500.0)
    sd = _thudm_folder(model, root / "chatglm", rope_ratio=0.05)  # 10000 x 0.05: the base transformers' has
    with torch.no_grad():
        want = model(torch.tensor([IDS])).logits[0].numpy()
    return root, sd, want


def _vocab_tokenizer(n: int):
    vocab = PieceVocab([f"<{i}>" for i in range(n)], [0.0] * n, special_ids={0, 1, 2})
    return piece_tokenizer(vocab, 1, [2])


def _thudm_model(folder):
    cfg, sd = hf_format.load_hf_folder(folder)
    return build_model(cfg, sd, str(folder))


def test_thudm_layout_gives_transformers_logits_and_goes_back_out_as_it_came(thudm):
    root, sd, want = thudm
    model = _thudm_model(root / "chatglm")
    assert model.cfg.arch == "chatglm" and model.cfg.rotary_dim == 8 and model.cfg.rope_theta == 500.0
    np.testing.assert_allclose(model(torch.tensor([IDS]))[0].detach().numpy(), want, atol=1e-4, rtol=0)
    out = root / "out"
    export_hf(LoadedModel(model, _vocab_tokenizer(512)), out)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(sd) - {"transformer.rotary_pos_emb.inv_freq"}
    back = json.loads((out / "config.json").read_text())
    assert (back["model_type"], back["rope_ratio"], back["multi_query_group_num"]) == ("chatglm", 0.05, 2)
    np.testing.assert_allclose(load_model(out).model(torch.tensor([IDS]))[0].detach().numpy(), want, atol=1e-4,
                               rtol=0)


def test_thudm_layout_to_gguf_runs_in_llama_cpp(thudm):
    """camelid writes llama.cpp's chatglm architecture with THUDM's fused attn_qkv (as llama.cpp's converter
    does from that layout); llama.cpp computes the same logits, and the file reads back as it was."""
    root, _, want = thudm
    lm = LoadedModel(_thudm_model(root / "chatglm"), _vocab_tokenizer(512), "raw", [], "chatglm")
    path = export_gguf(lm, root / "gguf", "f32")
    gf = read_gguf(path)
    assert gf.metadata["general.architecture"] == "chatglm" and "blk.0.attn_qkv.bias" in gf.tensors
    assert gf.metadata["chatglm.rope.dimension_count"] == 8
    np.testing.assert_allclose(llama_cpp_logits(path, IDS), want, atol=1e-3, rtol=0)
    back = load_model(path)
    assert back.config.arch == "chatglm"
    np.testing.assert_allclose(back.model(torch.tensor([IDS]))[0].detach().numpy(), want, atol=1e-4, rtol=0)


def test_chatglm_configs_camelid_cannot_run_are_named(tmp_path):
    base = dict(model_type="chatglm", hidden_size=64, num_layers=2, num_attention_heads=4, padded_vocab_size=96,
                ffn_hidden_size=96)
    for extra, message in ((dict(position_encoding_2d=False, inner_hidden_size=256), "position_encoding_2d=false"),
                           (dict(rmsnorm=False), "rmsnorm=False is not supported"),
                           (dict(apply_residual_connection_post_layernorm=True),
                            "apply_residual_connection_post_layernorm=True"),
                           (dict(num_layers="2"), "num_layers must be an integer")):
        folder = tmp_path / str(len(message))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(CamelidError, match=message):
            hf_format.load_hf_folder(folder)


def _llama_cpp_template(name: str, messages: list[dict], add_ass: bool) -> str:
    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(messages), add_ass, buf, len(buf))
    assert 0 < n < len(buf)
    return buf.raw[:n].decode()


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}],
])
def test_chatglm4_template_is_llama_cpps(messages):
    for add in (True, False):
        assert render_chat("chatglm4", messages, {}, add_generation_prompt=add) == \
            _llama_cpp_template("chatglm4", messages, add)


def test_thudm_tokenizers_are_read_as_their_code_and_replaced_on_request(thudm, tmp_path):
    """A THUDM folder's ChatGLMTokenizer over tokenizer.model is read as its code computes it (the role tokens
    after the SentencePiece pieces: tests/test_thudm_tokenizers.py checks it against that code), and a model
    whose embedding has no rows for them is refused; GLM-4's tokenizer needs tiktoken's ranks (its own test is
    in test_thudm_tokenizers.py), and --tokenizer replaces a folder's tokenizer."""
    import shutil

    root, _, want = thudm
    folder = tmp_path / "chatglm3"
    shutil.copytree(root / "chatglm", folder)
    shutil.copy(SHARED / "models" / "stories260K" / "tok512.model", folder / "tokenizer.model")  # any SentencePiece
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    tok = load_hf_tokenizer(folder, {"eos_token_id": 2})
    assert tok.token_id("<|user|>") == 512 + 6 and tok.encode("Hi")[:2] == [512 + 1, 512 + 3]  # [gMASK] sop
    with pytest.raises(CamelidError, match="eos_token_id 518 is not a token id of the vocabulary"):
        load_model(folder)  # this tiny model's 512 rows hold no role tokens
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    with pytest.raises(CamelidError, match="tokenizer.model: not a tiktoken file"):
        load_model(folder)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(CamelidError, match="ChatGLM4Tokenizer .THUDM's code over tokenizer.model.*--tokenizer"):
        load_model(folder)
    shutil.copy(SHARED / "models" / "stories260K" / "tok512.model", folder / "tokenizer.model")
    lm = load_model(folder, tokenizer_path=folder / "tokenizer.model")
    assert lm.tokenizer.vocab_size == 512 and lm.template == "chatglm3"  # FastChat's, by the folder's name
