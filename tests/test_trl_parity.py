"""Preference losses against TRL: on the same tiny random LLaMA, the same token ids and settings, camelid's DPO
(and cDPO), IPO, ORPO, SimPO, KTO and reward-model losses and every parameter's gradient equal TRL's (fp32)."""

import warnings
from pathlib import Path

import pytest
import torch

from camelid.formats.load import load_model
from camelid.model.transformer import add_score_head
from camelid.train.config import FinetuneConfig
from camelid.train.preference import Item, item_loss, reference_logps

from conftest import make_hf_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
warnings.filterwarnings("ignore", module="trl")

# Prompts and replies of unequal lengths, so padding and the shared-prompt layout both matter. 0 is TRL's pad.
PAIRS = [([2, 3, 4, 5], [6, 7, 1], [8, 1]), ([2, 9], [10, 1], [11, 12, 13, 1]), ([2, 20, 21, 22, 23, 24], [25, 1],
                                                                               [26, 27, 1])]
UNPAIRED = [([2, 3, 4], [6, 7, 1], True), ([2, 9], [10, 1], False), ([2, 20, 21], [22, 23, 24, 1], True),
            ([2, 30], [31, 1], False)]


def hf_names(name: str) -> list[str]:
    """The transformers parameters a camelid LLaMA parameter is made of (q/k/v and gate/up are fused)."""
    fixed = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "output.weight": ["lm_head.weight"],
             "norm.weight": ["model.norm.weight"], "score.weight": ["score.weight"]}
    if name in fixed:
        return fixed[name]
    _, i, rest = name.split(".", 2)
    p = f"model.layers.{i}."
    return {"attn.wqkv.weight": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
            "attn.wo.weight": [p + "self_attn.o_proj.weight"],
            "mlp.w_in.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
            "mlp.w_out.weight": [p + "mlp.down_proj.weight"], "attn_norm.weight": [p + "input_layernorm.weight"],
            "mlp_norm.weight": [p + "post_attention_layernorm.weight"]}[rest]


def assert_same_gradients(ours, theirs):
    hf = dict(theirs.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        parts = hf_names(name)
        if not all(n in hf for n in parts):  # a reward model has no lm_head
            continue
        torch.testing.assert_close(p.detach(), torch.cat([hf[n].detach() for n in parts]), atol=0, rtol=0)
        torch.testing.assert_close(p.grad, torch.cat([hf[n].grad for n in parts]), atol=1e-6, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
        compared += 1
    assert compared >= 9


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    make_hf_model("llama", root / "policy", seed=0)
    make_hf_model("llama", root / "reference", seed=1)  # another model, so the log-ratios are not zero
    for name in ("policy", "reference"):
        hf_tokenizer().save_pretrained(root / name)
    return root


def hf_tokenizer():
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="t0", eos_token="t1", bos_token="t2")


def hf(folder: Path, cls="AutoModelForCausalLM", **kw):
    import transformers as tf

    return getattr(tf, cls).from_pretrained(folder, attn_implementation="eager", **kw).train()


def ours(folder: Path):
    return load_model(folder, "cpu", "fp32").model.train().requires_grad_(True)


def common(tmp_path):
    # fp32: TRL turns bf16 on by default, and accelerate then runs the forward under autocast
    return dict(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4, use_cpu=True, bf16=False)


def text_pairs():
    return datasets.Dataset.from_list([{"prompt": "t3", "chosen": " t4", "rejected": " t5"}] * 2)


def camelid_loss(cfg, model, items, ref=None):
    total, nll = item_loss(cfg, model, items, ref, "cpu", None)
    n_nll = sum(len(it.replies[0]) + (len(it.prompt) - 1 if cfg.train_on_prompt else 0) for it in items)
    return total / len(items) + (nll / n_nll if cfg.method == "orpo" else 0.0)


def pair_items(pairs):
    return [Item(p, [c, r]) for p, c, r in pairs]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl(models, tmp_path, loss_type):
    from trl import DPOConfig, DPOTrainer

    policy, reference = hf(models / "policy"), hf(models / "reference")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(beta=0.3, loss_type=[loss_type],
                                                                           **common(tmp_path)),
                         train_dataset=text_pairs(), processing_class=hf_tokenizer())
    batch = trainer.data_collator([dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in PAIRS])
    expected = trainer.compute_loss(policy, batch)
    expected.backward()

    model, items = ours(models / "policy"), pair_items(PAIRS)
    ref = reference_logps(ours(models / "reference"), items, 2, "cpu", progress=False)
    loss = camelid_loss(FinetuneConfig(method="dpo" if loss_type == "sigmoid" else "ipo", beta=0.3), model, items,
                        ref)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert_same_gradients(model, policy)


def test_cdpo_label_smoothing_is_the_mixture_of_trls_pair_and_its_swap(models, tmp_path):
    """TRL 1.x dropped cDPO from its sigmoid loss; cDPO is, by definition, (1 - e) of the pair's DPO loss plus e
    of the loss with chosen and rejected swapped: both computed by TRL."""
    from trl import DPOConfig, DPOTrainer

    e = 0.2
    policy, reference = hf(models / "policy"), hf(models / "reference")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(beta=0.3, **common(tmp_path)),
                         train_dataset=text_pairs(), processing_class=hf_tokenizer())
    straight = trainer.data_collator([dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in PAIRS])
    swapped = trainer.data_collator([dict(prompt_ids=p, chosen_ids=r, rejected_ids=c) for p, c, r in PAIRS])
    expected = (1 - e) * trainer.compute_loss(policy, straight) + e * trainer.compute_loss(policy, swapped)
    expected.backward()

    model, items = ours(models / "policy"), pair_items(PAIRS)
    ref = reference_logps(ours(models / "reference"), items, 3, "cpu", progress=False)
    loss = camelid_loss(FinetuneConfig(method="dpo", beta=0.3, label_smoothing=e), model, items, ref)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert_same_gradients(model, policy)


def experimental_rows(pairs):
    """The tokenized rows TRL's ORPO and CPO trainers collate: prompt + reply, labels on the reply."""
    rows = []
    for p, c, r in pairs:
        row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
        for name, reply in (("chosen", c), ("rejected", r)):
            row[f"{name}_input_ids"] = p + reply
            row[f"{name}_attention_mask"] = [1] * (len(p) + len(reply))
            row[f"{name}_labels"] = [-100] * len(p) + reply
        rows.append(row)
    return rows


def test_orpo_equals_trl(models, tmp_path):
    """TRL's ORPO takes its NLL term over the prompt too: camelid's train_on_prompt."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = hf(models / "policy")
    trainer = ORPOTrainer(model=policy, args=ORPOConfig(beta=0.25, **common(tmp_path)), train_dataset=text_pairs(),
                          processing_class=hf_tokenizer())
    expected, _ = trainer.get_batch_loss_metrics(policy, trainer.data_collator(experimental_rows(PAIRS)))
    expected.backward()

    model = ours(models / "policy")
    loss = camelid_loss(FinetuneConfig(method="orpo", beta=0.25, train_on_prompt=True), model, pair_items(PAIRS))
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert_same_gradients(model, policy)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trls_cpo_simpo(models, tmp_path, smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy = hf(models / "policy")
    args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing,
                     **common(tmp_path))
    trainer = CPOTrainer(model=policy, args=args, train_dataset=text_pairs(), processing_class=hf_tokenizer())
    expected, _ = trainer.get_batch_loss_metrics(policy, trainer.data_collator(experimental_rows(PAIRS)))
    expected.backward()

    model = ours(models / "policy")
    cfg = FinetuneConfig(method="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing)
    loss = camelid_loss(cfg, model, pair_items(PAIRS))
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert_same_gradients(model, policy)


def test_kto_equals_trl(models, tmp_path):
    """Each example's KL estimate reads the previous example's reply (TRL's pairing), over the micro-batch."""
    from trl import KTOConfig, KTOTrainer

    policy, reference = hf(models / "policy"), hf(models / "reference")
    text = datasets.Dataset.from_list([{"prompt": "t3", "completion": " t4", "label": b} for b in (True, False)])
    args = KTOConfig(beta=0.2, desirable_weight=1.3, undesirable_weight=0.8, **common(tmp_path))
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=text,
                         processing_class=hf_tokenizer())
    mismatched = [UNPAIRED[i - 1][1] for i in range(len(UNPAIRED))]
    batch = trainer.data_collator([dict(prompt_ids=p, completion_ids=c, KL_completion_ids=k, label=d)
                                   for (p, c, d), k in zip(UNPAIRED, mismatched)])
    expected = trainer.compute_loss(policy, batch)
    expected.backward()

    model = ours(models / "policy")
    items = [Item(p, [c, k], d) for (p, c, d), k in zip(UNPAIRED, mismatched)]
    ref = reference_logps(ours(models / "reference"), items, 4, "cpu", progress=False)
    cfg = FinetuneConfig(method="kto", beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    loss = camelid_loss(cfg, model, items, ref)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert_same_gradients(model, policy)


def test_reward_model_loss_equals_trls_reward_trainer(models, tmp_path):
    from trl import RewardConfig, RewardTrainer

    rm = hf(models / "policy", "AutoModelForSequenceClassification", num_labels=1)
    rm.config.pad_token_id = 0
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.3)
    text = datasets.Dataset.from_list([{"chosen": "t3 t4", "rejected": "t3 t5"}] * 2)
    trainer = RewardTrainer(model=rm, args=RewardConfig(**common(tmp_path)), train_dataset=text,
                            processing_class=hf_tokenizer())
    batch = trainer.data_collator([dict(chosen_ids=p + c, rejected_ids=p + r) for p, c, r in PAIRS])
    expected = trainer.compute_loss(rm, batch)
    expected.backward()

    model = add_score_head(ours(models / "policy"))
    with torch.no_grad():
        model.score.weight.copy_(rm.score.weight)
    loss = camelid_loss(FinetuneConfig(method="reward"), model, pair_items(PAIRS))
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert_same_gradients(model, rm)


def test_grpo_loss_equals_trls(models, tmp_path):
    """One GRPO update on sampled replies (on-policy: the ratio is one in value): TRL's GRPOTrainer loss
    (loss_type grpo) and gradients from the same replies, rewards and reference, with camelid's advantages."""
    from trl import GRPOConfig, GRPOTrainer

    from camelid.train.config import RLHFConfig
    from camelid.train.preference import pack, token_logps
    from camelid.train.rlhf import group_advantages, policy_loss

    prompts = [[2, 3, 4], [2, 9, 10]]  # one length: TRL left-pads prompts and transformers then shifts positions
    replies = [[6, 7, 1], [8, 1], [11, 12, 13, 14], [15, 1], [16, 17, 18], [19]]
    scores = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.3, -0.2])
    cfg = RLHFConfig(method="grpo", group_size=3, kl_beta=0.2)
    policy, reference = hf(models / "policy"), hf(models / "reference")
    args = GRPOConfig(beta=0.2, loss_type="grpo", use_bias_correction_kl=True, num_generations=3, per_device_train_batch_size=6,
                      max_completion_length=4, **{k: v for k, v in common(tmp_path).items()
                                                  if k != "per_device_train_batch_size"})
    trainer = GRPOTrainer(model=policy, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                          train_dataset=datasets.Dataset.from_list([{"prompt": "t3"}] * 6),
                          processing_class=hf_tokenizer())
    trainer.current_gradient_accumulation_steps = 1
    width = max(map(len, replies))
    completion_ids = torch.tensor([r + [0] * (width - len(r)) for r in replies])
    completion_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies])
    prompt_ids = torch.tensor([p for p in prompts for _ in range(3)])
    with torch.no_grad():
        full = torch.cat([prompt_ids, completion_ids], 1)
        logits = reference(input_ids=full, attention_mask=torch.cat([torch.ones_like(prompt_ids), completion_mask],
                                                                    1)).logits
        ref_hf = torch.log_softmax(logits[:, prompt_ids.shape[1] - 1:-1].float(), -1).gather(
            -1, completion_ids[..., None])[..., 0]
    advantages = group_advantages(cfg, scores.view(-1, 3)).view(-1)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages, ref_per_token_logps=ref_hf,
                  num_items_in_batch=completion_mask.sum())
    expected = trainer._compute_loss(policy, inputs)
    expected.backward()

    model = ours(models / "policy")
    items = [Item(prompts[i // 3], [r]) for i, r in enumerate(replies)]
    packed = pack(items)
    with torch.no_grad():
        ref_logps, _ = token_logps(ours(models / "reference"), packed)
    torch.testing.assert_close(ref_logps, ref_hf[completion_mask.bool()], atol=1e-5, rtol=0)
    logps, _ = token_logps(model, packed)
    per_reply, _, _ = policy_loss(cfg, logps, ref_logps, packed.seq, scores)
    loss = per_reply.mean()
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert_same_gradients(model, policy)
