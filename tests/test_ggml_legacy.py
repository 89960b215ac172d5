"""llama.cpp's 2023 files (GGML, GGMF v1, GGJT v1-v3 .bin) against llama.cpp's own converter
(convert_llama_ggml_to_gguf.py, from the llama-cpp-python source distribution): camelid on a .bin gives what
camelid and llama.cpp give on the .gguf that converter makes of it, and `camelid convert --to gguf` writes that
same file byte for byte. The older block layouts, which the converter refuses, run as the same blocks in
today's layout. The .bin files are written here from GGUF files llama.cpp quantized, in each version's layout
(scales in fp32 before GGJT v3, 4-bit pairs interleaved before GGJT v2)."""

import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_gguf import _camelid, _trained, llama_cpp_logits, llama_quantize

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.formats.gguf_export import export_gguf
from camelid.formats.gguf_file import GGML_TYPE_IDS, read_gguf
from camelid.formats.load import load_model
from camelid.formats.loaded import LoadedModel
from camelid.model.config import ModelConfig

from conftest import REPO

CONVERTER = REPO / ".cache" / "llama.cpp" / "convert_llama_ggml_to_gguf.py"
# This release's converter hands gguf-py each tensor's shape in elements with its raw bytes, where gguf-py now
# reads the shape of raw bytes in bytes: every F16/F32 tensor comes out with a wrong shape and every quantized
# one fails. It runs here with gguf-py's former reading (the shape as given) restored.
RUN_CONVERTER = """
import runpy, sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]).parent / "gguf-py"))
import gguf
add_tensor = gguf.GGUFWriter.add_tensor
def as_given(self, name, tensor, raw_shape=None, raw_dtype=None, **kw):
    if raw_dtype is not None and raw_shape is not None and tensor.dtype == "uint8":
        block, size = gguf.GGML_QUANT_SIZES[raw_dtype]
        raw_shape = (*raw_shape[:-1], raw_shape[-1] // block * size)
    add_tensor(self, name, tensor, raw_shape, raw_dtype, **kw)
gguf.GGUFWriter.add_tensor = as_given
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
MAGIC = {"GGML": b"lmgg", "GGMF": b"fmgg", "GGJT": b"tjgg"}
FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15}
LEGACY_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output", "attn_q": "attention.wq",
                "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
                "attn_norm": "attention_norm", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                "ffn_up": "feed_forward.w3", "ffn_norm": "ffn_norm"}


def _legacy_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{LEGACY_NAMES[parts[2]]}.weight"
    return f"{LEGACY_NAMES[parts[0]]}.weight"


def _old_blocks(data: np.ndarray, ggml_type: str, fp32_scales: bool, interleaved: bool, nudge: float) -> bytes:
    """Today's blocks in an older file's layout; `nudge` moves fp32 scales off fp16's grid (x (1 + nudge))."""
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}.get(ggml_type)
    if block_bytes is None:
        return data.tobytes()
    blocks = data.reshape(-1, block_bytes).copy()
    if interleaved and ggml_type != "Q8_0":  # elements (j, j + 16) in a byte -> (2j, 2j + 1)
        qs = blocks[:, -16:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        blocks[:, -16:] = q[:, 0::2] | (q[:, 1::2] << 4)
    if fp32_scales and ggml_type in ("Q4_0", "Q4_1", "Q8_0"):
        n = 2 if ggml_type == "Q4_1" else 1
        scales = np.ascontiguousarray(blocks[:, :2 * n]).view("<f2").astype("<f4") * np.float32(1 + nudge)
        blocks = np.concatenate([scales.view(np.uint8).reshape(len(blocks), -1), blocks[:, 2 * n:]], axis=1)
    return blocks.tobytes()


def write_legacy(src, dest, kind: str, version: int, nudge: float = 0.0):
    """A GGUF file llama.cpp wrote, as a `kind` v`version` .bin of 2023."""
    gf = read_gguf(src)
    m = gf.metadata
    n_embd, n_head = m["llama.embedding_length"], m["llama.attention.head_count"]
    out = bytearray(MAGIC[kind] + (b"" if kind == "GGML" else struct.pack("<I", version)))
    out += struct.pack("<7I", len(m["tokenizer.ggml.tokens"]), n_embd, 256, n_head, m["llama.block_count"],
                       n_embd // n_head, m["general.file_type"])
    for token, score in zip(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"]):
        raw = bytes([int(token[3:5], 16)]) if token.startswith("<0x") else token.replace("\u2581", " ").encode()
        out += struct.pack("<I", len(raw)) + raw + (b"" if kind == "GGML" else struct.pack("<f", score))
    fp32_scales, interleaved = (kind, version) != ("GGJT", 3), kind != "GGJT" or version == 1
    for t in gf.tensors.values():
        name = _legacy_name(t.name).encode()
        dims = list(reversed(t.shape))
        out += struct.pack(f"<3I{len(dims)}I", len(dims), len(name), GGML_TYPE_IDS[t.type], *dims) + name
        if kind == "GGJT":
            out += bytes(-len(out) % 32)
        out += _old_blocks(t.data, t.type, fp32_scales, interleaved, nudge)
    dest.write_bytes(out)
    return dest


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, shakespeare):
    """A small LLaMA trained for a moment, as llama.cpp quantizes it to each type the 2023 files held."""
    root = tmp_path_factory.mktemp("legacy")
    stories = load_model(REPO / "models" / "stories260K")
    cfg = ModelConfig(arch="llama", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512,
                      max_seq_len=128)
    model = _trained(cfg, stories, shakespeare, steps=40)
    f32 = export_gguf(LoadedModel(model, stories.tokenizer, "raw", [], "tiny"), root / "gguf", "f32")
    files = {"F32": f32}
    for ftype in ("F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M"):
        files[ftype] = root / f"{ftype}.gguf"
        # before k-quants (GGJT v3), a file's weights were all of its type
        llama_quantize(f32, files[ftype], ftype, pure=ftype != "Q4_K_M")
    tokens = stories.tokenizer.encode(shakespeare[300_000:300_400])[:40]
    return root, files, tokens


def _logits(path, tokens):
    return load_model(path).model(torch.tensor([tokens]))[0].detach().numpy()


@pytest.mark.parametrize("ftype", ["F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M"])
def test_ggjt_v3_runs_as_llama_cpps_converter_and_llama_cpp_run_it(quantized, ftype, tmp_path):
    if not CONVERTER.exists():
        pytest.skip(f"{CONVERTER} not found (make test unpacks llama.cpp's converter)")
    root, files, tokens = quantized
    legacy = write_legacy(files[ftype], tmp_path / f"model-{ftype}.bin", "GGJT", 3)
    reference = tmp_path / "reference.gguf"
    # --gqa: the converter's way to say 2 key/value heads for 4 query heads (camelid reads it from wk's shape)
    run = subprocess.run([sys.executable, "-c", RUN_CONVERTER, str(CONVERTER), "--input", str(legacy), "--output",
                          str(reference), "--gqa", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = tmp_path / "ours.gguf"
    result = _camelid("convert", legacy, ours, "--to", "gguf")
    assert result.returncode == 0, result.stderr
    assert ours.read_bytes() == reference.read_bytes()
    got = _logits(legacy, tokens)
    np.testing.assert_array_equal(got, _logits(reference, tokens))
    ref = llama_cpp_logits(reference, tokens)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] >= 0.999
    # the blocks llama.cpp quantized, under a 2023 header that has no norm epsilon (5e-6 stands in for 1e-5; in
    # bf16, as quantized layers run on this CPU, that moves a logit by a rounding step at most)
    np.testing.assert_allclose(got, _logits(files[ftype], tokens), atol=1e-4 if ftype == "F16" else 0.05, rtol=0)


# (kind, version, types of that era): GGML and GGMF held F16 and 4-bit files; GGJT v1 added Q5 and Q8_0
OLDER = [("GGML", 1, ["F16", "Q4_0", "Q4_1"]), ("GGMF", 1, ["F32", "Q4_0"]), ("GGJT", 1, ["Q4_0", "Q5_1", "Q8_0"]),
         ("GGJT", 2, ["Q4_1", "Q5_0", "Q8_0"])]


@pytest.mark.parametrize("kind,version,ftypes", OLDER, ids=[f"{k}v{v}" for k, v, _ in OLDER])
def test_older_layouts_run_as_the_same_blocks_in_todays_layout(quantized, kind, version, ftypes, tmp_path):
    """Interleaved 4-bit pairs are a permutation (exact); fp32 scales that fp16 holds exactly give identical
    logits, and scales off fp16's grid are rounded, which camelid says."""
    root, files, tokens = quantized

    def v3(ftype):
        return _logits(write_legacy(files[ftype], tmp_path / f"v3-{ftype}.bin", "GGJT", 3), tokens)

    for ftype in ftypes:
        legacy = write_legacy(files[ftype], tmp_path / f"{kind}{version}-{ftype}.bin", kind, version)
        lm = load_model(legacy)
        assert ("rounded to fp16" in lm.load_note) == (ftype in ("Q4_0", "Q4_1", "Q8_0")), (ftype, lm.load_note)
        np.testing.assert_array_equal(lm.model(torch.tensor([tokens]))[0].detach().numpy(), v3(ftype))
    # scales 1e-4 off fp16's grid (less than half its spacing) are rounded back onto it
    nudged = write_legacy(files["Q8_0"], tmp_path / "nudged.bin", kind, version, nudge=1e-4)
    np.testing.assert_array_equal(_logits(nudged, tokens), v3("Q8_0"))


def test_bad_legacy_files_are_one_line_errors(quantized, tmp_path, capsys):
    root, files, _ = quantized
    good = write_legacy(files["Q4_0"], tmp_path / "good.bin", "GGJT", 3).read_bytes()
    header = 4 + 4 + 28
    cases = {
        "truncated.bin": (good[:len(good) - 1000], "runs past the end of the file"),
        "lora.bin": (b"algg" + good[4:], "magic 'ggla' is not a llama.cpp model file camelid reads"),
        "v4.bin": (good[:4] + struct.pack("<I", 4) + good[8:], "GGJT version 4 is not one llama.cpp wrote"),
        "header.bin": (good[:8] + struct.pack("<7I", 512, 256, 256, 0, 2, 64, 2) + good[header:],
                       "implausible GGJT header"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CamelidError, match=re.escape(message)):
            load_model(tmp_path / name)
    r = _camelid("generate", tmp_path / "truncated.bin", "-n", "1", "hi")  # as the command line shows it
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "runs past the end" in r.stderr, r.stderr
    q4_2 = good.replace(struct.pack("<3I", 2, len(b"tok_embeddings.weight"), GGML_TYPE_IDS["Q4_0"]),
                        struct.pack("<3I", 2, len(b"tok_embeddings.weight"), 4), 1)
    (tmp_path / "q4_2.bin").write_bytes(q4_2)
    with pytest.raises(CamelidError, match="Q4_2, a format llama.cpp removed in May 2023"):
        load_model(tmp_path / "q4_2.bin")
    assert main(["convert", str(files["F16"]), str(tmp_path / "x.gguf"), "--to", "gguf"]) == 1
    assert "`camelid export --gguf` writes any other model" in capsys.readouterr().err
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    assert main(["convert", str(tmp_path / "good.bin"), str(tmp_path / "exists.gguf"), "--to", "gguf"]) == 1
    assert "exists (--force" in capsys.readouterr().err and (tmp_path / "exists.gguf").read_bytes() == b"mine"
