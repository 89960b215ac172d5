"""T5 as llama.cpp runs it (its `t5` architecture, with T5's SentencePiece unigram vocabulary as its UGM
tokenizer): files made by llama.cpp's own converter load in camelid with transformers' logits and tokenize as
llama.cpp tokenizes; llama.cpp's encoder and decoder agree with camelid on them; camelid's own export runs in
llama.cpp and reads back.

llama.cpp's graph does not scale a tied output layer by dim^-0.5 as T5 (v1.0) does: on a converter's file of
such a model its logits are camelid's (and transformers') divided by that scale. camelid's export writes the
scaled table as the output layer, so llama.cpp computes transformers' logits from it."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from test_t5 import _folder, _greedy

from camelid.formats.load import load_model

from conftest import REPO, run_main, shared_file

llama_cpp = pytest.importorskip("llama_cpp")
CONVERTER = REPO / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"
SRC = [[45, 117, 3, 44, 90, 12, 7, 161, 33, 200, 80, 9, 1]]
TGT = [[0, 14, 62, 7, 30, 91, 2, 250]]
TEXTS = ["Once upon a time", "  two  spaces\tand a tab  ", "ＦＵＬＬ width and ﬁ ligatures", "é, è and ê",
         "KING HENRY:\nWhat say you?", "", "unknownword ζ∑ 日本"]


def _unigram_model(folder):
    """A SentencePiece unigram vocabulary laid out as T5's (pad 0, EOS 1, unknown 2, no BOS; NFKC normalization)."""
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text(shared_file("corpora/tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000])
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "spiece"), vocab_size=400,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   normalization_rule_name="nmt_nfkc", minloglevel=2, num_threads=1)
    return folder / "spiece.model"


def _reference(gated: bool, vocab: int):
    """(The converter maps a decoder no deeper than the encoder.)"""
    import transformers as tf

    cfg = tf.T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu" if gated else "relu",
                      tie_word_embeddings=not gated, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(1)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    if gated:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=["t5", "flan-t5"])
def converted(request, tmp_path_factory):
    """(name, transformers model, HF folder, the converter's F32 file)."""
    if not CONVERTER.exists():
        pytest.skip(f"{CONVERTER} not found (make test unpacks llama.cpp's converter)")
    pytest.importorskip("google.protobuf")  # the converter reads spiece.model through it
    import shutil

    folder = tmp_path_factory.mktemp(request.param)
    gated = request.param == "flan-t5"
    spiece = _unigram_model(folder)
    ref = _reference(gated, 400)
    _folder(ref, folder / "hf", gated=gated)
    shutil.copy(spiece, folder / "hf" / "spiece.model")
    f32 = folder / "model-F32.gguf"
    run = subprocess.run([sys.executable, str(CONVERTER), str(folder / "hf"), "--outfile", str(f32), "--outtype",
                          "f32"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return request.param, ref, folder / "hf", f32


def _transformers_logits(ref, src=SRC, tgt=TGT) -> np.ndarray:
    with torch.no_grad():
        return ref(input_ids=torch.tensor(src), decoder_input_ids=torch.tensor(tgt)).logits[0].numpy()


def _camelid_logits(path, src=SRC, tgt=TGT) -> np.ndarray:
    model = load_model(path).model
    with torch.no_grad():
        return model(torch.tensor(tgt), model.encode(torch.tensor(src)), keep_cache=False)[0].numpy()


def llama_cpp_seq2seq_logits(path, src: list[int], tgt: list[int]) -> np.ndarray:
    """llama.cpp's logits for the decoder tokens `tgt` (from its start token) after encoding `src`."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, n_batch=128, logits_all=True, verbose=False)
    assert llama_cpp.llama_model_has_encoder(llm.model)
    assert llama_cpp.llama_model_decoder_start_token(llm.model) == tgt[0]
    llm._batch.set_batch(src, 0, logits_all=False)
    llm._ctx.encode(llm._batch)
    llm._batch.set_batch(tgt, 0, logits_all=True)
    llm._ctx.decode(llm._batch)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)
    return np.ctypeslib.as_array(ptr, shape=(len(tgt) * n_vocab,)).reshape(len(tgt), n_vocab).copy()


def test_the_converters_files_give_transformers_logits_and_greedy_text(converted):
    name, ref, _, f32 = converted
    lm = load_model(f32)
    assert (lm.config.logit_scale is None) == (name == "flan-t5")
    assert lm.config.n_encoder_layers == 3 and lm.config.n_layers == 2
    np.testing.assert_allclose(_camelid_logits(f32), _transformers_logits(ref), atol=1e-4, rtol=0)
    expected = _greedy(ref, torch.tensor(SRC), 10)
    cache, tokens = lm.model.encode(torch.tensor(SRC)), [0]
    with torch.no_grad():
        for _ in range(10):
            tokens.append(int(lm.model(torch.tensor([tokens[-1:]]), cache)[0, -1].argmax()))
    assert tokens == expected


def test_the_unigram_vocabulary_tokenizes_as_llama_cpp_and_sentencepiece(converted):
    import sentencepiece as spm

    _, _, hf, f32 = converted
    ours = load_model(f32).tokenizer
    theirs = llama_cpp.Llama(model_path=str(f32), vocab_only=True, verbose=False)
    sp = spm.SentencePieceProcessor(model_file=str(hf / "spiece.model"))
    for text in TEXTS:
        want = theirs.tokenize(text.encode(), add_bos=True, special=False)  # T5's vocabulary appends EOS
        assert want == sp.encode(text) + [1], text
        assert ours.encode(text, bos=False) + ours.eos_ids[:1] == want, text
    assert ours.decode(sp.encode("Once upon a time")) == "Once upon a time"


def test_llama_cpp_runs_them_as_camelid_does(converted):
    name, _, _, f32 = converted
    ours, lm = _camelid_logits(f32), load_model(f32)
    ref = llama_cpp_seq2seq_logits(f32, SRC[0], TGT[0])
    if name == "t5":  # llama.cpp leaves the tied output unscaled
        ref = ref * lm.config.logit_scale
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] >= 0.9999
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_camelids_export_runs_in_llama_cpp_with_transformers_logits(converted, tmp_path):
    """`camelid export --gguf` from the Hugging Face folder: llama.cpp gives transformers' logits (the tied
    T5's output scaled into its own table), its tokenizer is the file's, and camelid reads it back."""
    name, ref, hf, _ = converted
    assert run_main("export", str(hf), str(tmp_path / "out"), "--gguf", "--quant", "f32").returncode == 0
    f32 = next((tmp_path / "out").glob("*-F32.gguf"))
    want = _transformers_logits(ref)
    np.testing.assert_allclose(llama_cpp_seq2seq_logits(f32, SRC[0], TGT[0]), want, atol=2e-3, rtol=0)
    np.testing.assert_allclose(_camelid_logits(f32), want, atol=1e-4, rtol=0)
    theirs = llama_cpp.Llama(model_path=str(f32), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert theirs.tokenize(text.encode(), add_bos=True, special=False) == \
            load_model(hf).tokenizer.encode(text, bos=False) + [1], text
    assert run_main("export", str(hf), str(tmp_path / "out"), "--gguf", "--quant", "q8_0").returncode == 0
    q8 = next((tmp_path / "out").glob("*-Q8_0.gguf"))
    ours, theirs = _camelid_logits(q8), llama_cpp_seq2seq_logits(q8, SRC[0], TGT[0])
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.999


def test_t5_files_and_models_llama_cpp_cannot_run_are_named(converted, tmp_path):
    """umT5's relative position bias in every block, a file without the encoder's, and a model whose buckets
    reach past llama.cpp's 128 positions: one-line errors naming the tensor or the reason."""
    from camelid.errors import CamelidError
    from camelid.formats.gguf import config_from_gguf
    from camelid.formats.gguf_file import read_gguf

    _, _, _, f32 = converted
    gf = read_gguf(f32)
    gf.tensors["enc.blk.1.attn_rel_b.weight"] = gf.tensors["enc.blk.0.attn_rel_b.weight"]
    with pytest.raises(CamelidError, match="'enc.blk.1.attn_rel_b.weight': a relative position bias in every block"):
        config_from_gguf(gf)
    gf = read_gguf(f32)
    del gf.tensors["enc.blk.0.attn_rel_b.weight"]
    with pytest.raises(CamelidError, match="'enc.blk.0.attn_rel_b.weight' should hold 32 buckets for 4 heads"):
        config_from_gguf(gf)
    import shutil

    from test_t5 import _vocab_folder

    from conftest import SHARED

    _vocab_folder(tmp_path / "far", 512)  # its buckets reach 20 positions
    shutil.copy(SHARED / "models" / "stories260K" / "tok512.model", tmp_path / "far" / "spiece.model")
    run = run_main("export", tmp_path / "far", tmp_path / "out", "--gguf", "--quant", "f32")
    assert run.returncode == 1 and "variant llama.cpp's graph does not compute" in run.stderr
