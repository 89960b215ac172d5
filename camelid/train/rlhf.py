"""RLHF proper, the last step of ChatGPT's recipe: the policy samples replies to prompts with camelid's batched
sampler, a reward model (trained with `finetune` method: reward) scores them, and the policy moves towards the
better replies while a KL penalty keeps it near the reference it started from. No value model:

- grpo (Shao et al. 2024): each prompt's group of replies is normalised, A = (r - mean) / (std + 1e-4); the loss
  per reply is the mean over its tokens of (-A + kl_beta * KL) * ratio, KL the k3 estimator exp(q) - q - 1 with
  q = log ref - log p (the ratio on the KL gives its gradient the score-function term, as TRL does).
- rloo (Ahmadian et al. 2024): the reward is r - kl_beta * sum(log p - log ref), the advantage is that minus the
  mean of the group's other replies, and the loss is -A * log p(reply).

One update per batch of samples, so the ratio is exp(log p - log p.detach()): one in value, the policy gradient
in its gradient. Under LoRA the reference is the base with the adapter off; with all weights trained it is a
frozen copy. A step is one run of the training loop, so checkpoints, resumption and DDP are SFT's."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch

from camelid.data.preference import PreferenceStats, read_prompts
from camelid.errors import CamelidError
from camelid.formats.load import load_model, save_native
from camelid.formats.loaded import LoadedModel, require_decoder_only, require_policy
from camelid.formats.peft import check_targets, save_adapter
from camelid.generate.generate import generate_tokens
from camelid.generate.sampling import SamplingParams
from camelid.model.lora import LoRAConfig, adapters_off, add_lora, merge_lora
from camelid.tokenizer.chat_template import render_chat, resolve_template
from camelid.train.config import RLHFConfig
from camelid.train.distributed import Cluster, wrap
from camelid.train.loop import Job, autocast_dtype, in_cluster, make_optimizer, start_run, train_loop
from camelid.train.preference import Item, Metrics, pack, reply_scores, token_logps


def rlhf(cfg: RLHFConfig, resume: str | None = None) -> Path | None:
    """Tune the policy; returns its model folder (None on ranks other than the main one)."""
    cfg.validate()
    return in_cluster(_rlhf, cfg, resume)


def prompt_ids(cfg: RLHFConfig, lm: LoadedModel, template: str, main: bool) -> list[list[int]]:
    stats = PreferenceStats()
    prompts = read_prompts(cfg.data, stats)
    out, too_long = [], 0
    longest = min(cfg.max_prompt_len, lm.config.max_seq_len - 1)  # a reply needs room for one token at least
    for where, prompt in prompts:
        ids = lm.tokenizer.encode(render_chat(template, prompt, lm.tokenizer.special_tokens_map,
                                              add_generation_prompt=True), bos=False)
        if len(ids) > longest:
            too_long += 1
            stats.skipped.add(where, f"the prompt is {len(ids)} tokens, more than {longest} (max_prompt_len, "
                              "or the model's context less one)", quiet=too_long > 5)
            continue
        out.append(ids)
    if not out:
        raise CamelidError(f"{cfg.data}: no prompt fits max_prompt_len {cfg.max_prompt_len}")
    if main:
        print(f"rlhf ({cfg.method}): {stats.records} records -> {len(out)} prompts; {stats.skipped.total} skipped "
              f"({too_long} longer than max_prompt_len {cfg.max_prompt_len})")
    return out


def load_reward_model(cfg: RLHFConfig, policy: LoadedModel, device) -> LoadedModel:
    rm = load_model(cfg.reward_model, str(device), cfg.dtype if cfg.dtype != "fp16" else "fp32")
    if not rm.config.score_head:
        raise CamelidError(f"reward_model: {cfg.reward_model} has no score head; train one with "
                           "`camelid finetune` method: reward")
    if rm.tokenizer.vocab_size != policy.tokenizer.vocab_size or any(
            rm.tokenizer.encode(s, bos=False) != policy.tokenizer.encode(s, bos=False)
            for s in ("Hello, world!", " The reward model reads the policy's tokens.\n")):
        raise CamelidError(f"reward_model: {cfg.reward_model} has another tokenizer than the policy {cfg.policy}; "
                           "it must read the policy's tokens")
    rm.model.eval().requires_grad_(False)
    return rm


def group_advantages(cfg: RLHFConfig, rewards: torch.Tensor) -> torch.Tensor:
    """(prompts, group) rewards -> advantages."""
    if cfg.method == "grpo":
        return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def policy_loss(cfg: RLHFConfig, logps: torch.Tensor, ref_logps: torch.Tensor, seq: torch.Tensor, scores: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss of every reply, its mean KL per token, its token count) from the reply tokens' log-probabilities
    under the policy and the reference (token j belongs to reply seq[j]) and the replies' rewards, in groups of
    group_size consecutive replies to one prompt."""
    n = scores.numel()

    def per_reply(values):
        return torch.zeros(n, device=values.device).index_add(0, seq, values)

    q = ref_logps - logps
    kl = torch.exp(q) - q - 1  # k3: unbiased, never negative
    counts = torch.bincount(seq, minlength=n).to(logps.dtype)
    if cfg.method == "grpo":
        advantages = group_advantages(cfg, scores.view(-1, cfg.group_size)).view(-1)
        ratio = torch.exp(logps - logps.detach())
        # the KL times the ratio too: its expectation is over the policy's own samples, so its gradient has the
        # score-function term as well (TRL's use_bias_correction_kl, on by default)
        per_token = -advantages[seq] * ratio + cfg.kl_beta * kl * ratio
        loss = per_reply(per_token) / counts
    else:
        rewards = scores - cfg.kl_beta * per_reply((logps - ref_logps).detach())
        advantages = group_advantages(cfg, rewards.view(-1, cfg.group_size)).view(-1)
        loss = -advantages * per_reply(logps)
    return loss, per_reply(kl.detach()) / counts, counts


@torch.no_grad()
def sample_replies(model, prompts: list[list[int]], cfg: RLHFConfig, stop_ids: set[int], seed: int
                   ) -> list[list[int]]:
    """group_size replies to every prompt, each ending with its stop token when it stopped."""
    was_training = model.training
    model.eval()
    batch = [p for p in prompts for _ in range(cfg.group_size)]
    params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=0.0, seed=seed)
    replies: list[list[int]] = [[] for _ in batch]
    for step in generate_tokens(model, batch, cfg.max_new_tokens, params, stop_ids, yield_stop=True):
        for reply, t in zip(replies, step):
            if t is not None:
                reply.append(t)
    model.train(was_training)
    return replies


def rlhf_job(cfg: RLHFConfig, wrapped, model, reference, reward: LoadedModel, prompts: list[list[int]],
             stop_ids: set[int], cluster: Cluster, device) -> Job:
    from camelid.train.finetune import batch_rows, trainable_parameters, trainable_state_io

    trainable = trainable_parameters(model)
    optimizer, optimizer_step = make_optimizer(model, cfg, device)
    torch.manual_seed(cfg.seed + cluster.rank)
    amp_dtype = autocast_dtype(cfg.dtype)
    global_batch = cfg.micro_batch * cfg.grad_accum  # prompts
    max_steps = max(1, math.ceil(len(prompts) * cfg.epochs / global_batch))
    metrics = Metrics()
    indices = list(range(len(prompts)))

    def micro_batches(step: int, micro: list[int]) -> list:
        picked = batch_rows(indices, step, global_batch, cfg.seed)
        out = []
        for m in micro:
            chunk = [prompts[i] for i in picked[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]]
            # Every reply has a token: the stop token is kept, and the prompts leave room in the context.
            replies = sample_replies(model, chunk, cfg, stop_ids, seed=cfg.seed * 1_000_003 + step * 1009 + m)
            items = [Item(p, [r]) for p, r in zip([p for p in chunk for _ in range(cfg.group_size)], replies)]
            packed = pack(items).to(device)
            with torch.no_grad():
                with adapters_off(reference) if reference is model else nullcontext():
                    ref_logps, _ = token_logps(reference, packed, amp_dtype)
                scores = reply_scores(reward.model, pack(items, scores=True).to(device), amp_dtype)
            out.append((packed, ref_logps, scores))
        return out

    def loss(batch) -> tuple[torch.Tensor, int]:
        packed, ref_logps, scores = batch
        logps, _ = token_logps(wrapped, packed, amp_dtype)
        per_reply, kl, counts = policy_loss(cfg, logps, ref_logps, packed.seq, scores)
        metrics.add(reward=scores, kl=kl, reply_tokens=counts)
        return per_reply.sum() / (global_batch * cfg.group_size), int(counts.sum())

    def report(record: dict):
        record["epoch"] = round(record["step"] * global_batch / len(prompts), 3)
        record.update(metrics.means(cluster, device))

    save, check, load = trainable_state_io(cfg, wrapped, optimizer, trainable)

    return Job(f"rlhf ({cfg.method})", wrapped, optimizer, max_steps, micro_batches, loss, save, check, load,
               report=report, optimizer_step=optimizer_step)


def _rlhf(cfg: RLHFConfig, resume: str | None, cluster: Cluster, device: torch.device) -> Path | None:
    out = start_run(cfg, cluster)
    lm = require_policy(load_model(cfg.policy, str(device), cfg.dtype if cfg.lora else "fp32"), cfg.policy)
    require_decoder_only(lm, cfg.policy, "RLHF")
    template = cfg.template or lm.template
    if template == "raw":
        raise CamelidError(f"template: {cfg.policy} has no chat template; set one")
    _, stop = resolve_template(template)
    reward = load_reward_model(cfg, lm, device)
    prompts = prompt_ids(cfg, lm, template, cluster.main)
    stop_ids = set(lm.tokenizer.eos_ids)
    model = lm.model
    model.train().requires_grad_(not cfg.lora)
    torch.manual_seed(cfg.seed)
    if cfg.lora:
        lora = LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets))
        lora.validate()
        check_targets(model.cfg, lora.targets)
        add_lora(model, lora)
        reference = model
    else:  # the weights being trained cannot be their own reference: a frozen copy
        reference = load_model(cfg.policy, str(device), "fp32").model.eval().requires_grad_(False)
    wrapped = wrap(model, cluster, False, device)
    job = rlhf_job(cfg, wrapped, model, reference, reward, prompts, stop_ids, cluster, device)
    train_loop(job, cfg, cluster, device, out, resume)
    if not cluster.main:
        return None
    model.eval().requires_grad_(False)
    if cfg.lora:
        save_adapter(model, out / "adapter", cfg.policy)
        merge_lora(model)
    save_native(LoadedModel(model.cpu(), lm.tokenizer, template, stop), out / "model", template, stop, force=True)
    return out / "model"
