"""Meta's original checkpoints (params.json + consolidated.NN.pth, model-parallel shards) and delta weights
(Vicuna-style), against transformers and FastChat."""

import json
import shutil

import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats.load import load_model

from conftest import REPO

TOKENIZER = REPO.parent / "shared" / "data" / "models" / "stories260K" / "tok512.model"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"needs {TOKENIZER}")
# Meta's FeedForward for dim 64: 2/3 of 4 * 64 = 170, rounded up to a multiple of 32 -> 192
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096)


def tiny_llama():
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE)).eval()


def _to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows back to Meta's interleaved rotary pairs (its conversion script's permute undone)."""
    out, cols = w.shape
    return w.view(heads, 2, out // heads // 2, cols).transpose(1, 2).reshape(out, cols)


def save_meta(model, folder, ranks: int = 2):
    """The model as Meta's download has it: each rank's slice of every tensor (fairscale's column-parallel
    layers by rows, row-parallel ones and the embedding by columns), norms whole in every file."""
    folder.mkdir(parents=True)
    sd = model.state_dict()
    split = {"q_proj": ("attention.wq", 0), "k_proj": ("attention.wk", 0), "v_proj": ("attention.wv", 0),
             "o_proj": ("attention.wo", 1), "gate_proj": ("feed_forward.w1", 0), "up_proj": ("feed_forward.w3", 0),
             "down_proj": ("feed_forward.w2", 1)}
    shards = [{} for _ in range(ranks)]
    for i in range(SHAPE["num_hidden_layers"]):
        for hf_name, (meta, dim) in split.items():
            part = "self_attn" if hf_name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            w = sd[f"model.layers.{i}.{part}.{hf_name}.weight"]
            if hf_name in ("q_proj", "k_proj"):
                w = _to_pairs(w, SHAPE["num_attention_heads" if hf_name == "q_proj" else "num_key_value_heads"])
            for r, piece in enumerate(w.chunk(ranks, dim=dim)):
                shards[r][f"layers.{i}.{meta}.weight"] = piece.clone()
        for r in range(ranks):
            shards[r][f"layers.{i}.attention_norm.weight"] = sd[f"model.layers.{i}.input_layernorm.weight"].clone()
            shards[r][f"layers.{i}.ffn_norm.weight"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"].clone()
    for r in range(ranks):
        shards[r]["tok_embeddings.weight"] = sd["model.embed_tokens.weight"].chunk(ranks, dim=1)[r].clone()
        shards[r]["output.weight"] = sd["lm_head.weight"].chunk(ranks, dim=0)[r].clone()
        shards[r]["norm.weight"] = sd["model.norm.weight"].clone()
        shards[r]["rope.freqs"] = torch.zeros(8)  # LLaMA 1 files carry it; nothing reads it
        torch.save(shards[r], folder / f"consolidated.{r:02d}.pth")
    (folder / "params.json").write_text(json.dumps({"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2,
                                                    "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}))
    shutil.copy(TOKENIZER, folder.parent / "tokenizer.model")  # where Meta's download puts it


@needs_tokenizer
def test_metas_two_shard_checkpoint_gives_transformers_logits(tmp_path):
    ref = tiny_llama()
    save_meta(ref, tmp_path / "llama-2-tiny")
    lm = load_model(tmp_path / "llama-2-tiny")
    assert lm.config.ffn_dim == 192 and lm.config.max_seq_len == 4096 and lm.config.n_kv_heads == 2
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), ref(ids).logits, atol=1e-4, rtol=0)
    assert lm.tokenizer.encode("Once upon a time", bos=True)[0] == 1


@needs_tokenizer
def test_a_broken_meta_checkpoint_is_a_clear_error(tmp_path):
    save_meta(tiny_llama(), tmp_path / "m")
    second = torch.load(tmp_path / "m" / "consolidated.01.pth", weights_only=True)
    del second["layers.1.attention.wk.weight"]
    torch.save(second, tmp_path / "m" / "consolidated.01.pth")
    with pytest.raises(CamelidError, match=r"consolidated\.01\.pth: tensor layers\.1\.attention\.wk\.weight is missing"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    with pytest.raises(CamelidError, match=r"params\.json: n_heads must be a positive integer"):
        load_model(tmp_path / "m")


def _hf_folder(model, folder):
    """The model in fp16 as a Hugging Face folder with its SentencePiece tokenizer (as LMSYS published them)."""
    model.to(torch.float16).save_pretrained(folder)
    shutil.copy(TOKENIZER, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                              "bos_token": "<s>", "eos_token": "</s>"}))


def _tuned(base, vocab: int | None = None):
    """The base after a little 'fine-tuning' (noise on every weight), its vocabulary grown to `vocab`."""
    import copy

    tuned = copy.deepcopy(base)
    if vocab:
        tuned.resize_token_embeddings(vocab)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tuned


def _delta(base, tuned, folder):
    """LMSYS's make_delta: the tuned model minus the base, both fp16 (rows the base lacks: the tuned model's)."""
    import copy

    delta = copy.deepcopy(tuned).to(torch.float16)
    base_sd = base.to(torch.float16).state_dict()
    with torch.no_grad():
        for name, p in delta.state_dict().items():
            p[:base_sd[name].shape[0]] -= base_sd[name]
    _hf_folder(delta, folder)


def _weights(folder):
    from camelid.formats.tensors import load_tensor_files

    return load_tensor_files(folder)


@needs_tokenizer
def test_apply_delta_gives_fastchats_result_bit_for_bit(tmp_path, monkeypatch):
    fastchat_delta = pytest.importorskip("fastchat.model.apply_delta")
    from camelid.cli import main

    base = tiny_llama()
    tuned = _tuned(base)
    _hf_folder(tiny_llama(), tmp_path / "llama-tiny")
    _delta(tiny_llama(), tuned, tmp_path / "vicuna-tiny-delta-v1.1")

    class _NoTokenizer:  # FastChat copies the delta's tokenizer with transformers' slow class; only weights matter
        @staticmethod
        def from_pretrained(*_, **__):
            return type("T", (), {"save_pretrained": lambda self, *_: None})()

    monkeypatch.setattr(fastchat_delta, "AutoTokenizer", _NoTokenizer)
    fastchat_delta.apply_delta(str(tmp_path / "llama-tiny"), str(tmp_path / "fastchat"),
                               str(tmp_path / "vicuna-tiny-delta-v1.1"))
    assert main(["apply-delta", str(tmp_path / "llama-tiny"), str(tmp_path / "vicuna-tiny-delta-v1.1"),
                 str(tmp_path / "vicuna-tiny")]) == 0
    ours, theirs = _weights(tmp_path / "vicuna-tiny"), _weights(tmp_path / "fastchat")
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    lm = load_model(tmp_path / "vicuna-tiny")  # the folder loads, and is the tuned model (fp16 rounding aside)
    ids = torch.arange(40).view(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), tuned.to(torch.float32)(ids).logits, atol=2e-2, rtol=0)
    assert lm.template == "vicuna_v1.1"  # FastChat's format for a model named vicuna


@needs_tokenizer
def test_apply_delta_from_metas_checkpoint_with_a_grown_vocabulary(tmp_path):
    """Vicuna v0's delta has a pad token more than LLaMA: its row is the delta's, the rest base + delta; the base
    may be Meta's own checkpoint."""
    from camelid.formats.delta import apply_delta

    base = tiny_llama()
    save_meta(base, tmp_path / "meta" / "7B")
    _delta(tiny_llama(), _tuned(base, vocab=513), tmp_path / "delta-v0")
    apply_delta(tmp_path / "meta" / "7B", tmp_path / "delta-v0", tmp_path / "out")
    out, delta, ref = _weights(tmp_path / "out"), _weights(tmp_path / "delta-v0"), tiny_llama().to(torch.float16)
    for name, t in ref.state_dict().items():
        expected = delta[name].clone()
        expected[:t.shape[0]] += t
        assert torch.equal(out[name], expected), name
    assert out["model.embed_tokens.weight"].shape[0] == 513


@needs_tokenizer
def test_a_delta_for_another_base_is_refused_and_nothing_is_written(tmp_path, capsys):
    from camelid.cli import main

    _hf_folder(tiny_llama(), tmp_path / "base")
    other = tiny_llama()
    other.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(64, 128))
    other.config.intermediate_size = 128
    _hf_folder(other, tmp_path / "delta")
    assert main(["apply-delta", str(tmp_path / "base"), str(tmp_path / "delta"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("camelid: error: ") and "model.layers.1.mlp.down_proj.weight has shape (64, 128)" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))
