"""The paged KV cache and its block pool: through it every family computes what transformers computes, a
prefix is reused only where it is the same, and the pool never promises what it does not have."""

import os

import numpy as np
import pytest
import torch

from camelid.formats import hf as hf_format
from camelid.formats.load import build_model, load_model
from camelid.generate.generate import KVSession, Stats, generate
from camelid.generate.kv_blocks import BlockPool
from camelid.generate.sampling import SamplingParams
from camelid.model.kv_cache import PagedKVCache, dequantize_q8_0, quantize_q8_0

from conftest import REPO, make_hf_model

FAMILIES = ["llama", "mistral", "qwen2-sliding", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "bloom", "mpt",
            "falcon-40b-style", "starcoder"]
A = [5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 9, 14, 27, 66, 71, 4, 38, 50, 21]
B = [8, 30, 1, 77, 45, 19, 60, 3, 92, 11, 6, 55, 23, 40]


def _pool_for(model, n_blocks=24, block_size=4, kv_type="f32"):
    cfg = model.cfg
    return PagedKVCache(cfg.n_layers, n_blocks, block_size, cfg.n_kv_heads, cfg.head_dim, model.dtype, model.device,
                        kv_type)


@pytest.mark.parametrize("name", FAMILIES)
def test_paged_prefill_in_chunks_and_batched_decode_equal_transformers(name, tmp_path):
    """Two sequences in scattered blocks: prompts prefilled in chunks (the second one from a later start), then
    decoded together, each row at its own position; every logit equals transformers' over the whole sequence."""
    ref = make_hf_model(name, tmp_path)
    cfg, sd = hf_format.load_hf_folder(tmp_path)
    ours = build_model(cfg, sd, str(tmp_path))
    with torch.no_grad():
        expected = [ref(torch.tensor([s])).logits[0] for s in (A, B)]
    cache = _pool_for(ours)
    tables = torch.tensor([[9, 2, 17, 5, 11], [3, 20, 0, 14, 7]])  # 5 blocks of 4: 20 positions each
    got = [[], []]
    with torch.inference_mode():
        for row, seq, cuts in ((0, A, (0, 6, 11)), (1, B, (0, 3, 8))):
            one = cache.rows(tables[row:row + 1])
            for start, end in zip(cuts, cuts[1:]):
                got[row].append(ours(torch.tensor([seq[start:end]]), start, one)[0])
        both = cache.rows(tables)
        for step in range(6):  # A from position 11, B from 8: rows at different positions
            positions = torch.tensor([11 + step, 8 + step])
            tokens = torch.tensor([[A[11 + step]], [B[8 + step]]])
            logits = ours(tokens, positions, both)
            got[0].append(logits[0])
            got[1].append(logits[1])
    for row, n in ((0, 17), (1, 14)):
        torch.testing.assert_close(torch.cat(got[row]), expected[row][:n], atol=1e-4, rtol=0)


def test_q8_0_blocks_are_llama_cpps():
    """The q8_0 KV cache stores what gguf-py's quantize gives for GGML's Q8_0 type, bit for bit."""
    gguf = pytest.importorskip("gguf")
    x = torch.randn(7, 64) * torch.logspace(-3, 2, 7).unsqueeze(1)
    x[3, :32] = 0.0  # an all-zero block has scale 0
    q, d = quantize_q8_0(x)
    raw = gguf.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(7, 2, 34)
    np.testing.assert_array_equal(d.numpy().view(np.uint8).reshape(7, 2, 2), raw[:, :, :2])
    np.testing.assert_array_equal(q.numpy().view(np.uint8).reshape(7, 2, 32), raw[:, :, 2:])
    back = gguf.dequantize(raw.reshape(7, 68), gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(dequantize_q8_0(q, d, torch.float32).numpy(), back)


@pytest.mark.parametrize("kv_type", ["f16", "bf16", "q8_0"])
def test_smaller_kv_types_stay_close_and_store_what_they_say(kv_type, tmp_path):
    make_hf_model("qwen3", tmp_path)  # head_dim 32: one q8_0 block per head
    cfg, sd = hf_format.load_hf_folder(tmp_path)
    model = build_model(cfg, sd, str(tmp_path))
    with torch.inference_mode():
        full = model(torch.tensor([A]))[0]
        cache = _pool_for(model, kv_type=kv_type)
        table = cache.rows(torch.tensor([[4, 1, 8, 0, 2]]))
        first = model(torch.tensor([A[:1]]), 0, table)[0]
        rest = model(torch.tensor([A[1:]]), 1, table)[0]  # every later position reads the stored keys and values
    got = torch.cat([first, rest])
    err = (got - full).abs().max().item()
    assert 0 < err < {"f16": 2e-3, "bf16": 3e-2, "q8_0": 3e-2}[kv_type]
    assert cache.k[0].dtype == {"f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.int8}[kv_type]
    f32 = _pool_for(model).nbytes
    assert cache.nbytes == {"f16": f32 // 2, "bf16": f32 // 2, "q8_0": f32 * 34 // 128}[kv_type]


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads this process's RSS from /proc")
def test_the_pool_is_zeros_and_takes_memory_only_where_written():
    """A batch reads past a row's own positions (masked), so the pool must hold no stale NaN; and its pages are
    only taken as blocks are written, however large the budget."""
    stale = torch.full((64 << 20,), float("nan"))  # freed memory a new pool could be handed
    del stale
    before = _rss()
    pool = PagedKVCache(4, 4096, 16, 8, 64, torch.float32, "cpu")  # 4 layers, k and v, 4096 blocks: 1 GiB
    pool.k[0][:8] = 1.0
    assert pool.nbytes == 1 << 30 and _rss() - before < 64 << 20
    # (a read maps pages too, as RSS counts them: a few blocks of each tensor, not all)
    assert all(not t[8:64].any() and not t[-64:].any() for t in pool.k[1:] + pool.v + [pool.k[0][8:]])
    assert float(pool.k[0][:8].sum()) == 8 * 16 * 8 * 64


def test_a_head_size_q8_0_cannot_block_is_refused():
    with pytest.raises(ValueError, match="divisible by 32"):
        PagedKVCache(1, 2, 4, 2, 16, torch.float32, "cpu", "q8_0")


def test_block_pool_reserves_reuses_and_evicts_least_recent_ends_first():
    pool = BlockPool(8, 4)
    tokens = list(range(10))
    [a] = pool.admit(tokens, 12)  # 3 blocks promised
    assert a.cached == 0 and pool.available == 5
    held = list(pool.grow(a, 10))
    pool.commit(a, tokens)  # two full blocks keyed
    assert pool.admit(list(range(100, 130)), 30) is None  # 8 blocks: more than the 5 it can promise
    pool.release(a)
    assert pool.used == 0 and pool.cached == 2 and pool.available == 8
    [b] = pool.admit(tokens[:8] + [77, 78], 10)  # the same first 8 tokens: both blocks reused
    assert b.cached == 8 and b.blocks == held[:2]
    [c] = pool.admit(tokens[:4] + [50] * 6, 10)  # only the first block is the same prefix
    assert c.cached == 4 and c.blocks == b.blocks[:1]
    [d] = pool.admit(tokens[:8], 8)  # a whole cached prompt still computes its last token
    assert d.cached == 4
    for s in (b, c, d):
        pool.release(s)
    # a block keyed for one adapter is not another adapter's
    [e] = pool.admit(tokens, 10, adapter=1)
    assert e.cached == 0
    pool.release(e)


def test_eviction_keeps_the_shorter_prefix():
    pool = BlockPool(4, 2)
    [a] = pool.admit([1, 2, 3, 4, 5, 6, 7, 8], 8)
    pool.grow(a, 8)
    pool.commit(a, [1, 2, 3, 4, 5, 6, 7, 8])
    pool.release(a)
    [b] = pool.admit([9, 9], 4)  # needs 2 blocks: the cached chain's last two go
    pool.grow(b, 4)
    assert pool.stats.evictions == 2
    pool.release(b)
    [c] = pool.admit([1, 2, 3, 4, 5], 6)
    assert c.cached == 4


def test_a_twin_prefix_computed_at_the_same_time_is_not_keyed_twice():
    pool = BlockPool(8, 2)
    [a], [b] = pool.admit([1, 2, 3], 4), pool.admit([1, 2, 3], 4)
    for s in (a, b):
        pool.grow(s, 3)
    pool.commit(a, [1, 2, 3])
    pool.commit(b, [1, 2, 3])
    assert b.keys == []
    pool.release(a)
    pool.release(b)
    assert pool.cached == 1 and pool.used == 0 and pool.available == 8


@pytest.fixture(scope="module")
def stories():
    return load_model(REPO / "models" / "stories260K")


def test_a_session_reuses_a_prefix_and_generates_what_plain_decoding_does(stories):
    lm = stories
    tok = lm.tokenizer
    story = tok.encode("Once upon a time there was a little girl named Lily. She loved to play outside.")
    first, second = story + tok.encode("One day", bos=False), story + tok.encode("Then she", bos=False)
    session = KVSession(lm.model, tokens=256)
    for prompt in (first, second, first):
        stats = Stats()
        plain = generate(lm, [prompt], 24, SamplingParams.greedy())[0]
        cached = generate(lm, [prompt], 24, SamplingParams.greedy(), stats=stats, session=session)[0]
        assert cached.tokens == plain.tokens
    assert stats.cached_tokens >= len(story) // 16 * 16 and session.pool.used == 0
    sampled = [generate(lm, [second], 16, SamplingParams(temperature=1.0, seed=3), session=s)[0].tokens
               for s in (session, None)]
    assert sampled[0] == sampled[1]


def test_a_session_too_small_says_so(stories):
    from camelid.errors import CamelidError

    with pytest.raises(CamelidError, match="KV session holds 16 tokens"):
        generate(stories, ["Once upon a time there was"], 30, SamplingParams.greedy(),
                 session=KVSession(stories.model, tokens=16))
