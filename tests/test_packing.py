"""Packing: samples packed in one row train exactly as they would alone (loss and gradients)."""

import torch
import torch.nn.functional as F

from camelid.data.masking import IGNORE, Sample
from camelid.data.packing import collate, pack_samples, unpacked_rows
from camelid.model.config import ModelConfig
from camelid.model.transformer import Transformer, init_weights, packed_positions_and_mask
from camelid.train.finetune import sft_loss


def samples(n=6):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 5 + 3 * i
        ids = torch.randint(3, 90, (length,), generator=g).tolist()
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        out.append(Sample(ids, labels))
    return out


def loss_sum(model, batch):
    logits = model(batch["inputs"], segment_ids=batch["segments"])
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), batch["targets"].view(-1), reduction="sum",
                           ignore_index=IGNORE)


def test_positions_restart_and_attention_stays_inside_a_segment():
    positions, mask = packed_positions_and_mask(torch.tensor([[0, 0, 0, 1, 1, 2]]))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False]


def test_packed_loss_and_gradients_equal_unpacked():
    rope = {"arch": "llama"}
    learned = {"arch": "gpt2", "positions": "learned", "norm": "layernorm", "gated_mlp": False, "activation": "gelu"}
    for family in (rope, learned):
        cfg = ModelConfig.from_dict(dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=96,
                                         max_seq_len=64, **family), "test")
        torch.manual_seed(0)
        model = init_weights(Transformer(cfg))
        data = samples()
        packed = pack_samples(data, 40)
        assert len(packed) < len(data) and all(len(r.inputs) <= 40 for r in packed)
        assert [t for r in packed for t in r.targets].count(IGNORE) == sum(
            s.labels[1:].count(IGNORE) + 1 for s in data)
        a = loss_sum(model, collate(packed))
        grads_a = torch.autograd.grad(a, list(model.parameters()))
        b = sum(loss_sum(model, collate([row])) for row in unpacked_rows(data))
        grads_b = torch.autograd.grad(b, list(model.parameters()))
        assert torch.allclose(a, b, rtol=1e-5)
        # Fine-tuning computes logits only where a token is trained: the same loss.
        assert torch.allclose(sft_loss(model, collate(packed)), a, rtol=1e-5)
        for ga, gb in zip(grads_a, grads_b):
            assert torch.allclose(ga, gb, atol=1e-5)


def test_explicit_attention_is_scaled_dot_product_attention(monkeypatch):
    """Training in bf16 on a CPU takes the explicit attention (faster there than the flash kernel's backward): it
    must compute what SDPA does, causal, with a packed or padded mask, and with grouped KV heads, gradients too."""
    from camelid.model import transformer

    torch.manual_seed(0)
    q = torch.randn(2, 8, 6, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 6, 16, requires_grad=True) for _ in range(2))
    _, packed_mask = packed_positions_and_mask(torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]))
    for mask in (None, packed_mask):
        ours = transformer.explicit_attention(q, k, v, mask, 0.0)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(ours.square().sum(), (q, k, v)),
                        torch.autograd.grad(ref.square().sum(), (q, k, v))):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=96, max_seq_len=32)
    model = init_weights(Transformer(cfg)).train()
    x = torch.randint(0, 96, (2, 16))
    losses = []
    for limit in (transformer.EXPLICIT_SCORES_BYTES, 0):  # explicit, then the flash kernel
        monkeypatch.setattr(transformer, "EXPLICIT_SCORES_BYTES", limit)
        assert transformer.explicit_attention_pays(torch.zeros(2, 4, 16, 16, dtype=torch.bfloat16),
                                                   torch.zeros(2, 2, 16, 16, dtype=torch.bfloat16)) == bool(limit)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(F.cross_entropy(model(x).flatten(0, 1).float(), x.flatten()))
    torch.testing.assert_close(losses[0], losses[1], atol=2e-2, rtol=0)


def test_logits_at_some_positions_equal_the_full_forward_and_its_gradients():
    """With logits wanted at some positions only, the last block's output projection and MLP run for those
    positions alone: logits and every gradient must equal the full forward's, for each residual layout."""
    small = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=96, max_seq_len=64)
    families = {
        "llama (pre-norm)": dict(arch="llama", n_kv_heads=2),
        "neox (parallel)": dict(arch="gpt_neox", norm="layernorm", activation="gelu", gated_mlp=False,
                                parallel_residual=True, rotary_pct=0.25, qkv_bias=True, attn_out_bias=True,
                                mlp_bias=True),
        "opt-350m (post-norm)": dict(arch="opt", norm="layernorm", activation="relu", gated_mlp=False,
                                     positions="learned", learned_pos_offset=2, qkv_bias=True, attn_out_bias=True,
                                     mlp_bias=True, pre_norm=False, final_norm=False, embed_proj_dim=16),
    }
    tokens = torch.randint(3, 90, (3, 12), generator=torch.Generator().manual_seed(1))
    at = torch.zeros(3, 12, dtype=torch.bool)
    at[0, 4:9], at[1, 11], at[2, 0] = True, True, True
    for name, family in families.items():
        cfg = ModelConfig.from_dict({**small, **family}, "test")
        torch.manual_seed(0)
        model = init_weights(Transformer(cfg))
        params = list(model.parameters())
        full = model(tokens)[at]
        some = model(tokens, logits_at=at)
        assert some.shape == (int(at.sum()), 96), name
        assert torch.allclose(some, full, atol=1e-5), name
        weights = torch.randn(some.shape, generator=torch.Generator().manual_seed(2))
        for g_some, g_full in zip(torch.autograd.grad((some * weights).sum(), params),
                                  torch.autograd.grad((full * weights).sum(), params)):
            assert torch.allclose(g_some, g_full, atol=1e-5), name
