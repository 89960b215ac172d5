"""Preference tuning after instruction tuning: DPO (with cDPO's label smoothing), IPO, ORPO, SimPO, KTO, and
reward models (a scalar head, Bradley-Terry loss on pairs), as objectives of the one training loop.

A pair's prompt and both replies share one row (`camelid.data.shared_prefix`): the prompt is read once, each
reply sees it and not the other, and logits are computed only where they predict a reply token. KTO's row
holds its reply and the mismatched reply its KL estimate reads. The losses are TRL's (tested against it):

- dpo: -(1-e) log s(b D) - e log s(-b D), D = (log p(c) - log ref(c)) - (log p(r) - log ref(r))
- ipo: (D' - 1/(2b))^2, D' the same difference of log-ratios averaged per reply token
- orpo: NLL(c) - b log s(log odds(c) - log odds(r)), odds of the per-token mean probability
- simpo: -(1-e) log s(b (mean log p(c) - mean log p(r)) - gamma) - e log s(-...)
- kto: w_d (1 - s(b (log-ratio - KL))) for desirable replies, w_u (1 - s(b (KL - log-ratio))) otherwise
- reward: -log s(score(c) - score(r))

DPO, IPO and KTO need the reference model's log-probabilities. Under LoRA the reference is the base with the
adapter switched off (no second copy); with `precompute_ref`, and always for full fine-tuning, they are
computed once before training and stored in the run folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.data.corpus import is_validation
from camelid.data.preference import PreferenceStats, read_preferences, tokenize_pairs, tokenize_unpaired
from camelid.data.shared_prefix import batch_layout, shared_row
from camelid.errors import CamelidError
from camelid.files import atomic_file
from camelid.model.lora import adapters_off
from camelid.train.config import FinetuneConfig
from camelid.train.distributed import Cluster, sum_across
from camelid.train.loop import Job, autocast, autocast_dtype, make_optimizer

REFERENCED = ("dpo", "ipo", "kto")  # the others need no reference model


@dataclass
class Item:
    """One training example: a prompt and the replies read with it (a pair: chosen, rejected; KTO: the reply
    and the mismatched reply of its KL estimate), and for KTO whether the reply is desirable."""
    prompt: list[int]
    replies: list[list[int]]
    desirable: bool = True


def build_items(cfg: FinetuneConfig, lm, template: str, main: bool = True) -> tuple[list[Item], list[Item]]:
    """Training and validation items from the data files: rendered, masked and tokenized as SFT's are; a
    record that is malformed or does not fit max_len is reported and counted."""
    unpaired = cfg.method == "kto"
    stats = PreferenceStats()
    records = read_preferences(cfg.data, unpaired, stats)
    if cfg.val_data:
        train, val = records, read_preferences(cfg.val_data, unpaired, stats)
    else:
        keys = [json.dumps(dataclasses.asdict(r) | {"where": ""}, sort_keys=True) for r in records]
        train = [r for r, k in zip(records, keys) if not is_validation(k, cfg.val_fraction)]
        val = [r for r, k in zip(records, keys) if is_validation(k, cfg.val_fraction)]

    def items(records):
        if unpaired:
            return kto_items(tokenize_unpaired(lm.tokenizer, template, records, cfg.max_len, stats, cfg.truncate),
                             cfg.max_len)
        return pair_items(tokenize_pairs(lm.tokenizer, template, records, cfg.max_len, stats, cfg.truncate))

    train_items, val_items = items(train), items(val) if val else []
    if not train_items:
        raise CamelidError(f"{cfg.data}: no example fits max_len {cfg.max_len}")
    if unpaired and len({it.desirable for it in train_items}) < 2:
        raise CamelidError(f"{cfg.data}: KTO needs both desirable and undesirable examples (label true and false)")
    if main:
        kind = "examples" if unpaired else "pairs"
        print(f"finetune ({cfg.method}): {stats.records} records -> {len(train_items)} training and "
              f"{len(val_items)} validation {kind}; {stats.skipped.total} skipped "
              f"({stats.too_long} longer than max_len {cfg.max_len}); {stats.truncated} truncated")
    return train_items, val_items


def references(cfg: FinetuneConfig, model, train: list[Item], val: list[Item], out: Path, device, cluster: Cluster
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The reference log-probabilities of the training and validation items, when they are computed ahead:
    always for full fine-tuning (the weights being trained are the reference's), on request under LoRA
    (otherwise each step computes them with the adapter off). None where they are not."""
    if cfg.method not in REFERENCED or (cfg.uses_lora and not cfg.precompute_ref):
        return None, None
    train_ref = stored_reference(cfg, model, train, out / "reference_logps.safetensors", device, cluster)
    val_ref = stored_reference(cfg, model, val, out / "reference_logps_val.safetensors", device, cluster) if val \
        else None
    return train_ref, val_ref


def pair_items(pairs) -> list[Item]:
    return [Item(p.prompt, [p.chosen, p.rejected]) for p in pairs]


def kto_items(examples, max_len: int) -> list[Item]:
    """KTO estimates the KL term from mismatched pairs: example i's prompt with example i-1's reply (TRL's
    pairing), cut to fit the context."""
    n = len(examples)
    return [Item(e.prompt, [e.completion, examples[(i - 1) % n].completion[:max_len - len(e.prompt)]],
                 e.desirable) for i, e in enumerate(examples)]


@dataclass
class Packed:
    """A micro-batch laid out for one forward pass; sequence j = item j // k, reply j % k."""
    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    want: torch.Tensor  # (B, T) the positions whose logits (or scores) are computed
    rows: torch.Tensor  # for every reply token, its row among the computed logits
    targets: torch.Tensor  # that token
    seq: torch.Tensor  # its sequence
    n_seq: int
    prompt_rows: torch.Tensor  # ORPO's NLL on the prompt: rows, targets and item of each prompt token
    prompt_targets: torch.Tensor
    prompt_item: torch.Tensor

    def to(self, device) -> Packed:
        return Packed(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                         for f in dataclasses.fields(self)})


def pack(items: list[Item], scores: bool = False, prompt_loss: bool = False) -> Packed:
    """The items' shared rows, and where each reply token's log-probability comes from. With `scores` the
    computed positions are each reply's last token instead (a reward model's)."""
    rows = [shared_row(it.prompt, it.replies, read_last=scores) for it in items]
    tokens, (positions, mask) = batch_layout(rows, "cpu")
    width, k = tokens.shape[1], len(items[0].replies)
    src, targets, seq, prompt_src, prompt_targets, prompt_item = [], [], [], [], [], []
    for b, (it, row) in enumerate(zip(items, rows)):
        for i, (reply, where) in enumerate(zip(it.replies, row[3])):
            if scores:
                src.append(b * width + where[-1])
            else:
                src += [b * width + t for t in where[:len(reply)]]
                targets += reply
                seq += [b * k + i] * len(reply)
        if prompt_loss:
            prompt_src += [b * width + t for t in range(len(it.prompt) - 1)]
            prompt_targets += it.prompt[1:]
            prompt_item += [b] * (len(it.prompt) - 1)
    want = torch.zeros(tokens.numel(), dtype=torch.bool)
    want[torch.tensor(src + prompt_src, dtype=torch.long)] = True
    index = want.cumsum(0) - 1  # flat position -> row of the computed logits

    def rows_of(flat):
        return index[torch.tensor(flat, dtype=torch.long)]

    def longs(values):
        return torch.tensor(values, dtype=torch.long)

    return Packed(tokens, positions, mask, want.view(tokens.shape), rows_of(src), longs(targets), longs(seq),
                  len(items) * k, rows_of(prompt_src), longs(prompt_targets), longs(prompt_item))


def token_logps(model, p: Packed, amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the log-probability of every reply token, in `p.seq` order; the prompt's NLL per item, or None)."""
    with autocast(p.tokens.device, amp_dtype):
        logits = model(p.tokens, layout=(p.positions, p.mask), logits_at=p.want)
    logps = -F.cross_entropy(logits[p.rows].float(), p.targets, reduction="none")
    prompt_nll = None
    if p.prompt_rows.numel():
        nll = F.cross_entropy(logits[p.prompt_rows].float(), p.prompt_targets, reduction="none")
        prompt_nll = torch.zeros(int(p.prompt_item.max()) + 1, device=logits.device).index_add(0, p.prompt_item, nll)
    return logps, prompt_nll


def reply_logps(model, p: Packed, amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed log-probability of every reply (n_seq,), its token count, the prompt's summed NLL per item or
    None)."""
    logps, prompt_nll = token_logps(model, p, amp_dtype)
    sums = torch.zeros(p.n_seq, device=logps.device).index_add(0, p.seq, logps)
    counts = torch.bincount(p.seq, minlength=p.n_seq).to(sums.dtype)
    return sums, counts, prompt_nll


def reply_scores(model, p: Packed, amp_dtype=None) -> torch.Tensor:
    """The score head's value at every reply's last token (n_seq,)."""
    with autocast(p.tokens.device, amp_dtype):
        return model(p.tokens, layout=(p.positions, p.mask), logits_at=p.want, scores=True).float()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation at either end (Maechler 2012). A reply the model is
    sure of (a mean log-probability of 0.0 in float) has odds of 1e12, not infinite ones: ORPO stays finite."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def smoothed_sigmoid_loss(z: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-log s(z), with the label taken as flipped with probability `smoothing` (cDPO)."""
    return -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)


def pair_loss(cfg: FinetuneConfig, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from the replies' summed log-probabilities (2B,) laid
    out chosen, rejected, chosen, ... and the reference's (B, 2)."""
    c, r = logps.view(-1, 2).unbind(1)
    nc, nr = counts.view(-1, 2).unbind(1)
    beta = cfg.beta
    if cfg.method in REFERENCED:
        rc, rr = (c - ref[:, 0]), (r - ref[:, 1])  # log-ratios to the reference
        if cfg.method == "dpo":
            loss = smoothed_sigmoid_loss(beta * (rc - rr), cfg.label_smoothing)
        else:  # ipo, averaged per token as TRL (and IPO's authors) do
            loss = (rc / nc - rr / nr - 1 / (2 * beta)) ** 2
        return loss, beta * rc.detach(), beta * rr.detach()
    ac, ar = c / nc, r / nr
    if cfg.method == "orpo":
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        loss = -beta * F.logsigmoid(log_odds)
    else:  # simpo
        loss = smoothed_sigmoid_loss(beta * (ac - ar) - cfg.simpo_gamma, cfg.label_smoothing)
    return loss, beta * ac.detach(), beta * ar.detach()


def kto_loss(cfg: FinetuneConfig, logps: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per example, rewards, the KL estimate). logps (2B,): each reply, then its mismatched one."""
    own, mismatched = logps.view(-1, 2).unbind(1)
    kl = (mismatched - ref[:, 1]).mean().detach().clamp(min=0)  # of this micro-batch, as TRL estimates it
    ratio = own - ref[:, 0]
    loss = torch.where(desirable, cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratio - kl))),
                       cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - ratio))))
    return loss, cfg.beta * ratio.detach(), kl


def reward_loss(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, r = scores.view(-1, 2).unbind(1)
    return -F.logsigmoid(c - r), c.detach(), r.detach()


@torch.no_grad()
def reference_logps(model, items: list[Item], batch: int, device, amp_dtype=None, progress: bool = True
                    ) -> torch.Tensor:
    """The reference's summed log-probability of every item's replies (n, k): the model as it is, with any
    adapter off, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = []
    with adapters_off(model):
        for i in tqdm(range(0, len(items), batch), desc="reference log-probs", unit="batch",
                      disable=None if progress else True):
            chunk = items[i:i + batch]
            logps, _, _ = reply_logps(model, pack(chunk).to(device), amp_dtype)
            out.append(logps.view(len(chunk), -1).cpu())
    model.train(was_training)
    return torch.cat(out)


def _fingerprint(cfg: FinetuneConfig, items: list[Item]) -> str:
    h = hashlib.sha256(json.dumps([cfg.base, cfg.dtype, cfg.quantize_base, cfg.quantize_group]).encode())
    for it in items:
        h.update(json.dumps([it.prompt, it.replies]).encode())
    return h.hexdigest()


def stored_reference(cfg: FinetuneConfig, model, items: list[Item], path: Path, device, cluster: Cluster
                     ) -> torch.Tensor:
    """The reference log-probabilities of the items, computed once per run folder (a resumed run reads them
    back) and written by the main rank."""
    from safetensors.torch import load_file, save_file

    fingerprint = _fingerprint(cfg, items)
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                return load_file(str(path))["logps"]
    logps = reference_logps(model, items, cfg.micro_batch, device, autocast_dtype(cfg.dtype), cluster.main)
    if cluster.main:
        with atomic_file(path) as tmp:
            save_file({"logps": logps.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
    return logps


class Metrics:
    """Sums and counts over a step's micro-batches (and ranks) of what the log reports: each field the mean
    of its values (per pair, per example, or per micro-batch for KTO's KL estimate)."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, **values: torch.Tensor):
        for name, v in values.items():
            total = self.sums.setdefault(name, [0.0, 0.0])
            total[0] += float(v.float().sum())
            total[1] += v.numel()

    def means(self, cluster: Cluster | None = None, device=None) -> dict:
        cluster = cluster or Cluster()
        out = {}
        for name, (total, count) in sorted(self.sums.items()):
            count = sum_across(count, cluster, device)
            out[name] = round(sum_across(total, cluster, device) / count, 5) if count else None
        self.sums = {}
        return out


def item_loss(cfg: FinetuneConfig, model, items: list[Item], ref: torch.Tensor | None, device, amp_dtype,
              metrics: Metrics | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss of the items, summed SFT NLL term) for one micro-batch; `ref` (n, k) or None to compute
    the reference here, with the adapter off."""
    if cfg.method == "reward":
        p = pack(items, scores=True).to(device)
        loss, c, r = reward_loss(reply_scores(model, p, amp_dtype))
        if metrics:
            metrics.add(reward_chosen=c, reward_rejected=r, reward_margin=c - r, reward_accuracy=(c > r).float())
        return loss.sum(), torch.zeros((), device=device)
    p = pack(items, prompt_loss=cfg.method == "orpo" and cfg.train_on_prompt).to(device)
    logps, counts, prompt_nll = reply_logps(model, p, amp_dtype)
    if cfg.method in REFERENCED and ref is None:
        with torch.no_grad(), adapters_off(model):
            ref = reply_logps(model, p, amp_dtype)[0].view(len(items), -1)
    ref = ref.to(device) if ref is not None else None
    nll = torch.zeros((), device=device)
    if cfg.method == "kto":
        desirable = torch.tensor([it.desirable for it in items], device=device)
        loss, rewards, kl = kto_loss(cfg, logps, ref, desirable)
        if metrics:
            metrics.add(reward_desirable=rewards[desirable], reward_undesirable=rewards[~desirable], kl=kl.view(1))
        return loss.sum(), nll
    loss, c, r = pair_loss(cfg, logps, counts, ref)
    if cfg.method == "orpo":
        nll = -logps.view(-1, 2)[:, 0].sum() + (prompt_nll.sum() if prompt_nll is not None else 0.0)
    if metrics:
        lc, lr = logps.detach().view(-1, 2).unbind(1)
        metrics.add(reward_chosen=c, reward_rejected=r, reward_margin=c - r, reward_accuracy=(c > r).float(),
                    logp_chosen=lc, logp_rejected=lr)
    return loss.sum(), nll


def nll_tokens(cfg: FinetuneConfig, items: list[Item]) -> int:
    """The tokens ORPO's NLL term averages over: the chosen replies (and their prompts with train_on_prompt)."""
    return sum(len(it.replies[0]) + (len(it.prompt) - 1 if cfg.train_on_prompt else 0) for it in items)


def preference_job(cfg: FinetuneConfig, wrapped, model, train: list[Item], val: list[Item],
                   refs: tuple[torch.Tensor | None, torch.Tensor | None], cluster: Cluster, device: torch.device
                   ) -> Job:
    """The loop's job for a preference objective. The step's loss is the mean over the global batch's examples
    (plus ORPO's NLL, a mean over its tokens), whatever micro-batch or rank each landed in."""
    from camelid.train.finetune import batch_rows, trainable_parameters, trainable_state_io

    trainable = trainable_parameters(model)
    forward = torch.compile(wrapped, dynamic=True, mode=cfg.compile_mode) if cfg.compile else wrapped
    optimizer, optimizer_step = make_optimizer(model, cfg, device)
    torch.manual_seed(cfg.seed + cluster.rank)
    amp_dtype = autocast_dtype(cfg.dtype)
    global_batch = cfg.micro_batch * cfg.grad_accum
    max_steps = max(1, math.ceil(len(train) * cfg.epochs / global_batch))
    metrics = Metrics()
    indices = list(range(len(train)))
    ref, val_ref = refs

    def micro_batches(step: int, micro: list[int]) -> list:
        chosen = batch_rows(indices, step, global_batch, cfg.seed)
        n_nll = nll_tokens(cfg, [train[i] for i in chosen]) if cfg.method == "orpo" else 0
        return [(chosen[m * cfg.micro_batch:(m + 1) * cfg.micro_batch], n_nll) for m in micro]

    def loss(batch) -> tuple[torch.Tensor, int]:
        picked, n_nll = batch
        items = [train[i] for i in picked]
        total, nll = item_loss(cfg, forward, items, ref[picked] if ref is not None else None, device, amp_dtype,
                               metrics)
        share = total / global_batch + (nll / max(n_nll, 1) if n_nll else 0.0)
        return share, sum(len(it.prompt) + sum(map(len, it.replies)) for it in items)

    def report(record: dict):
        record["epoch"] = round(record["step"] * global_batch / len(train), 3)
        record.update(metrics.means(cluster, device))

    def evaluate() -> dict | None:
        if not (cluster.main or cfg.fsdp):
            return None
        return evaluate_items(cfg, model, val, val_ref, device, amp_dtype)

    save, check, load = trainable_state_io(cfg, wrapped, optimizer, trainable)

    return Job(f"finetune ({cfg.method}{', lora' if cfg.uses_lora else ''})", wrapped, optimizer, max_steps,
               micro_batches, loss, save, check, load, evaluate=evaluate if val else None, report=report,
               optimizer_step=optimizer_step)


@torch.no_grad()
def evaluate_items(cfg: FinetuneConfig, model, items: list[Item], ref: torch.Tensor | None, device, amp_dtype
                   ) -> dict:
    """The held-out examples' mean loss and reward statistics; `ref` their reference log-probabilities, or
    None to compute them here with the adapter off."""
    model.eval()
    metrics, total, nll, n_nll = Metrics(), 0.0, 0.0, 0
    for i in range(0, len(items), cfg.micro_batch):
        chunk = items[i:i + cfg.micro_batch]
        chunk_ref = ref[i:i + cfg.micro_batch] if ref is not None else None
        loss, chunk_nll = item_loss(cfg, model, chunk, chunk_ref, device, amp_dtype, metrics)
        total += float(loss)
        nll += float(chunk_nll)
        n_nll += nll_tokens(cfg, chunk) if cfg.method == "orpo" else 0
    model.train()
    return {"val_loss": total / len(items) + (nll / n_nll if n_nll else 0.0),
            **{f"val_{k}": v for k, v in metrics.means().items()}}
