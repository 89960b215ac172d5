"""The real stories260K model: llama2.c's own reference output, byte for byte, in every format we read it."""

import struct

import numpy as np
import pytest

from camelid.cli import main
from camelid.formats.load import export_hf, load_model, save_native
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams

from conftest import REPO, STORIES, shared_file


@pytest.fixture(scope="module")
def expected() -> str:
    """What llama2.c's run.c prints for the model at temperature 0."""
    return shared_file("models/stories260K/expected_greedy_200.txt").read_text(encoding="utf-8")


def greedy_story(lm) -> str:
    # run.c prints the 200 sampled tokens (steps=200 from a BOS-only prompt), then a newline.
    return generate(lm, [[lm.tokenizer.bos_id]], 200, SamplingParams.greedy())[0].text + "\n"


def test_llama2c_legacy_checkpoint_reproduces_run_c(stories_path, expected):
    assert greedy_story(load_model(stories_path)) == expected


def write_v1(legacy_path, out_path):
    """Re-pack the legacy file in llama2.c's version-1 layout (export.py `version1_export`)."""
    raw = legacy_path.read_bytes()
    dim, hidden, L, heads, kv, vocab, seq = struct.unpack_from("<7i", raw)
    w = np.frombuffer(raw, dtype=np.float32, offset=28)
    hd = dim // heads
    sizes = dict(emb=abs(vocab) * dim, att=L * dim, wq=L * dim * dim, wk=L * dim * kv * hd, wv=L * dim * kv * hd,
                 wo=L * dim * dim, ffn=L * dim, w1=L * hidden * dim, w2=L * dim * hidden, w3=L * hidden * dim,
                 final=dim, freqs=seq * hd)
    parts, pos = {}, 0
    for name, n in sizes.items():
        parts[name], pos = w[pos:pos + n], pos + n
    header = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, L, heads, kv, abs(vocab), seq, 1)
    body = [parts[k] for k in ("att", "ffn", "final", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    out_path.write_bytes(header.ljust(256, b"\0") + b"".join(p.tobytes() for p in body))


def test_llama2c_v1_checkpoint(stories_path, tmp_path, expected):
    write_v1(stories_path, tmp_path / "v1.bin")
    lm = load_model(tmp_path / "v1.bin", tokenizer_path=STORIES / "tok512.bin")
    assert greedy_story(lm) == expected


def test_bundled_default_model_reproduces_run_c(expected):
    assert greedy_story(load_model(REPO / "models" / "stories260K")) == expected


def test_native_and_hf_round_trips(stories_path, tmp_path, expected):
    import torch
    import transformers as tf

    lm = load_model(stories_path)
    save_native(lm, tmp_path / "native", template="alpaca", stop=["###"])
    again = load_model(tmp_path / "native")
    assert (again.template, again.stop) == ("alpaca", ["###"])
    assert greedy_story(again) == expected
    export_hf(lm, tmp_path / "hf")
    ids = torch.tensor([[1] + lm.tokenizer.encode("Once upon a time", bos=False)])
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, lm.model(ids), atol=1e-4, rtol=0)
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("Once upon a time").input_ids == ids[0].tolist()
    assert greedy_story(load_model(tmp_path / "hf")) == expected


def test_native_load_is_memory_mapped():
    lm = load_model(REPO / "models" / "stories260K")
    regions = [line.split()[0].split("-") for line in open("/proc/self/maps")
               if line.rstrip().endswith("stories260K/model.safetensors")]
    for w in (lm.model.layers[0].attn.wqkv.weight, lm.model.tok_embeddings.weight):
        assert any(int(lo, 16) <= w.data_ptr() < int(hi, 16) for lo, hi in regions)


def test_cli_generate_prints_the_story(capsys, expected):
    assert main(["generate", str(REPO / "models" / "stories260K"), "--temperature", "0", "-n", "200", ""]) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("args", [["--seed", "7"], ["--seed", "7", "--top-k", "5", "--repeat-penalty", "1.3"]])
def test_same_seed_same_text(args, capsys):
    model = str(REPO / "models" / "stories260K")
    main(["generate", model, "-n", "40", "Once upon a time"] + args)
    first = capsys.readouterr().out
    main(["generate", model, "-n", "40", "Once upon a time"] + args)
    assert capsys.readouterr().out == first
    assert first.startswith("Once upon a time") and len(first) > 60
