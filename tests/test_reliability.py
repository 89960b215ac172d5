"""Bad input as a careless user or an attacker gives it: one line, a non-zero exit, nothing lost or left
half-written. Table-driven: each row is a defect that once printed a traceback or did harm."""

import errno
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.files import MARKER

from conftest import REPO

MODEL = REPO / "models" / "stories260K"


def one_line_error(args, capsys, *needles):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("camelid: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from camelid.formats.load import export_hf, load_model

    folder = tmp_path_factory.mktemp("hf") / "stories-hf"
    export_hf(load_model(MODEL), folder)
    return folder


def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _model_key(key, value):
    return lambda m: _edit_json(m / "camelid.json", lambda d: d["model"].__setitem__(key, value))


def _meta(edit):
    return lambda m: _edit_json(m / "camelid.json", edit)


def _write(name, content):
    def apply(m):
        (m / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return apply


MODEL_KEY_CASES = [
    (_model_key("n_kv_heads", 0), "n_kv_heads must be a positive integer"),
    (_model_key("head_dim", -8), "head_dim must be a positive integer"),
    (_model_key("rope_theta", "abc"), "rope_theta must be a number"),
    (_model_key("activation", ["silu"]), "activation must be a string"),
    (_model_key("rope_scaling", "linear"), "rope_scaling must be an object"),
    (_model_key("rope_scaling", {"type": "ntk-by-parts", "factor": 4.0}), "rope_scaling type 'ntk-by-parts' is not supported"),
    (_model_key("rope_scaling", {"type": "yarn", "factor": 4.0}), "rope_scaling.original_max_position_embeddings must be"),
    (_model_key("norm_eps", "x"), "norm_eps must be a number"),
    (_model_key("tie_embeddings", "no"), "tie_embeddings must be true or false"),
]
NATIVE_CASES = MODEL_KEY_CASES + [
    (_write("camelid.json", b'{"model": "\xff"}'), "not UTF-8 text"),
    (_write("camelid.json", "[1, 2]"), "must be an object, not list"),
    (_meta(lambda d: d.__setitem__("tokenizer", "tok")), "'tokenizer' must be an object"),
    (_meta(lambda d: d.__setitem__("chat", [])), "'chat' must be an object"),
    (_meta(lambda d: d.__setitem__("chat", {"template": 5})), "chat.template must be a string"),
    (_meta(lambda d: d.__setitem__("chat", {"stop": "abc"})), "chat.stop must be a list of strings"),
    (_meta(lambda d: d["tokenizer"].__setitem__("bos_id", 99999)), "bos_token_id 99999 is not a token id"),
    (_meta(lambda d: d["tokenizer"].__setitem__("bos_id", -5)), "bos_token_id -5 is not a token id"),
    (lambda m: (m / "tokenizer.pieces.json").write_text((m / "tokenizer.pieces.json").read_text()[:100]),
     "tokenizer.pieces.json:1: invalid JSON"),
    (_write("tokenizer.pieces.json", '{"pieces": "abc"}'), "'pieces' is missing or not a list"),
    (lambda m: _edit_json(m / "tokenizer.pieces.json", lambda d: d.__setitem__("pieces", d["pieces"][:2])),
     "one number in 'scores' for each"),
]


@pytest.mark.parametrize("edit,needle", NATIVE_CASES, ids=[c[1][:40] for c in NATIVE_CASES])
def test_broken_camelid_folders(edit, needle, tmp_path, capsys):
    folder = _copy(MODEL, tmp_path)
    edit(folder)
    one_line_error(["generate", folder, "Once", "-n", "2"], capsys, needle)
    if (edit, needle) in MODEL_KEY_CASES:  # `info` reads the config without the weights: it fails the same way
        one_line_error(["info", folder], capsys, needle)


def _hf_config(key, value):
    return lambda m: _edit_json(m / "config.json", lambda d: d.__setitem__(key, value))


HF_CASES = [
    (_hf_config("num_key_value_heads", 0), "n_kv_heads must be a positive integer"),
    (_hf_config("hidden_act", ["silu"]), "hidden_act must be a string"),
    (_hf_config("rms_norm_eps", "x"), "rms_norm_eps must be a number"),
    (_hf_config("rope_scaling", "linear"), "rope_scaling must be an object"),
    (_hf_config("tie_word_embeddings", "no"), "tie_word_embeddings must be true or false"),
    (_hf_config("num_attention_heads", 0), "n_heads must be a positive integer"),
    (_write("config.json", "[]"), "must be an object"),
    (lambda m: _edit_json(m / "generation_config.json", lambda d: d.__setitem__("bos_token_id", 99999)),
     "bos_token_id 99999"),
    (lambda m: _edit_json(m / "tokenizer_config.json", lambda d: d.__setitem__("chat_template", 5)),
     "chat_template must be a string"),
    (_write("model.safetensors.index.json", '{"weight_map": {"a": 5}}'), "not a valid shard index"),
    (_write("model.safetensors.index.json", b'{"weight_map": {"a": "\xff"}}'), "not UTF-8 text"),
]


@pytest.mark.parametrize("edit,needle", HF_CASES, ids=[c[1][:40] for c in HF_CASES])
def test_broken_hugging_face_folders(edit, needle, hf_folder, tmp_path, capsys):
    folder = _copy(hf_folder, tmp_path)
    edit(folder)
    one_line_error(["generate", folder, "Once", "-n", "2"], capsys, needle)


def _llama2c(tmp_path, data: bytes):
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data,needle", [
    (b"", "too short for a llama2.c checkpoint"),
    (struct.pack("<I", 0x616B3432) + b"\0" * 32, "header of 36 bytes"),
    (struct.pack("<7i", 6, 8, 1, 2, 2, 32, 16) + b"\0" * 4000, "must be even"),  # head_dim 3
], ids=["empty", "short-v1-header", "odd-head-dim"])
def test_broken_llama2c_files(data, needle, tmp_path, capsys):
    one_line_error(["info", _llama2c(tmp_path, data)], capsys, needle)


def test_bad_flags_and_inputs(tmp_path, capsys):
    import torch

    not_utf8 = tmp_path / "prompts.txt"
    not_utf8.write_bytes(b"caf\xe9\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = [
        (["generate", MODEL, "Once", "--threads", "-1"], "--threads -1"),
        (["generate", MODEL, "Once", "--device", "cuda:abc"], "--device 'cuda:abc'"),
        (["generate", MODEL, "--file", not_utf8], "not UTF-8 text (byte 0xe9 at offset 3)"),
        (["generate", MODEL, "Once", "--temperature", "1e-300"], "temperature must be 0 (greedy) or at least"),
        (["generate", MODEL, "Once", "--temperature", "inf"], "temperature must be a finite number"),
        (["generate", MODEL, "Once", "--seed", "1180591620717411303424"], "seed must be an integer in"),
        (["info", MODEL, "--context", "-1"], "--context -1"),
        (["estimate", MODEL, "--context", "-5"], "--context -5"),
        (["eval", MODEL, "--tasks", "perplexity", "--data", empty], "no text to score"),
        (["eval", MODEL, "--tasks", "perplexity", "--data", empty, "--max-length", "0"], "--max-length 0"),
        (["eval", MODEL, "--tasks", "perplexity", "--data", empty, "--output", "/proc/x.json"], "cannot be written"),
        (["data", "prepare", empty, "--out", a_file], "exists and is not a folder"),
        (["data", "prepare", empty, "--out", tmp_path / "p", "--workers", "0"], "--workers 0"),
        (["data", "prepare", nested, "--out", tmp_path / "n"], "nested.jsonl:1"),
        (["data", "tokenize", empty, "--tokenizer", empty, "--out", tmp_path / "t", "--workers", "0"], "--workers 0"),
        (["pretrain", "max_steps=["], "override 'max_steps=['"),
        (["pretrain", "lr.x=1"], "lr must be a number"),
        (["pretrain", "lr=1", "lr.x=1"], "lr is not a mapping"),
        (["pretrain", "data=x", "tokenizer=y", "model.n_heads=0"], ""),
        (["finetune", f"base={MODEL}", f"data={tmp_path}", "template=alpaca"], "is a folder"),
        (["convert", MODEL, "."], "is not a camelid output"),
        (["convert", MODEL, "/proc/camelid-out"], "/proc"),
        (["serve", MODEL, "--port", "70000"], "--port 70000: must be in 1..65535"),
        (["serve", MODEL, "--host", "999.1.1.1"], "--host '999.1.1.1'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", MODEL, "Once", "--device", "cuda:0"], "no CUDA device"))
    for args, needle in cases:
        one_line_error(args, capsys, needle)
    assert a_file.read_text() == "mine"


def test_convert_never_deletes_a_users_folder_or_file(tmp_path, capsys):
    precious = tmp_path / "x"
    precious.mkdir()
    (precious / "notes.txt").write_text("precious")
    one_line_error(["convert", MODEL, precious], capsys, "is not a camelid output")
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    one_line_error(["convert", MODEL, precious, "--force"], capsys, "is not a camelid output")
    assert (precious / "notes.txt").read_text() == "precious"
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    one_line_error(["convert", MODEL, a_file], capsys, "exists and is not a folder")
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "x"]
    out = tmp_path / "out"
    assert main(["convert", str(MODEL), str(out)]) == 0 and (out / MARKER).exists()
    one_line_error(["convert", MODEL, out], capsys, "pass --force to replace it")
    assert main(["convert", str(MODEL), str(out), "--force", "--template", "vicuna"]) == 0
    assert json.loads((out / "camelid.json").read_text())["chat"]["template"] == "vicuna"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "x"]  # no temporary folders left


@pytest.mark.parametrize("command", [
    ["quantize", MODEL], ["merge", MODEL, "ADAPTER"], ["tokenizer", "train", MODEL / "LICENSE.md", "--out"],
    ["data", "tokenize", MODEL / "LICENSE.md", "--tokenizer", MODEL / "tokenizer.pieces.json", "--out"]],
    ids=["quantize", "merge", "tokenizer-train", "data-tokenize"])
def test_folder_writers_refuse_a_users_folder(command, tmp_path, capsys):
    precious = tmp_path / "x"
    precious.mkdir()
    (precious / "notes.txt").write_text("precious")
    args = [str(a).replace("ADAPTER", str(tmp_path)) for a in command] + [precious]
    one_line_error(args, capsys, "is not a camelid output")
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]


def test_export_keeps_a_users_folder_and_its_own_files(tmp_path, capsys):
    precious = tmp_path / "x"
    precious.mkdir()
    (precious / "notes.txt").write_text("precious")
    one_line_error(["export", MODEL, precious, "--gguf", "--quant", "f32"], capsys, "is not a camelid output")
    out = tmp_path / "gguf"
    assert main(["export", str(MODEL), str(out), "--gguf", "--quant", "f32"]) == 0
    capsys.readouterr()
    one_line_error(["export", MODEL, out, "--gguf", "--quant", "f32"], capsys, "pass --force")
    assert main(["export", str(MODEL), str(out), "--gguf", "--quant", "q8_0"]) == 0  # another quantization
    assert sorted(p.name for p in out.glob("*.gguf")) == ["stories260K-F32.gguf", "stories260K-Q8_0.gguf"]


def test_a_full_disk_is_named_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out.tmp-camelid" / "model.safetensors"))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    one_line_error(["convert", MODEL, tmp_path / "out"], capsys, "model.safetensors: no space left on device")
    assert list(tmp_path.iterdir()) == []


def test_pretraining_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    import torch

    from camelid.train import checkpoint

    def cut_short(_state, path):
        open(path, "wb").write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", cut_short)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(OSError) as exc:
        checkpoint.write_checkpoint(tmp_path, 5, {}, keep_last=2)
    assert exc.value.errno == errno.ENOSPC and "step_00000005.pt" in exc.value.filename
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_tokenizer_train_refuses_inputs_without_text(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"\0\1\2binary" * 100)
    (tmp_path / "b.txt").write_text("")
    for kind in ("bpe", "sentencepiece-unigram"):
        one_line_error(["tokenizer", "train", tmp_path / "a.txt", tmp_path / "b.txt", "--out", tmp_path / "tok",
                        "--kind", kind, "--vocab-size", "300"], capsys, "no text to train on")
        assert not (tmp_path / "tok").exists() and not (tmp_path / "tok.tmp-camelid").exists()


def test_outputs_honour_the_umask(tmp_path):
    """safetensors writes 0600 whatever the umask; every output gets the mode the user's umask gives."""
    code = ("import os, sys; os.umask(0o027); from camelid.cli import main; "
            f"sys.exit(main(['convert', {str(MODEL)!r}, {str(tmp_path / 'out')!r}]))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes


def test_generation_keeps_the_first_tokens_space(capsys):
    assert main(["generate", str(MODEL), "Once", "-n", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")  # llama2.c's run.c prints the same


def test_stream_decoder_continues_the_prompt_as_the_reference_tokenizers_do():
    """Text streamed after a prompt is what the reference decodes for prompt + generation, less the prompt's
    own decoding: SentencePiece itself (Llama 2's model, and llama2.c's pieces against their .model) and
    transformers' byte-level BPE (GPT-2)."""
    import random

    import sentencepiece as spm
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    from camelid.formats.load import load_model
    from camelid.tokenizer.tokenizer import load_tokenizer_file

    from conftest import shared_file

    def sentencepiece(path):
        sp = spm.SentencePieceProcessor(model_file=str(path))
        return lambda ids: sp.decode([i for i in ids if not sp.is_control(i)])

    llama2 = shared_file("tokenizers/llama2_tokenizer.model")
    gpt2 = shared_file("tokenizers/gpt2_tokenizer.json")
    gpt2_ref = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_file(str(gpt2)))
    cases = [(load_tokenizer_file(llama2), sentencepiece(llama2)),
             (load_model(MODEL).tokenizer, sentencepiece(shared_file("models/stories260K/tok512.model"))),
             (load_tokenizer_file(gpt2), gpt2_ref.decode)]
    rng = random.Random(0)
    words = "Once upon a time there was a little café , über naïve 日本語 ! \n token".split(" ")
    for ours, decode in cases:
        for _ in range(20):
            prompt = ours.encode(" ".join(rng.choices(words, k=3)))
            generated = ours.encode(" " + " ".join(rng.choices(words, k=6)), bos=False)
            decoder = ours.stream(prompt)
            streamed = "".join(decoder.push(t) for t in generated) + decoder.flush()
            assert streamed == decode(prompt + generated)[len(decode(prompt)):], (prompt, generated)



def test_stream_decoder_continues_the_prompt_as_llama_cpp_does():
    """llama.cpp's own detokenizer, given the prompt as the tokens before: its SentencePiece and GPT-2 vocabularies."""
    import random

    import llama_cpp

    from camelid.formats.gguf_file import read_gguf
    from camelid.tokenizer.gguf_vocab import gguf_tokenizer

    from conftest import shared_file

    rng = random.Random(1)
    words = "Once upon a time there was a little café , über naïve 日本語 ! \n token".split(" ")
    for name in ("ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"):
        path = shared_file(f"tokenizers/{name}")
        ours = gguf_tokenizer(read_gguf(path).metadata, str(path))
        ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        for _ in range(20):
            prompt = ours.encode(" ".join(rng.choices(words, k=3)))
            generated = ours.encode(" " + " ".join(rng.choices(words, k=6)), bos=False)
            decoder = ours.stream(prompt)
            streamed = "".join(decoder.push(t) for t in generated) + decoder.flush()
            assert streamed == ref.detokenize(generated, prev_tokens=prompt).decode("utf-8"), (name, prompt, generated)


def test_resume_finds_the_newest_intact_checkpoint_and_clears_leftovers(tmp_path, capsys):
    from camelid.train.checkpoint import checkpoint_to_resume, prepare_run_folder, write_checkpoint

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("x")
    with pytest.raises(CamelidError, match="is not a camelid output"):
        prepare_run_folder(user)
    tmp_path = tmp_path / "run"
    prepare_run_folder(tmp_path)
    for step in (2, 4):
        write_checkpoint(tmp_path, step, {"step": step}, keep_last=5)
    (tmp_path / "checkpoints" / "step_00000006.pt").write_bytes(b"PK garbage")
    (tmp_path / "checkpoints" / "step_00000008.tmp").write_bytes(b"half a checkpoint")
    prepare_run_folder(tmp_path)
    assert not (tmp_path / "checkpoints" / "step_00000008.tmp").exists()
    path, state = checkpoint_to_resume("auto", tmp_path, lambda p, s: None)
    assert path.name == "step_00000004.pt" and state["step"] == 4
    assert "step_00000006.pt: cannot be read" in capsys.readouterr().err
    with pytest.raises(CamelidError, match="cannot be read"):
        checkpoint_to_resume(str(tmp_path / "checkpoints" / "step_00000006.pt"), tmp_path, lambda p, s: None)


@pytest.mark.parametrize("defect,needle", [
    (lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 64), "corrupt or truncated"),
    (_model_key("max_seq_len", 2**32 - 1), "a KV cache of 34359738352 tokens (f32) needs 40.0 TiB, more than this "
                                           "machine's free memory (lower --kv-memory"),
], ids=["corrupt-weights", "huge-context"])
def test_real_process_for_a_model_that_fails_to_load_exits(defect, needle, tmp_path):
    """`serve` with a model that cannot load stops with the loader's message instead of serving 503s."""
    import socket

    folder = _copy(MODEL, tmp_path)
    defect(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "camelid", "serve", str(folder), "--port", str(port)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.splitlines()[-1]
