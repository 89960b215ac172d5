"""Koala's published weight diff: an EasyLM streaming checkpoint, recovered with LLaMA as EasyLM recovers it.
EasyLM (JAX and flax) does not install here, so its own scripts were run offline on a tiny LLaMA in Meta's
layout (tests/data/koala/make_reference.py): the diff they wrote and the model they recovered from it are in
tests/data/koala. `camelid apply-delta` must give exactly the recovered model from the same base."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats.easylm import EasyLMTensors
from camelid.formats.load import load_model, read_config
from camelid.formats.tensors import load_tensor_files

from conftest import SHARED, run_main

DATA = Path(__file__).resolve().parent / "data" / "koala"
PARAMS = {"dim": 32, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-6, "vocab_size": -1}


def meta_folder(folder: Path, tuned: bool = False) -> Path:
    """A LLaMA in Meta's layout (fp16, as Meta released it) with stories260K's 512-token tokenizer; `tuned`: the
    same plus a small update, as fine-tuning would leave it. Integers from seeded generators: the same on every
    machine."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(PARAMS))
    shutil.copy(SHARED / "models" / "stories260K" / "tok512.model", folder / "tokenizer.model")
    d, v, f = 32, 512, 96  # 2/3 of 4 x 32, rounded up to a multiple of 32
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(PARAMS["n_layers"]):
        shapes.update({f"layers.{i}.attention.{w}.weight": (d, d) for w in ("wq", "wk", "wv", "wo")})
        shapes.update({f"layers.{i}.feed_forward.w1.weight": (f, d), f"layers.{i}.feed_forward.w3.weight": (f, d),
                       f"layers.{i}.feed_forward.w2.weight": (d, f), f"layers.{i}.attention_norm.weight": (d,),
                       f"layers.{i}.ffn_norm.weight": (d,)})
    base, update = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    weights = {}
    for name, shape in sorted(shapes.items()):
        t = torch.randint(-1000, 1001, shape, generator=base).float() / 1000 * (0.2 if len(shape) == 2 else 1)
        if tuned:
            t = t + torch.randint(-1000, 1001, shape, generator=update).float() / 1000 * 0.01
        weights[name] = (t + 1 if name.endswith("norm.weight") else t).half()
    torch.save(weights, folder / "consolidated.00.pth")
    return folder


def test_camelid_recovers_koala_as_easylm_does(tmp_path):
    """From Meta's folder and from its Hugging Face form, the recovered model is EasyLM's, bit for bit, with the
    base's config and tokenizer; it loads and runs."""
    base = meta_folder(tmp_path / "llama")
    recovered = EasyLMTensors(DATA / "recovered.easylm", read_config(base))
    assert run_main("convert", base, tmp_path / "llama-hf", "--to", "hf").returncode == 0
    for source in (base, tmp_path / "llama-hf"):
        out = tmp_path / f"koala-from-{source.name}"
        run = run_main("apply-delta", source, DATA / "koala_diff.easylm", out)
        assert run.returncode == 0, run.stderr
        got = load_tensor_files(out)
        assert set(got) == set(recovered)
        for name in recovered:
            assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], recovered[name]), name
        lm = load_model(out)
        assert lm.config.n_layers == 2 and lm.tokenizer.vocab_size == 512
        with torch.no_grad():
            assert torch.isfinite(lm.model(torch.tensor([lm.tokenizer.encode("Once upon a time")]))).all()


def test_a_diff_for_another_base_or_a_broken_file_is_named(tmp_path):
    wide = tmp_path / "wide"
    meta_folder(wide)
    (wide / "params.json").write_text(json.dumps({**PARAMS, "dim": 64}))
    torch.save({k: torch.zeros(*(64 if s == 32 else s for s in v.shape), dtype=torch.float16)
                for k, v in torch.load(wide / "consolidated.00.pth", weights_only=True).items()},
               wide / "consolidated.00.pth")
    run = run_main("apply-delta", wide, DATA / "koala_diff.easylm", tmp_path / "out")
    assert run.returncode == 1 and "this diff is not for this base" in run.stderr and not (tmp_path / "out").exists()
    cut = tmp_path / "cut.easylm"
    cut.write_bytes((DATA / "koala_diff.easylm").read_bytes()[:-100])
    with pytest.raises(CamelidError, match="truncated"):
        EasyLMTensors(cut, read_config(meta_folder(tmp_path / "llama")))
