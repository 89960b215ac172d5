"""camelid against transformers, for every family: same logits (1e-4, fp32), same greedy tokens, both ways."""

import pytest
import torch

from camelid.formats import hf as hf_format
from camelid.formats.load import build_model, export_hf
from camelid.formats.loaded import LoadedModel
from camelid.generate.generate import generate_tokens
from camelid.generate.sampling import SamplingParams
from camelid.tokenizer.piece_vocab import PieceVocab
from camelid.tokenizer.tokenizer import piece_tokenizer

from conftest import make_hf_model, tiny_hf_configs

FAMILIES = list(tiny_hf_configs())
IDS = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 9]])
GROWING_ROPE = {"llama-dynamic"}  # rotary tables that change with the sequence's length past 8 positions


def _camelid(folder):
    cfg, sd = hf_format.load_hf_folder(folder)
    return build_model(cfg, sd, str(folder))


def _hf_greedy(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_greedy_match_transformers(name, tmp_path):
    ref = make_hf_model(name, tmp_path)
    ours = _camelid(tmp_path)
    with torch.no_grad():
        expected = ref(IDS).logits
    got = ours(IDS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    tokens = [t[0] for t in generate_tokens(ours, [IDS[0].tolist()], 10, SamplingParams.greedy())]
    assert tokens == _hf_greedy(ref, IDS, 10)
    if name in GROWING_ROPE:  # past its context each step rotates by its own table: no one pass to compare with
        return
    # Decoding one token at a time through the KV cache gives the same logits as one full pass.
    cache = ours.new_kv_cache(1, IDS.shape[1])
    stepped = torch.cat([ours(IDS[:, i:i + 1], i, cache) for i in range(IDS.shape[1])], dim=1)
    torch.testing.assert_close(stepped, expected, atol=1e-4, rtol=0)
    # ... and so does a per-row position tensor, as the server's continuous batching passes it
    cache = ours.new_kv_cache(1, IDS.shape[1])
    rows = torch.cat([ours(IDS[:, i:i + 1], torch.tensor([i]), cache) for i in range(IDS.shape[1])], dim=1)
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_transformers(name, tmp_path):
    import transformers as tf

    make_hf_model(name, tmp_path / "src", seed=1)
    ours = _camelid(tmp_path / "src")
    vocab = PieceVocab([f"<{i}>" for i in range(ours.cfg.vocab_size)], [0.0] * ours.cfg.vocab_size,
                       special_ids={0, 1, 2})
    export_hf(LoadedModel(ours, piece_tokenizer(vocab, 1, [2])), tmp_path / "out")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, ours(IDS), atol=1e-4, rtol=0)


def test_pytorch_bin_and_sharded_safetensors(tmp_path):
    ref = make_hf_model("llama", tmp_path / "bin")
    # transformers 5 writes only safetensors; older checkpoints on disk are pickled state dicts.
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    torch.testing.assert_close(_camelid(tmp_path / "bin")(IDS), ref(IDS).logits.detach(), atol=1e-4, rtol=0)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_camelid(tmp_path / "sharded")(IDS), ref(IDS).logits.detach(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2-sliding", "qwen2_moe", "bloom"])
def test_batched_prompts_of_different_lengths_match_single(name, tmp_path):
    """Left padding changes no row's tokens; with a sliding window (5 and 6 positions here), the window counts
    real tokens, not padding."""
    make_hf_model(name, tmp_path)
    prompts = [[5, 17, 3], [44, 90, 12, 7, 61, 33, 2], [80]]
    for model in (_camelid(tmp_path),):
        alone = [[t[0] for t in generate_tokens(model, [p], 8, SamplingParams.greedy())] for p in prompts]
        together = list(zip(*generate_tokens(model, prompts, 8, SamplingParams.greedy())))
        assert [list(r) for r in together] == alone


@pytest.mark.parametrize("name", ["llama", "mistral", "mpt"])
def test_packed_rows_match_separate_sequences(name, tmp_path):
    """Two sequences packed in one row (segment ids) give each its own logits, the sliding window included."""
    make_hf_model(name, tmp_path)
    model = _camelid(tmp_path)
    a, b = IDS[:, :7], IDS[:, 7:]
    packed = model(torch.cat([a, b], dim=1), segment_ids=torch.tensor([[0] * 7 + [1] * 5]))
    torch.testing.assert_close(packed, torch.cat([model(a), model(b)], dim=1), atol=1e-5, rtol=0)
