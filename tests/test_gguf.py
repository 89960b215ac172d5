"""GGUF in and out, checked against llama.cpp itself (through llama-cpp-python): files llama.cpp wrote and
quantized run in camelid with the same logits, and files camelid writes run in llama.cpp with the same logits
and tokens."""

import ctypes
import functools
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp  # a test dependency only: llama.cpp itself, the reference
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.formats.gguf_blocks import dequantize, int4_groups, quantize, quantize_q8_0
from camelid.formats.gguf_export import export_gguf
from camelid.formats.gguf_file import GGML_TYPE_IDS, read_gguf, read_gguf_metadata
from camelid.formats.load import build_model, load_model, plain_state_dict, save_native
from camelid.formats.loaded import LoadedModel
from camelid.generate.decoding import decode_step
from camelid.model import fused_decode, ggml_kernel
from camelid.model.config import ModelConfig
from camelid.model.kernels import use_gemv_kernel
from camelid.model.kv_cache import PagedKVCache
from camelid.model.quant import GGMLEmbedding, GGMLLinear, Int4Linear, Int8Linear
from camelid.model.transformer import Transformer
from camelid.tokenizer.gguf_vocab import gguf_tokenizer
from camelid.tokenizer.tokenizer import load_tokenizer_file

from conftest import REPO, run_main, shared_file

# llama.cpp's LLAMA_FTYPE values
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18,
          "IQ4_NL": 25, "IQ4_XS": 30, "IQ3_S": 26, "TQ2_0": 37}  # the i-quants llama-quantize makes without an imatrix


def llama_quantize(src: Path, dst: Path, ftype: str, pure: bool = False):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 2
    params.pure = pure  # every weight in ftype's type (else the output layer gets a finer one)
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, n_batch=128, logits_all=True, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)])


# camelid's error from the exactly decoded weights, at most this many times llama.cpp's. With the C kernel its
# rounding is llama.cpp's (int8 activations in blocks of 32); without it (an AVX2 CPU) activations are rounded
# to bf16 for PyTorch's int4/int8 kernels and Q8_0 and K-quant weights to int8 per output channel, which
# measures up to 3.3x llama.cpp's error on these tiny models (docs/gguf-and-kernels.md)
SLACK = 1.25 if ggml_kernel.available() else 4.0


def assert_agree(ours: np.ndarray, ref: np.ndarray, exact: np.ndarray | None = None):
    """Correlation at least 0.999 and the same top token wherever llama.cpp's own top two are not a near-tie
    (llama.cpp rounds activations to 8 bits for quantized matmuls, which flips near-ties either way). The
    rounding error grows with the logits, so a near-tie is a gap under 0.05 or under 2% of the logits' spread
    (a tied-embedding model's logits spread 4x wider than the tiny LLaMA's). Given `exact`, the logits of the
    file's weights dequantized and run in float, camelid must be about as close to them as llama.cpp is, and a
    gap within the two engines' own rounding error from them is a near-tie too."""
    corr = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    assert corr >= 0.999, corr
    order = np.argsort(ref, axis=-1)[:, -2:]
    top2 = np.take_along_axis(ref, order, axis=-1)
    gap = top2[:, 1] - top2[:, 0]
    clear = gap > max(0.05, 0.02 * ref.std())
    assert clear.sum() >= 0.4 * len(ref)  # enough rows to compare: these small models are briefly trained
    if exact is not None:
        ours_err, ref_err = np.abs(ours - exact).max(), np.abs(ref - exact).max()
        assert ours_err <= SLACK * ref_err + 1e-3, (ours_err, ref_err)
        # a row where the engines pick different tokens whose llama.cpp logits differ by less than the two
        # engines' rounding moved those logits from the exact ones is a near-tie as well
        picks = np.stack([ref.argmax(-1), ours.argmax(-1)], axis=-1)
        moved = np.take_along_axis(np.abs(ours - exact) + np.abs(ref - exact), picks, axis=-1).sum(-1)
        apart = np.take_along_axis(ref, picks, axis=-1)
        clear &= (picks[:, 0] == picks[:, 1]) | (apart[:, 0] - apart[:, 1] > moved)
    np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


def decode_logits(model: Transformer, tokens: list[int], step=None, paged: bool = False) -> np.ndarray:
    """Token by token through the KV cache, by the step generation chooses for the model (or by `step`);
    `paged`: through a paged cache's blocks, scattered in its pool, as the server and KV sessions hold them."""
    cache = model.new_kv_cache(1, len(tokens))
    if paged:
        cfg, size = model.cfg, 4
        pool = PagedKVCache(cfg.n_layers, 2 * len(tokens) // size + 2, size, cfg.n_kv_heads, cfg.head_dim,
                            model.dtype, model.device)
        cache = pool.rows(torch.randperm(pool.n_blocks)[None, :-(-len(tokens) // size)])
    step = step or decode_step(model)
    with torch.inference_mode():
        return torch.cat([step(torch.tensor([[t]]), i, cache, None)[0] for i, t in enumerate(tokens)]).numpy()


def _trained(cfg: ModelConfig, stories, text: str, steps: int = 100, batch: int = 8) -> Transformer:
    """Trained for a moment on Shakespeare, so its predictions are peaked like a real model's."""
    ids = torch.tensor(stories.tokenizer.encode(text[:100_000], bos=False))
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.tie_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (batch,))
        x = torch.stack([ids[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, shakespeare):
    """A small LLaMA with every dimension a multiple of 256 (so K-quants apply), trained for a moment,
    exported by camelid as F32 GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    stories = load_model(REPO / "models" / "stories260K")
    cfg = ModelConfig(arch="llama", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512,
                      max_seq_len=128)
    model = _trained(cfg, stories, shakespeare)
    save_native(LoadedModel(model, stories.tokenizer, "alpaca", [], "tiny"), root / "tiny")
    f32 = export_gguf(load_model(root / "tiny"), root / "export", "f32")
    tokens = stories.tokenizer.encode(shakespeare[300_000:300_400])[:60]
    return root, f32, tokens


@pytest.fixture(params=["c-kernel", "torch-kernels"])
def kernels(request, monkeypatch):
    """Both ways camelid runs Q4_0/Q8_0: its C kernel on the file's blocks, and PyTorch's int4/int8 kernels."""
    if request.param == "c-kernel" and not ggml_kernel.available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    if request.param == "torch-kernels":
        monkeypatch.setattr(ggml_kernel, "library", lambda: None)
    return request.param


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_files_llama_cpp_quantized_run_with_its_logits(trained_tiny, ftype, kernels):
    root, f32, tokens = trained_tiny
    path = root / f"llama-{ftype}.gguf"
    if not path.exists():
        llama_quantize(f32, path, ftype)
    lm = load_model(path)
    ours = lm.model(torch.tensor([tokens]))[0].numpy()
    ref = llama_cpp_logits(path, tokens)
    # the weights as camelid holds them, in float: where it re-quantizes (IQ3_S to int8 without the C kernel),
    # a pick that rounding moved is a near-tie
    exact = build_model(lm.config, {k: v.float() for k, v in plain_state_dict(lm).items()}, "x")
    exact = exact(torch.tensor([tokens]))[0].numpy()
    assert_agree(ours, ref, exact)
    decoded = decode_logits(lm.model, tokens)  # token by token through the KV cache, as generation runs
    assert_agree(decoded, ref, exact)
    fused = fused_decode.build_plan(lm.model) is not None  # the whole step in one C call
    assert fused == (kernels == "c-kernel" and ftype != "F16")
    op_by_op = decode_logits(lm.model, tokens, step=lm.model)  # the same steps through the model's forward
    # the same math: equal but where an activation's int8 rounding flips on a last-bit difference
    np.testing.assert_allclose(decoded, op_by_op, atol=0.02)
    # the C step over a paged row's scattered blocks computes what it computes over one contiguous row
    np.testing.assert_array_equal(decode_logits(lm.model, tokens, paged=True), decoded)
    kinds = {type(m) for m in lm.model.modules()}
    if kernels == "c-kernel" and ftype != "F16":  # Q4_0/Q8_0/Q4_1/Q4_K/Q6_K blocks, 5-bit types as Q8_0
        assert GGMLLinear in kinds and Int8Linear not in kinds and Int4Linear not in kinds
    elif ftype in ("Q4_0", "Q4_1", "Q4_K_M"):  # mapped onto the int4 kernel, not expanded to float
        assert Int4Linear in kinds and GGMLEmbedding in kinds and GGMLLinear not in kinds
    elif ftype != "F16":
        assert Int8Linear in kinds and Int4Linear not in kinds and GGMLLinear not in kinds
    if ftype in ("Q4_0", "Q4_K_M", "IQ4_XS"):  # saved as a camelid folder, it is the same model
        save_native(lm, root / f"native-{ftype}-{kernels}")
        again = load_model(root / f"native-{ftype}-{kernels}").model(torch.tensor([tokens]))[0].numpy()
        np.testing.assert_array_equal(again, ours)


def test_fused_decode_sees_the_model_as_it_is_when_chosen(trained_tiny):
    """The C step reads the weights through pointers taken when it is chosen: a step chosen after a tensor or
    layer was swapped must compute with the new one, as the model's forward does."""
    if not ggml_kernel.available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    root, f32, tokens = trained_tiny
    path = root / "llama-Q8_0.gguf"
    if not path.exists():
        llama_quantize(f32, path, "Q8_0")
    model = load_model(path).model
    before = decode_logits(model, tokens[:8])
    norm = model.layers[1].mlp_norm
    norm.weight = torch.nn.Parameter(norm.weight * 1.5, requires_grad=False)
    after = decode_logits(model, tokens[:8])
    assert fused_decode.build_plan(model) is not None and not np.allclose(after, before, atol=0.1)
    np.testing.assert_allclose(after, decode_logits(model, tokens[:8], step=model), atol=0.02)
    assert fused_decode.build_plan(model).head is not None  # the final norm and output layer run in C too
    model.norm.weight = torch.nn.Parameter(model.norm.weight * 1.5, requires_grad=False)
    final = decode_logits(model, tokens[:8])
    assert not np.allclose(final, after, atol=0.1)
    np.testing.assert_allclose(final, decode_logits(model, tokens[:8], step=model), atol=0.02)
    model.layers[0].attn.wo = torch.nn.Linear(256, 256, bias=False)  # no longer blocks: op by op again
    assert fused_decode.build_plan(model) is None and decode_step(model) is model


KERNEL_CASES = [(t, split, rows, k) for t, split in (("Q4_0", False), ("Q8_0", False), ("Q6_K", False), ("Q4_K", False),
                                                     ("Q4_0", True), ("Q4_1", True), ("IQ4_NL", True),
                                                     ("IQ4_XS", True))
                for rows, k in ((1, 512), (3, 2048), (21, 256), (2, 2016), (40, 1024))
                if not (split and k % 128) and not (t in ("Q6_K", "Q4_K", "IQ4_XS") and k % 256)]


def random_blocks(ggml_type: str, rows: int, k: int, seed: int = 2, scale: float = 0.01) -> np.ndarray:
    """Valid block rows of any quantized type, those gguf's numpy cannot quantize to included (the i-quants):
    random bytes, with each block's scale set to a modest random value where the type keeps it (first, last,
    in the top nibbles of IQ1_M's sub-scales, or as MXFP4's power of two)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    rng = np.random.RandomState(seed)
    raw = rng.randint(0, 256, size=(rows, k // block, size)).astype(np.uint8)
    d = rng.uniform(0.2 * scale, 2 * scale, size=(rows, k // block)).astype(np.float16)
    if ggml_type == "MXFP4":
        raw[..., 0] = np.round(np.log2(d.astype(np.float32))).astype(np.int32) + 127
    elif ggml_type == "IQ1_M":
        bits, sub = d.view(np.uint16), raw[..., 48:56].copy().view(np.uint16)
        for i in range(4):
            sub[..., i] = (sub[..., i] & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
        raw[..., 48:56] = sub.view(np.uint8)
    else:
        at = size - 2 if ggml_type.startswith("TQ") else 0
        raw[..., at:at + 2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("ggml_type", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ1_S", "IQ1_M", "TQ1_0",
                                       "MXFP4", "IQ4_NL"])
def test_files_of_every_i_quant_run_as_llama_cpp_runs_them(trained_tiny, ggml_type, monkeypatch, tmp_path):
    """The types llama-quantize makes only with an importance matrix (and MXFP4, and IQ4_NL beside the C
    kernel's own test): a file whose block matrices hold random blocks of the type runs in camelid as close to
    its weights decoded by gguf's dequantization (an F32 file of them) as llama.cpp runs it, where the C
    kernel runs; without it, within the int8 re-quantization's documented error."""
    from camelid.formats import gguf_export

    root, f32, tokens = trained_tiny
    plain = gguf_export.tensor_type

    def blocks(w):  # the same random blocks for a shape in both files
        return random_blocks(ggml_type, w.shape[0], w.shape[1], scale=0.05 / w.shape[1] ** 0.5)

    def write(dest, as_float: bool):
        monkeypatch.setattr(gguf_export, "tensor_type", lambda name, shape, *a: ggml_type if name.startswith(
            "blk.") and len(shape) == 2 else plain(name, shape, *a))
        monkeypatch.setattr(gguf_export, "quantize", lambda w, kind: quantize(w, kind) if kind != ggml_type else
                            dequantize(blocks(w), kind, w.shape).numpy() if as_float else blocks(w))
        if as_float:  # written as F32 under the type's name: GGUFWriter takes a float array as F32
            monkeypatch.setattr(gguf_export, "GGML_TYPE_IDS", {**GGML_TYPE_IDS, ggml_type: GGML_TYPE_IDS["F32"]})
        return export_gguf(load_model(root / "tiny"), dest, "f32")

    path, exact_path = write(tmp_path / "q", False), write(tmp_path / "exact", True)
    assert {t.type for n, t in read_gguf(path).tensors.items() if n.startswith("blk.") and len(t.shape) == 2} \
        == {ggml_type}
    ours = load_model(path).model(torch.tensor([tokens]))[0].numpy()
    exact = load_model(exact_path).model(torch.tensor([tokens]))[0].numpy()
    ref = llama_cpp_logits(path, tokens)
    ours_err, ref_err = np.abs(ours - exact).max(), np.abs(ref - exact).max()
    ours_corr, ref_corr = (np.corrcoef(x.ravel(), exact.ravel())[0, 1] for x in (ours, ref))
    assert ours_corr >= min(0.998, ref_corr - 1e-3), (ours_corr, ref_corr)
    # with the C kernel these blocks become Q8_0 blocks; without it, int8 with one scale per output channel,
    # whose rounding is coarser where the blocks' own scales vary along a row (random blocks: MXFP4 3.1x,
    # IQ4_NL 2.1x llama.cpp's error), as docs/gguf-and-kernels.md says
    assert ours_err <= (SLACK if ggml_kernel.available() else 3.5) * ref_err + 1e-3, (ours_err, ref_err)


@pytest.mark.parametrize("ggml_type,split,rows,k", KERNEL_CASES)
def test_c_kernel_matches_dequantized_weights(ggml_type, split, rows, k):
    """int8 activations (one scale per 32) times the blocks, as they are in the file or repacked (rows of
    scales, then nibbles, whole groups of four blocks): within llama.cpp's own rounding. 21 and 40 rows take
    the panel kernel (ggml_gemm), ending in a part tile of 6; 80 weight rows are two whole panels of 32 and a
    part one."""
    assert max(ggml_kernel.PANEL_ROWS.values()) <= 21 and min(ggml_kernel.PANEL_ROWS.values()) > 3
    if not ggml_kernel.available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    w = np.random.RandomState(2).randn(80, k).astype(np.float32)
    iq = ggml_type.startswith("IQ")
    raw = torch.from_numpy(random_blocks(ggml_type, 80, k) if iq else quantize(w, ggml_type))
    type_id = int(gguf.GGMLQuantizationType[ggml_type])
    blocks, kind = raw, type_id
    if split:
        blocks, kind = ggml_kernel.split_rows(raw, type_id), ggml_kernel.SPLIT[type_id]
        assert torch.equal(ggml_kernel.join_rows(blocks, type_id), raw)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(0))
    ref = x @ dequantize(raw.numpy(), ggml_type, (80, k)).t()
    y = ggml_kernel.matmul(kind, blocks, x, 80)
    assert y.shape == (rows, 80)
    assert ((y - ref).norm() / ref.norm()) < 0.01


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q5_0"])
def test_quantized_embedding_lookup_is_ggml_dequantization(ggml_type):
    """A lookup dequantizes the rows it reads: in C where the kernel takes the type (Q5_0 goes through
    gguf's numpy), bit for bit what gguf's dequantization gives."""
    table = np.random.RandomState(3).randn(50, 512).astype(np.float32)
    raw = torch.from_numpy(quantize(table, ggml_type))
    emb = GGMLEmbedding(50, 512, int(gguf.GGMLQuantizationType[ggml_type]), raw.shape[1])
    emb.blocks.copy_(raw)
    ids = torch.tensor([[3, 49, 3], [0, 7, 12]])
    full = dequantize(raw.numpy(), ggml_type, (50, 512))
    assert torch.equal(emb(ids), full[ids])


def _huge_pages_on_request() -> bool:
    thp = Path("/sys/kernel/mm/transparent_hugepage")
    settings = [thp / "enabled", thp / "hugepages-2048kB" / "enabled"]
    return settings[0].exists() and all("[never]" not in f.read_text() for f in settings if f.exists())


def _mapping_of(address: int) -> dict[str, int]:
    """The /proc/self/smaps entry of the mapping that holds `address`: its bounds and its numeric fields."""
    found = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: its address range
            if found is not None:
                break
            lo, hi = (int(v, 16) for v in head.split("-"))
            found = {"start": lo, "end": hi} if lo <= address < hi else None
        elif found is not None and head.endswith(":") and line.split()[1].isdigit():
            found[head.rstrip(":")] = int(line.split()[1])  # sizes in kB, and flags such as THPeligible
    return found


@pytest.mark.skipif(not _huge_pages_on_request(), reason="no transparent huge pages on this machine")
def test_weight_buffers_sit_in_huge_pages():
    """The block rows a decode step sweeps every token get 2 MB pages (fewer TLB misses, about 5% faster here),
    only for the whole 2 MB pages inside the tensor, so it costs no memory over its size."""
    size = 9 * 2**20 + 4096 * 3 + 5
    buf = ggml_kernel.weight_buffer(size, 1)
    assert buf.data_ptr() % ggml_kernel.HUGE_PAGE == 0 and buf.shape == (size, 1)
    buf.fill_(7)
    mapping = _mapping_of(buf.data_ptr())
    assert (mapping["start"], mapping["end"]) == (buf.data_ptr(), buf.data_ptr() + 4 * ggml_kernel.HUGE_PAGE)
    # eligible, not necessarily given: a fragmented machine may still fall back to small pages
    assert mapping["THPeligible"] == 1
    assert int(buf.sum()) == 7 * size
    small = ggml_kernel.weight_buffer(100, 18)
    assert small.shape == (100, 18) and small.dtype == torch.uint8


def test_cli_runs_a_gguf_file(trained_tiny):
    root, f32, _ = trained_tiny
    path = root / "cli-Q4_0.gguf"
    llama_quantize(f32, path, "Q4_0")
    r = run_main("generate", path, "--temperature", "0", "--max-new-tokens", "8", "ROMEO:")
    assert r.returncode == 0, r.stderr
    lm = load_model(path)
    ids = lm.tokenizer.encode("ROMEO:")
    with torch.inference_mode():
        for _ in range(8):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    assert lm.tokenizer.decode(ids[-8:]).strip() in r.stdout
    info = run_main("info", path)
    assert info.returncode == 0 and "layers         2, dim 256" in info.stdout


def test_float_gguf_is_exact(trained_tiny):
    root, f32, tokens = trained_tiny
    ours = load_model(f32).model(torch.tensor([tokens]))[0].numpy()
    native = load_model(root / "tiny").model(torch.tensor([tokens]))[0].numpy()
    np.testing.assert_allclose(ours, native, atol=1e-5)
    np.testing.assert_allclose(ours, llama_cpp_logits(f32, tokens), atol=2e-2)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q4_k_m"])
def test_exports_run_in_llama_cpp(trained_tiny, quant):
    root, f32, tokens = trained_tiny
    path = export_gguf(load_model(root / "tiny"), root / "export", quant)
    assert_agree(load_model(path).model(torch.tensor([tokens]))[0].numpy(), llama_cpp_logits(path, tokens))
    types = {name: t.type for name, t in read_gguf(path).tensors.items()}
    assert types["blk.0.attn_norm.weight"] == "F32"
    if quant != "f16":  # the same type for every tensor as llama-quantize picks (Q4_K_M: a Q4_K/Q6_K mix)
        llama_quantize(f32, root / "reference.gguf", {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}[quant])
        assert types == {name: t.type for name, t in read_gguf(root / "reference.gguf").tensors.items()}
    card = (root / "export" / "README.md").read_text()
    assert path.name in card and "llama-cli" in card
    modelfile = (root / "export" / "Modelfile").read_text()
    assert f"FROM ./{path.name}" in modelfile and "### Instruction" in modelfile


def test_export_carries_tokenizer_template_and_stop_tokens(trained_tiny):
    root, f32, _ = trained_tiny
    llm = llama_cpp.Llama(model_path=str(f32), n_ctx=128, verbose=False, vocab_only=True)
    tok = load_model(root / "tiny").tokenizer
    for text in ("Hello world", " ROMEO: What, ho!\nJULIET:  spaces  and 123", "émigré café"):
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text)
    assert llm.token_eos() == tok.eos_ids[0] and llm.token_bos() == tok.bos_id
    assert "### Response:" in llm.metadata["tokenizer.chat_template"]


FAMILIES = {  # the other families llama.cpp runs, in Pythia's, Falcon-7B's, Falcon-40B's, Qwen's, Gemma's and
    # the mixtures of experts' shapes
    "gpt_neox": dict(arch="gpt_neox", norm="layernorm", activation="gelu", gated_mlp=False, parallel_residual=True,
                     rotary_pct=0.25, qkv_bias=True, attn_out_bias=True, mlp_bias=True, n_kv_heads=4),
    "gpt_neox-sequential": dict(arch="gpt_neox", norm="layernorm", activation="gelu", gated_mlp=False,
                                rotary_pct=0.5, qkv_bias=True, attn_out_bias=True, mlp_bias=True, n_kv_heads=4),
    "falcon-7b": dict(arch="falcon", norm="layernorm", activation="gelu", gated_mlp=False, parallel_residual=True,
                      shared_parallel_norm=True, n_kv_heads=1, tie_embeddings=True),
    "falcon-40b": dict(arch="falcon", norm="layernorm", activation="gelu", gated_mlp=False, parallel_residual=True,
                       n_kv_heads=2),
    "qwen2": dict(arch="qwen2", qkv_bias=True, n_kv_heads=2, tie_embeddings=True, rope_theta=1e6),
    "qwen3": dict(arch="qwen3", qk_norm=True, n_kv_heads=2, head_dim=32),
    "starcoder": dict(arch="starcoder", norm="layernorm", activation="gelu_tanh", gated_mlp=False, positions="learned",
                      qkv_bias=True, attn_out_bias=True, mlp_bias=True, n_kv_heads=1, tie_embeddings=True,
                      train_steps=150),  # peaked enough that half its top tokens are clear of rounding
    "gemma": dict(arch="gemma", activation="gelu_tanh", norm_plus_one=True, embed_scale=True, n_kv_heads=1,
                  head_dim=32, tie_embeddings=True),
    "gemma2": dict(arch="gemma2", activation="gelu_tanh", norm_plus_one=True, embed_scale=True, post_norms=True,
                   n_kv_heads=2, head_dim=32, attn_scale=32 ** -0.5, attn_softcap=50.0, final_softcap=30.0,
                   sliding_window=8, sliding_layers=[0, 2], n_layers=4, tie_embeddings=True),
    "gemma3": dict(arch="gemma3", activation="gelu_tanh", norm_plus_one=True, embed_scale=True, post_norms=True,
                   qk_norm=True, n_kv_heads=2, head_dim=32, attn_scale=32 ** -0.5, sliding_window=8,
                   sliding_layers=[0, 1, 2, 3, 4], n_layers=6, rope_theta=1e6, rope_local_theta=1e4,
                   tie_embeddings=True),
    "phi3": dict(arch="phi3", n_kv_heads=4, sliding_window=2047),  # llama.cpp turns Phi's window off, as camelid
    # does reading the file back; the window is past these 60 tokens either way
    # short factors in both: llama.cpp's window (it pads 128 to 256) is within the original context
    "phi3-longrope": dict(arch="phi3", n_kv_heads=2, rotary_pct=0.75, max_seq_len=512,
                          rope_scaling={"type": "longrope", "original_max_position_embeddings": 256,
                                        "short_factor": [1.0 + i / 20 for i in range(24)],
                                        "long_factor": [2.0 + i for i in range(24)]}),
    "bloom": dict(arch="bloom", norm="layernorm", activation="gelu_tanh", gated_mlp=False, positions="alibi",
                  embed_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
                  train_steps=300),
    "mpt": dict(arch="mpt", norm="layernorm", norm_bias=False, activation="gelu", gated_mlp=False, positions="alibi",
                qkv_clip=0.5, tie_embeddings=True),
    "mixtral": dict(arch="llama", n_kv_heads=2, n_experts=4, n_experts_used=2, ffn_dim=256),
    "qwen2_moe": dict(arch="qwen2_moe", qkv_bias=True, n_kv_heads=2, n_experts=4, n_experts_used=2,
                      expert_ffn_dim=256, shared_expert_dim=512, moe_renorm=False,
                      train_batch=16),  # routers sure enough of their experts that rounding rarely flips one
    "qwen3_moe": dict(arch="qwen3_moe", qk_norm=True, n_kv_heads=2, head_dim=32, n_experts=8, n_experts_used=3,
                      expert_ffn_dim=256, tie_embeddings=True),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, shakespeare):
    root = tmp_path_factory.mktemp(request.param)
    stories = load_model(REPO / "models" / "stories260K")
    fields = dict(FAMILIES[request.param])
    steps, batch = fields.pop("train_steps", 100), fields.pop("train_batch", 8)
    cfg = ModelConfig(**{**dict(vocab_size=512, dim=256, n_layers=2, n_heads=4, ffn_dim=1024, max_seq_len=128),
                         **fields})
    model = _trained(cfg, stories, shakespeare, steps=steps, batch=batch)
    # (llama.cpp expects Phi-3's own special tokens in a file whose name says phi3; this one has the stories')
    lm = LoadedModel(model, stories.tokenizer, "raw", [], request.param.replace("phi3", "phi"))
    tokens = stories.tokenizer.encode(shakespeare[300_000:300_400])[:60]
    return root, lm, export_gguf(lm, root, "f32"), tokens


FUSED = {"qwen2", "qwen3", "gemma", "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe"}  # one C call a step


def test_other_families_export_and_run_quantized_files_as_llama_cpp_does(family):
    """GPT-NeoX, Falcon, Qwen2, Qwen3 and Gemma 1-3: camelid's F32 export runs in llama.cpp with camelid's logits
    (llama.cpp's GELU is a tanh approximation, hence the tolerance), and the files llama.cpp quantizes from it
    run in camelid with llama.cpp's logits."""
    root, lm, f32, tokens = family
    want = lm.model(torch.tensor([tokens]))[0].numpy()
    ours = load_model(f32)
    assert ours.config.arch == lm.config.arch and ours.config.rotary_dim == lm.config.rotary_dim
    np.testing.assert_allclose(ours.model(torch.tensor([tokens]))[0].numpy(), want, atol=1e-5)
    assert_agree(want, llama_cpp_logits(f32, tokens))
    np.testing.assert_allclose(want, llama_cpp_logits(f32, tokens), atol=5e-2)
    for ftype in ("Q8_0", "Q4_0", "Q4_K_M"):
        path = root / f"{ftype}.gguf"
        llama_quantize(f32, path, ftype)
        quantized = load_model(path)
        exact = build_model(quantized.config, {k: v.float() for k, v in plain_state_dict(quantized).items()}, "x")
        assert_agree(quantized.model(torch.tensor([tokens]))[0].numpy(), llama_cpp_logits(path, tokens),
                     exact(torch.tensor([tokens]))[0].numpy())
        if ggml_kernel.available() and lm.source in FUSED:  # one C call a token, computing what the forward does
            if quantized.config.n_experts:  # the routers (float) on the compiled gemv kernel, as generation has them
                gates = 1 + bool(quantized.config.shared_expert_dim)  # the router, and a shared expert's gate
                assert use_gemv_kernel(quantized.model) == quantized.config.n_layers * gates
            assert fused_decode.build_plan(quantized.model) is not None
            # equal but where an activation's int8 rounding flips on a last-bit difference, which Gemma 2's large
            # activations carry to about 1% of the logits' scale
            op_by_op = decode_logits(quantized.model, tokens, step=quantized.model)
            np.testing.assert_allclose(decode_logits(quantized.model, tokens), op_by_op,
                                       atol=0.01 * np.abs(op_by_op).max())
    exported = export_gguf(lm, root / "export", "q4_0")  # llama-quantize's types, Falcon's Q8_0 output included
    assert {n: t.type for n, t in read_gguf(exported).tensors.items()} == \
        {n: t.type for n, t in read_gguf(root / "Q4_0.gguf").tensors.items()}
    mine = load_model(exported)
    exact = build_model(mine.config, {k: v.float() for k, v in plain_state_dict(mine).items()}, "x")
    assert_agree(mine.model(torch.tensor([tokens]))[0].numpy(), llama_cpp_logits(exported, tokens),
                 exact(torch.tensor([tokens]))[0].numpy())


@pytest.mark.parametrize("padding", [0, 7])
def test_gpt2_round_trip(tmp_path, padding):
    """A GPT-2 with the real GPT-2 byte-level BPE: camelid -> GGUF -> llama.cpp, logits and tokens; with
    embedding rows past the tokenizer (padded vocabularies), which become unused tokens."""
    tok = load_tokenizer_file(shared_file("tokenizers/gpt2_tokenizer.json"))
    cfg = ModelConfig(arch="gpt2", vocab_size=tok.vocab_size + padding, dim=64, n_layers=2, n_heads=4, ffn_dim=256,
                      max_seq_len=64, norm="layernorm", activation="gelu_tanh", gated_mlp=False,
                      positions="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.tie_weights()
    lm = LoadedModel(model.eval().requires_grad_(False), tok, "raw", [], "gpt2-tiny")
    path = export_gguf(lm, tmp_path, "f32")
    text = "The quick brown fox's 1234 jumps,  over\nthe lazy dog."
    tokens = tok.encode(text)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    assert llm.tokenize(text.encode(), add_bos=False) == tokens
    ours = load_model(path).model(torch.tensor([tokens]))[0].numpy()
    np.testing.assert_allclose(ours, model(torch.tensor([tokens]))[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ours, llama_cpp_logits(path, tokens), atol=2e-2)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_groups_are_ggml_dequantization(ggml_type):
    w = np.random.RandomState(0).randn(32, 512).astype(np.float32)
    raw = quantize(w, ggml_type)
    q, scales, zeros = int4_groups(raw, ggml_type)
    ours = ((q.float() - 8).view(32, -1, 32) * scales[..., None] + zeros[..., None]).view(32, 512)
    torch.testing.assert_close(ours, dequantize(raw, ggml_type, (32, 512)), rtol=0, atol=1e-5)


def test_torch_q8_0_encoder_is_ggml_bit_exact():
    w = np.random.RandomState(3).randn(48, 512).astype(np.float32)
    w[0, :32] = 0  # an all-zero block
    np.testing.assert_array_equal(quantize_q8_0(torch.from_numpy(w)).numpy(), quantize(w, "Q8_0"))


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K"])
def test_c_k_quant_to_q8_0_is_dequantize_then_quantize(ggml_type):
    """The load-time C conversion of K-quant rows gives exactly the blocks that going through float gives."""
    if not ggml_kernel.available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    w = np.random.RandomState(4).randn(40, 1024).astype(np.float32) * np.linspace(0.01, 4, 1024)
    w[1, :256] = 0  # an all-zero super-block
    raw = quantize(w, ggml_type)
    ours = ggml_kernel.k_quant_to_q8_0(torch.from_numpy(raw), {"Q4_K": 12, "Q6_K": 14}[ggml_type], 1024)
    np.testing.assert_array_equal(ours.numpy(), quantize_q8_0(dequantize(raw, ggml_type, (40, 1024))).numpy())


@pytest.mark.parametrize("ggml_type,rel_error", [("Q4_K", 0.12), ("Q6_K", 0.03)])
def test_k_quant_encoders(ggml_type, rel_error):
    w = np.random.RandomState(1).randn(16, 1024).astype(np.float32) * np.linspace(0.1, 3, 1024)
    back = dequantize(quantize(w, ggml_type), ggml_type, w.shape).numpy()
    err = np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean())
    assert err < rel_error, err


# ------------------------------------------------------------------------------------------ bad input

def _camelid(*args):
    return subprocess.run([sys.executable, "-m", "camelid", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _patched(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    data = src.read_bytes()
    assert data.count(old) >= 1
    dst.write_bytes(data.replace(old, new, 1))
    return dst


def test_bad_gguf_files_are_one_line_errors(trained_tiny, tmp_path, capsys):
    root, f32, _ = trained_tiny
    data = f32.read_bytes()
    cases = {
        "truncated": (data[:len(data) // 2], "points outside the file"),
        "header cut": (data[:300], "truncated"),
        "magic": (b"GGUX" + data[4:], "no GGUF magic"),
        "version": (data[:4] + struct.pack("<I", 7) + data[8:], "GGUF version 7 is not supported"),
        "empty": (b"", "cannot be read"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.gguf"
        path.write_bytes(content)
        assert main(["generate", str(path), "--max-new-tokens", "2", "hi"]) == 1, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)
    r = _camelid("generate", tmp_path / "truncated.gguf", "--max-new-tokens", "2", "hi")  # as a shell sees it
    assert r.returncode == 1 and "points outside the file" in r.stderr and "Traceback" not in r.stderr

    # a tensor type camelid does not read (Q1_0 = 41, which gguf cannot decode either): named with the tensor
    info = data.index(b"blk.0.attn_q.weight")
    type_at = info + len(b"blk.0.attn_q.weight") + 4 + 2 * 8
    bad = bytearray(data)
    bad[type_at:type_at + 4] = struct.pack("<I", 41)
    (tmp_path / "type.gguf").write_bytes(bytes(bad))
    with pytest.raises(CamelidError, match="'blk.0.attn_q.weight' has ggml type 41"):
        load_model(tmp_path / "type.gguf")
    # metadata of the wrong type
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    bad = bytearray(data)
    assert struct.unpack_from("<I", bad, at)[0] == 4  # UINT32
    bad[at:at + 4] = struct.pack("<I", 6)  # now FLOAT32
    (tmp_path / "meta.gguf").write_bytes(bytes(bad))
    with pytest.raises(CamelidError, match="'llama.block_count' should be int"):
        load_model(tmp_path / "meta.gguf")
    # an offset beyond the end of the file
    bad = bytearray(data)
    off_at = type_at + 4
    bad[off_at:off_at + 8] = struct.pack("<Q", 1 << 40)
    (tmp_path / "offset.gguf").write_bytes(bytes(bad))
    with pytest.raises(CamelidError, match="points outside the file"):
        load_model(tmp_path / "offset.gguf")


def test_export_refuses_bad_requests(trained_tiny, tmp_path):
    root, _, _ = trained_tiny
    r = run_main("export", root / "tiny", tmp_path / "out", "--gguf", "--quant", "q3_k")
    assert r.returncode == 1 and "--quant 'q3_k'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.gguf"))
    stories = load_model(REPO / "models" / "stories260K")
    for over, message in ((dict(arch="gptj", rope_interleaved=True), "this model is 'gptj'"),
                          (dict(arch="gpt_neox", norm="layernorm", gated_mlp=False, activation="gelu"),
                           "this model is 'gpt_neox'"),  # a NeoX without biases is not one llama.cpp computes
                          (dict(arch="gpt_neox", norm="layernorm", gated_mlp=False, qkv_bias=True, attn_out_bias=True,
                                mlp_bias=True), "--quant q4_k_m: camelid writes llama-quantize's Q4_K_M mix")):
        cfg = ModelConfig(vocab_size=512, dim=64, n_layers=1, n_heads=2, ffn_dim=128, **over)
        lm = LoadedModel(Transformer(cfg).eval(), stories.tokenizer, "raw", [], "x")
        with pytest.raises(CamelidError, match=message):
            export_gguf(lm, tmp_path / "families", "q4_k_m")
    assert not (tmp_path / "families").exists()  # refused before anything is written


@pytest.fixture(scope="module")
def small_gguf(trained_tiny, tmp_path_factory):
    root, _, _ = trained_tiny
    return export_gguf(load_model(root / "tiny"), tmp_path_factory.mktemp("fuzz"), "q4_0")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_gguf_is_read_or_refused_cleanly(small_gguf, tmp_path, data):
    """Corrupt bytes anywhere (header, tensor index, data) or cut the file: the reader and the model loader
    either work or raise CamelidError, never another exception or a crash."""
    raw = bytearray(small_gguf.read_bytes())
    header_end = min(len(raw), 6000)  # most mutations land where the structure is
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, header_end - 1) | st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    try:
        read_gguf(path)
        load_model(path)
    except CamelidError:
        pass


def test_well_formed_file_with_wrong_metadata_types(tmp_path):
    for key, value, message in (("tokenizer.ggml.tokens", [1, 2, 3], "should be array of str"),
                                ("tokenizer.ggml.bos_token_id", "one", "should be int"),
                                ("tokenizer.ggml.bos_token_id", 99, "is not one of the 3 tokens")):
        w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
        w.add_tokenizer_model("llama")
        if key != "tokenizer.ggml.tokens":
            w.add_token_list(["<unk>", "<s>", "</s>"])
        w.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str) else
                        gguf.GGUFValueType.ARRAY if isinstance(value, list) else gguf.GGUFValueType.UINT32)
        w.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(CamelidError, match=message):
            gguf_tokenizer(read_gguf_metadata(tmp_path / "m.gguf"), "m.gguf")


def test_kernel_build_failure_falls_back_to_pytorch(monkeypatch, tmp_path):
    """No C compiler (or no writable cache): a warning, PyTorch's kernels, nothing left behind."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ggml_kernel, "library", functools.cache(ggml_kernel._build))  # built afresh here
    assert not ggml_kernel.available()
    assert ggml_kernel.matmul(2, torch.zeros(4, 18, dtype=torch.uint8), torch.zeros(1, 32), 4) is None
    assert not list((tmp_path / "cache").rglob("*.so"))
