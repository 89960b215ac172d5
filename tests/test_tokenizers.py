"""Tokenizers against llama.cpp's own test vectors, SentencePiece and Hugging Face tokenizers."""

import pytest

from camelid.formats.gguf_file import read_gguf_metadata
from camelid.tokenizer.gguf_vocab import gguf_tokenizer
from camelid.tokenizer.piece_vocab import read_llama2c_tokenizer
from camelid.tokenizer.storage import load_saved_tokenizer, save_tokenizer
from camelid.tokenizer.tokenizer import HFBackend, SentencePieceBackend, Tokenizer, load_sentencepiece, piece_tokenizer

from conftest import REPO, SHARED, STORIES

TOK = SHARED / "tokenizers"
TEXTS = ["Hello world", " Hello, world!", "Füh 🦙 ½ — 我想在apple工作", "  two  spaces\n\nand\ttabs ",
         "Once upon a time, there was a little girl named Lily.", ""]


def vectors(name):
    base = TOK / f"ggml-vocab-{name}.gguf"
    if not base.exists():
        pytest.skip(f"{base} not found")
    inputs = (TOK / f"{base.name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = (TOK / f"{base.name}.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) > 40
    return base, [(s, [int(x) for x in o.split()]) for s, o in zip(inputs, outputs)]


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])
def test_gguf_vocab_passes_llama_cpp_test_vectors(name):
    base, cases = vectors(name)
    tok = gguf_tokenizer(read_gguf_metadata(base), str(base))
    for text, expected in cases:
        assert tok.encode(text, bos=False) == expected, text


def test_sentencepiece_and_hf_json_pass_the_same_vectors():
    _, spm_cases = vectors("llama-spm")
    sp = Tokenizer(SentencePieceBackend(load_sentencepiece(TOK / "llama2_tokenizer.model")), 1, [2])
    for text, expected in spm_cases:
        assert sp.encode(text, bos=False) == expected, text
    from tokenizers import Tokenizer as HFTokenizer

    _, bpe_cases = vectors("gpt-2")
    hf = Tokenizer(HFBackend(HFTokenizer.from_file(str(TOK / "gpt2_tokenizer.json"))), None, [50256], False)
    for text, expected in bpe_cases:
        assert hf.encode(text) == expected, text


def test_gguf_spm_bos_and_special_tokens():
    base, _ = vectors("llama-spm")
    tok = gguf_tokenizer(read_gguf_metadata(base))
    assert tok.encode("Hello world")[:1] == [1] and tok.add_bos
    assert tok.encode("<s>[INST] hi [/INST]", bos=False)[0] == 1  # special text becomes the token id
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_llama2c_tokenizer_bin_matches_sentencepiece_model():
    vocab = read_llama2c_tokenizer(STORIES / "tok512.bin", 512)
    ours = piece_tokenizer(vocab, 1, [2])
    sp = load_sentencepiece(STORIES / "tok512.model")
    # tok512.model collapses repeated and leading whitespace (SentencePiece's training default); run.c,
    # the reference for tokenizer.bin, does not, so compare on text where the two normalisations agree.
    for text in [t for t in TEXTS if t == " ".join(t.split())]:
        assert ours.encode(text, bos=False) == sp.encode(text), text
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))


@pytest.mark.parametrize("kind", ["gguf-spm", "gguf-bpe", "sentencepiece", "llama2c"])
def test_streaming_decode_equals_full_decode(kind):
    tok = _tokenizer(kind)
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        stream = tok.stream()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids), text
        assert all("\ufffd" not in p for p in pieces)


def test_streaming_holds_back_partial_utf8():
    tok = _tokenizer("gguf-spm")
    ids = tok.encode("🦙", bos=False)
    assert len(ids) > 2  # the llama emoji is four byte tokens in LLaMA's vocabulary
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]


@pytest.mark.parametrize("kind", ["gguf-spm", "gguf-bpe", "sentencepiece", "llama2c"])
def test_saved_tokenizer_round_trips(kind, tmp_path):
    tok = _tokenizer(kind)
    again = load_saved_tokenizer(tmp_path, save_tokenizer(tok, tmp_path))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.eos_ids, again.add_bos) == (tok.bos_id, tok.eos_ids, tok.add_bos)


def _tokenizer(kind):
    if kind == "gguf-spm":
        return gguf_tokenizer(read_gguf_metadata(TOK / "ggml-vocab-llama-spm.gguf"))
    if kind == "gguf-bpe":
        return gguf_tokenizer(read_gguf_metadata(TOK / "ggml-vocab-gpt-2.gguf"))
    if kind == "sentencepiece":
        return Tokenizer(SentencePieceBackend(load_sentencepiece(TOK / "llama2_tokenizer.model")), 1, [2])
    return piece_tokenizer(read_llama2c_tokenizer(STORIES / "tok512.bin", 512), 1, [2])


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])
def test_gguf_metadata_reader_agrees_with_gguf_py(name):
    from gguf import GGUFReader

    base, _ = vectors(name)
    ours = read_gguf_metadata(base)
    ref = {k: f.contents() for k, f in GGUFReader(str(base)).fields.items() if not k.startswith("GGUF.")}
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value) if isinstance(value, (float, list)) and value and \
            isinstance(value if isinstance(value, float) else value[0], float) else ours[key] == value, key


def test_bad_gguf_files(tmp_path):
    from camelid.errors import CamelidError

    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(CamelidError, match="no GGUF magic"):
        read_gguf_metadata(tmp_path / "x.gguf")
    (tmp_path / "t.gguf").write_bytes((TOK / "ggml-vocab-llama-spm.gguf").read_bytes()[:5000])
    with pytest.raises(CamelidError, match="truncated"):
        read_gguf_metadata(tmp_path / "t.gguf")


# llama.cpp's vocabularies, from the llama-cpp-python source distribution (`make test` fetches them)
LLAMA_CPP_VOCABS = REPO / ".cache" / "llama.cpp" / "models"
READ = ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe", "llama-spm", "mpt", "phi-3",
        "qwen2", "qwen35", "refact", "starcoder", "aquila", "baichuan", "gpt-neox", "bert-bge", "nomic-bert-moe",
        "gemma-4"]


def _llama_cpp_vocab(name: str):
    path = LLAMA_CPP_VOCABS / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not found (make test downloads llama.cpp's reference vocabularies)")
    return path


def _strings() -> list[str]:
    """llama.cpp's test strings (the broadest of its sets) and a few of ours."""
    inp = _llama_cpp_vocab("llama-bpe").with_suffix(".gguf.inp").read_text(encoding="utf-8")
    return inp.split("\n__ggml_vocab_test__\n")[:-1] + TEXTS


@pytest.mark.parametrize("name", READ)
def test_every_llama_cpp_vocabulary_tokenizes_as_llama_cpp_does(name):
    """Each vocabulary type and pre-tokenizer, against llama.cpp itself on its own test strings, and against
    its stored test vectors where the file has them."""
    import llama_cpp

    path = _llama_cpp_vocab(name)
    ours = gguf_tokenizer(read_gguf_metadata(path), str(path))
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in _strings():
        expected = ref.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []
        assert ours.encode(text, bos=False) == expected, (name, text)
    stored = path.with_suffix(".gguf.out")
    if stored.exists():
        inputs = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
        for text, line in zip(inputs, stored.read_text(encoding="utf-8").split("\n")):
            assert ours.encode(text, bos=False) == [int(x) for x in line.split()], (name, text)


@pytest.mark.parametrize("model,pre", [("gpt2", "kimi-k2"), ("gpt2", "afmoe"), ("gpt2", "whitespace"),
                                       ("gpt2", "no-such-pre"), ("rwkv", "default"), ("plamo2", "default")])
def test_vocabularies_camelid_does_not_read_are_refused_by_name(model, pre):
    """What llama.cpp tokenizes with code of its own (Kimi K2's and AFMoE's digit and Han rules, Jina's
    whitespace splitter, RWKV's and PLaMo 2's tokenizers): a one-line error naming it."""
    from camelid.errors import CamelidError

    meta = dict(read_gguf_metadata(_llama_cpp_vocab("gpt-2")), **{"tokenizer.ggml.model": model,
                                                                  "tokenizer.ggml.pre": pre})
    with pytest.raises(CamelidError, match=f"{model if model != 'gpt2' else pre}.* is not supported"):
        gguf_tokenizer(meta, "x.gguf")
