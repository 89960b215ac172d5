"""T5 (ReLU, tied output scaled by dim^-0.5) and Flan-T5's shape (gated GELU, its own output layer) against
transformers' T5ForConditionalGeneration: the same logits (1e-4, fp32) with and without padding in the prompt,
step by step through the decoder's cache, and the same greedy text."""

import json

import pytest
import torch

from camelid.errors import CamelidError
from camelid.formats import hf as hf_format
from camelid.formats.load import build_model

SRC = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 61, 33, 2, 80, 9, 1], [8, 70, 21, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
SRC_MASK = SRC.ne(0) | (torch.arange(SRC.shape[1]) == 0)
TGT = torch.tensor([[0, 14, 62, 7, 30, 91, 2], [0, 5, 5, 40, 11, 3, 60]])


def _reference(name: str, seed: int = 0):
    import transformers as tf

    gated = name == "flan-t5"
    cfg = tf.T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated)
    torch.manual_seed(seed)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    if gated:  # Flan-T5's own output layer (transformers 5 ties it on construction)
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _folder(model, folder, gated: bool):
    """The checkpoint as the Hub has it: T5's config.json of its day (tie_word_embeddings false for v1.1)."""
    from safetensors.torch import save_file

    folder.mkdir()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if gated:
        tensors["lm_head.weight"] = model.lm_head.weight.detach().clone()
    else:
        tensors.pop("lm_head.weight", None)
    tensors.pop("encoder.embed_tokens.weight", None)
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"].clone()  # a copy older files carry
    save_file(tensors, folder / "model.safetensors")
    c = model.config
    config = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=c.vocab_size,
                  d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
                  num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
                  relative_attention_num_buckets=c.relative_attention_num_buckets,
                  relative_attention_max_distance=c.relative_attention_max_distance,
                  feed_forward_proj=c.feed_forward_proj, tie_word_embeddings=not gated, decoder_start_token_id=0,
                  layer_norm_epsilon=c.layer_norm_epsilon, is_encoder_decoder=True, eos_token_id=1, pad_token_id=0)
    (folder / "config.json").write_text(json.dumps(config))


def _greedy(ref, src: torch.Tensor, n: int, stop: set[int] = frozenset()) -> list[int]:
    """transformers' greedy decoding, each step a full forward pass (its generate() cannot run a decoder deeper
    than the encoder)."""
    tokens = [0]
    for _ in range(n):
        t = int(ref(input_ids=src, decoder_input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
        if t in stop:
            break
        tokens.append(t)
    return tokens


def _vocab_folder(folder, vocab_size: int, **config):
    """The ReLU T5 with a vocabulary of `vocab_size` (a real tokenizer's), written as a folder."""
    ref = _reference("t5")
    ref.resize_token_embeddings(vocab_size)
    with torch.no_grad():
        ref.shared.weight.normal_(0.0, 0.3)
    _folder(ref, folder, gated=False)
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**written, "vocab_size": vocab_size, **config}))
    return ref


def _flan_folder(folder, **config):
    """The Flan-T5 shape with a 512-token SentencePiece vocabulary (stories260K's), written as a folder."""
    import shutil

    from conftest import SHARED

    ref = _reference("flan-t5")
    ref.resize_token_embeddings(512)
    ref.lm_head = torch.nn.Linear(64, 512, bias=False)
    with torch.no_grad():
        ref.shared.weight.normal_(0.0, 0.3)
        ref.lm_head.weight.normal_(0.0, 0.3)
    _folder(ref, folder, gated=True)
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**written, "vocab_size": 512, **config}))
    shutil.copy(SHARED / "models" / "stories260K" / "tok512.model", folder / "spiece.model")
    return ref


def _camelid(folder):
    cfg, sd = hf_format.load_hf_folder(folder)
    return build_model(cfg, sd, str(folder))


@pytest.mark.parametrize("name", ["t5", "flan-t5"])
def test_logits_and_greedy_text_match_transformers(name, tmp_path):
    ref = _reference(name)
    _folder(ref, tmp_path / "m", gated=name == "flan-t5")
    ours = _camelid(tmp_path / "m")
    assert (ours.cfg.logit_scale is None) == (name == "flan-t5")
    with torch.no_grad():
        want = ref(input_ids=SRC, attention_mask=SRC_MASK.long(), decoder_input_ids=TGT).logits
        got = ours(TGT, ours.encode(SRC, SRC_MASK), keep_cache=False)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        cache = ours.encode(SRC, SRC_MASK)  # one token at a time through the decoder's cache
        stepped = torch.cat([ours(TGT[:, i:i + 1], cache) for i in range(TGT.shape[1])], dim=1)
        torch.testing.assert_close(stepped, want, atol=1e-4, rtol=0)
        expected = _greedy(ref, SRC[:1], 12)
    cache, tokens = ours.encode(SRC[:1]), [0]
    for _ in range(12):
        tokens.append(int(ours(torch.tensor([tokens[-1:]]), cache)[0, -1].argmax()))
    assert tokens == expected


def test_missing_relative_attention_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _folder(_reference("t5"), tmp_path / "m", gated=False)
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CamelidError, match="'decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight' "
                                           "is missing"):
        _camelid(tmp_path / "m")


def test_generate_chat_quantize_and_convert_from_the_command_line(tmp_path, capsys, monkeypatch):
    """A T5 folder with a SentencePiece `spiece.model`: `generate` prints transformers' greedy reply, `chat`
    answers in FastChat-T5's format, `quantize` (round to nearest) and `convert --to hf` write models that
    load with the same logits, and the commands built on a decoder-only stream refuse it by name."""
    import io
    import shutil

    from camelid.cli import main
    from camelid.formats.load import load_model

    from conftest import SHARED

    ref = _vocab_folder(tmp_path / "m", 512)
    shutil.copy(SHARED / "models" / "stories260K" / "tok512.model", tmp_path / "m" / "spiece.model")
    lm = load_model(tmp_path / "m")
    assert lm.template == "one_shot"
    src = lm.tokenizer.encode("Once upon a time", bos=False) + lm.tokenizer.eos_ids[:1]
    with torch.no_grad():
        expected = _greedy(ref, torch.tensor([src]), 10, stop=set(lm.tokenizer.eos_ids))
    reply = expected[1:]
    assert len(reply) >= 5  # a reply to compare, not an immediate end
    assert main(["generate", str(tmp_path / "m"), "Once upon a time", "-n", "10", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == lm.tokenizer.decode(reply).strip()

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/exit\n"))
    assert main(["chat", str(tmp_path / "m"), "-n", "6"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "m"), "Once", "--lookup"]) == 1
    assert "an encoder-decoder model (T5) generates without --lookup" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "m")]) == 0
    assert f"parameters     {sum(p.numel() for p in lm.model.parameters()):,}" in capsys.readouterr().out

    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--mode", "int8"]) == 0
    ids, tgt = torch.tensor([src]), torch.tensor([[0, 5, 9]])
    with torch.no_grad():
        want = ref(input_ids=ids, decoder_input_ids=tgt).logits
        q = load_model(tmp_path / "q").model
        torch.testing.assert_close(q(tgt, q.encode(ids), keep_cache=False), want, atol=0.05, rtol=0)
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q4"), "--mode", "int4"]) == 0
    with torch.no_grad():  # int4 groups of 32 on this 64-wide random model: close, not equal
        q4 = load_model(tmp_path / "q4").model
        assert type(q4.encoder[0].attn.wqkv).__name__ == type(q4.layers[0].cross.wkv).__name__ == "Int4Linear"
        got = q4(tgt, q4.encode(ids), keep_cache=False)
        assert torch.corrcoef(torch.stack((got.flatten(), want.flatten())))[0, 1] > 0.95
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = _camelid(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(back(tgt, back.encode(ids), keep_cache=False), want, atol=1e-4, rtol=0)

    calibration = tmp_path / "c.txt"
    calibration.write_text("Once upon a time there was a cat. " * 50)
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "g"), "--method", "gptq", "--calibration",
                 str(calibration)]) == 1
    assert "an encoder-decoder model (T5) runs in `generate`" in capsys.readouterr().err


def test_choice_log_likelihoods_equal_lm_evals_seq2seq_backend(tmp_path, monkeypatch):
    """lm-eval's HF backend runs a T5 folder as an encoder-decoder (the context, ending in EOS, to the encoder;
    the continuation to the decoder): camelid eval gives every request's log-likelihood within 1e-4."""
    pytest.importorskip("lm_eval")
    from tokenizers import Tokenizer, processors

    from camelid.eval.harness import EvalSettings, evaluate
    from camelid.formats.load import load_model

    from conftest import SHARED
    from lm_eval_local import run_lm_eval, write_local_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    shots = {"arc_easy": 1, "hellaswag": 0}
    d, tasks = write_local_tasks(tmp_path / "eval", {**shots, "mmlu_abstract_algebra": 0, "truthfulqa_mc1": 0,
                                                     "truthfulqa_mc2": 0}, n_hellaswag=4)
    _vocab_folder(tmp_path / "m", 50257, eos_token_id=50256)
    # GPT-2's BPE ending each text in EOS, as T5's tokenizers end what they encode
    tok = Tokenizer.from_file(str(SHARED / "tokenizers" / "gpt2_tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", 50256)])
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    theirs = run_lm_eval(tmp_path / "m", tasks, shots, add_bos=None)
    _, samples = evaluate(load_model(tmp_path / "m"), EvalSettings(list(shots), str(d), shots=shots))
    compared = 0
    for task in shots:
        ref_samples = sorted(theirs["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
        for r, g in zip(ref_samples, samples[task], strict=True):
            for (ll, greedy), resp in zip(g["resps"], r["resps"], strict=True):
                assert ll == pytest.approx(float(resp[0][0]), abs=1e-4), task
                assert greedy == resp[0][1]
                compared += 1
    assert compared > 20


def test_full_fine_tuning_has_transformers_loss_and_learns(tmp_path):
    """camelid finetune on a T5 folder: each reply is a target for the prompt before it (FastChat-T5's way); the
    loss of a batch is transformers' (labels = the reply), and a short run lowers it and writes a model that
    generates."""

    from camelid.data.masking import mask_conversation
    from camelid.data.packing import collate_seq2seq, seq2seq_rows
    from camelid.formats.load import load_model
    from camelid.train.config import FinetuneConfig
    from camelid.train.finetune import finetune, sft_loss

    from conftest import SHARED

    ref = _flan_folder(tmp_path / "m", eos_token_id=2)
    ref.config.decoder_start_token_id, ref.config.pad_token_id = 0, 0
    lm = load_model(tmp_path / "m")
    records = json.loads((SHARED / "instruct" / "alpaca_en_demo.json").read_text())[:24]
    conversation = [{"role": "user", "content": records[0]["instruction"]},
                    {"role": "assistant", "content": records[0]["output"]}]
    rows = seq2seq_rows(mask_conversation(lm.tokenizer, "alpaca", conversation, 128), lm.tokenizer.eos_ids[0])
    assert len(rows) == 1 and rows[0].inputs[-1] == lm.tokenizer.eos_ids[0]
    batch = collate_seq2seq(rows, 0)
    with torch.no_grad():
        want = ref(input_ids=batch["inputs"], labels=torch.tensor([rows[0].targets])).loss
        got = sft_loss(lm.model, batch) / len(rows[0].targets)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = FinetuneConfig(base=str(tmp_path / "m"), data=str(tmp_path / "data.json"), template="alpaca", max_len=128,
                         epochs=3, micro_batch=4, lr=3e-3, out_dir=str(tmp_path / "run"), log_every=1,
                         eval_every=100, ckpt_every=100, threads=2, seed=3, compile=False)
    folder = finetune(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses
    tuned = load_model(folder)
    assert tuned.config.n_encoder_layers == 2
    from camelid.generate.generate import generate

    assert generate(tuned, [tuned.tokenizer.encode("Give three tips", bos=False)], 8)[0].tokens


def test_lora_adapters_are_pefts_in_both_stacks(tmp_path):
    """A PEFT adapter on Flan-T5's shape (q, v, o and wi_0: self-attention in both stacks, cross-attention and the
    gated MLP) gives PEFT's logits in camelid; `camelid finetune` with method lora trains one (the usual
    q_proj/v_proj targets are T5's q and v), whose adapter PEFT loads with camelid's logits."""
    import copy

    peft = pytest.importorskip("peft")
    from camelid.formats.load import load_model
    from camelid.formats.peft import load_adapter
    from camelid.train.config import FinetuneConfig
    from camelid.train.finetune import finetune

    from conftest import SHARED

    ref = _flan_folder(tmp_path / "m")
    src, tgt = torch.tensor([[5, 17, 3, 44, 90, 12, 1]]), torch.tensor([[0, 14, 62, 7, 30]])

    tuned = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8,
                                                                     target_modules=["q", "v", "o", "wi_0"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    tuned.save_pretrained(tmp_path / "peft")
    lm = load_model(tmp_path / "m")
    load_adapter(lm.model, tmp_path / "peft")
    layers = {n for n, m in lm.model.named_modules() if hasattr(m, "lora_A")}
    assert {"encoder.0.attn.wqkv", "layers.0.attn.wqkv", "layers.0.cross.wq", "layers.0.cross.wkv",
            "layers.0.cross.wo", "encoder.1.mlp.w_in"} <= layers
    with torch.no_grad():
        want = tuned(input_ids=src, decoder_input_ids=tgt).logits
        got = lm.model(tgt, lm.model.encode(src), keep_cache=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    records = json.loads((SHARED / "instruct" / "alpaca_en_demo.json").read_text())[:24]
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = FinetuneConfig(base=str(tmp_path / "m"), data=str(tmp_path / "data.json"), template="alpaca", max_len=128,
                         epochs=2, micro_batch=4, lr=1e-2, method="lora", lora_rank=4, out_dir=str(tmp_path / "run"),
                         log_every=1, eval_every=100, ckpt_every=100, threads=2, seed=3, compile=False)
    merged = load_model(finetune(cfg)).model
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "run" / "adapter").eval()
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["target_modules"] == \
        ["q", "v"]
    with torch.no_grad():
        want = theirs(input_ids=src, decoder_input_ids=tgt).logits
        assert (want - ref(input_ids=src, decoder_input_ids=tgt).logits).abs().max() > 1e-3  # it learned something
        torch.testing.assert_close(merged(tgt, merged.encode(src), keep_cache=False), want, atol=1e-4, rtol=0)
