"""Training configuration: a dataclass read from YAML, with `key=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from camelid.errors import CamelidError
from camelid.files import read_text

SCHEDULES = ("cosine", "linear", "step", "exponential", "constant")
METHODS = ("full", "lora", "dpo", "ipo", "orpo", "simpo", "kto", "reward")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@dataclass
class RunConfig:
    """What every training recipe shares: optimizer, schedule, precision, checkpoints, logging and distribution.
    Each recipe's config is this plus its own fields; the defaults here are pretraining's."""
    out_dir: str = "out/run"
    micro_batch: int = 8
    grad_accum: int = 1  # global batch = micro_batch * grad_accum rows
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    warmup_ratio: float = 0.0  # warmup as a share of the run; warmup_steps > 0 overrides it (as in HF's Trainer)
    schedule: str = "cosine"  # after warmup: cosine | linear | step | exponential | constant
    decay_every: int = 1000  # step schedule: multiply by decay_gamma every decay_every steps
    decay_gamma: float = 0.5  # step and exponential schedules
    weight_decay: float = 0.1  # AdamW; never applied to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler, CUDA)
    device: str = "cpu"
    seed: int = 1337
    threads: int = 0  # CPU threads (0: torch's default)
    log_every: int = 10
    eval_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 3
    activation_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (else DDP)
    compile: bool = False
    # torch.compile's mode; max-autotune times candidate kernels for every matmul shape once (seconds on a CPU,
    # minutes on a GPU): on bench/train.py's CPU run 4-9% faster in bf16, but slower in fp32
    compile_mode: str = "default"

    def run_checks(self) -> list[tuple[bool, str]]:
        checks = [(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
                  (self.dtype in ("fp32", "bf16", "fp16"), "dtype must be fp32, bf16 or fp16"),
                  (self.compile_mode in COMPILE_MODES, f"compile_mode must be one of {', '.join(COMPILE_MODES)}"),
                  (self.lr > 0 and self.min_lr >= 0, "lr must be > 0 and min_lr >= 0"),
                  (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
                  (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")]
        for key in ("micro_batch", "grad_accum", "log_every", "eval_every", "ckpt_every", "keep_last",
                    "decay_every"):
            checks.append((isinstance(getattr(self, key), int) and getattr(self, key) > 0,
                           f"{key} must be a positive integer"))
        return checks


def _raise_failed(checks: list[tuple[bool, str]], source: str):
    for ok, message in checks:
        if not ok:
            raise CamelidError(f"{source}: {message}")


@dataclass
class TrainConfig(RunConfig):
    """Pretraining (camelid pretrain): a model from scratch on token shards."""
    data: str = ""  # train shard folder (camelid data tokenize OUT/train)
    val_data: str = ""  # validation shard folder (optional)
    tokenizer: str = ""  # tokenizer file packaged with the final model
    model: dict = field(default_factory=dict)  # {"preset": NAME} and/or ModelConfig fields
    seq_len: int = 256
    max_steps: int = 1000
    eval_batches: int = 20
    sample_every: int = 0  # log a short generation every N steps (0: never)
    sample_prompt: str = ""
    sample_tokens: int = 100

    def validate(self, source: str = "config"):
        checks = self.run_checks() + [(self.data != "", "data: the train shard folder is required")]
        for key in ("seq_len", "max_steps"):
            checks.append((isinstance(getattr(self, key), int) and getattr(self, key) > 0,
                           f"{key} must be a positive integer"))
        _raise_failed(checks, source)


def _coerce(value, kind: str, key: str, source: str):
    """YAML 1.1 reads `1e-3` as a string and users write `lr: 3e-4`: accept numbers written either way."""
    try:
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
    except (TypeError, ValueError):
        pass
    expected = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
                "dict": "a mapping", "list": "a list"}[kind]
    ok = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,), "dict": (dict,), "list": (list,)}[kind]
    if not isinstance(value, ok) or (kind in ("int", "float") and isinstance(value, bool)):
        raise CamelidError(f"{source}: {key} must be {expected}, got {value!r}")
    return value


@dataclass
class FinetuneConfig(RunConfig):
    """Instruction tuning (camelid finetune): Alpaca/Vicuna data on a pretrained model, full or LoRA."""
    base: str = ""  # the model to tune: any folder or file camelid opens
    data: str = ""  # Alpaca, Dolly, ShareGPT or messages data
    val_data: str = ""  # optional; else val_fraction of `data` is held out
    val_fraction: float = 0.0
    format: str = ""  # alpaca | dolly | sharegpt | messages (empty: detected per record)
    template: str = ""  # chat template (empty: the base model's own)
    max_len: int = 512
    train_on_prompt: bool = False
    pack: bool = True
    # what is learnt: full | lora (instruction tuning: all weights, or a LoRA adapter), or a preference
    # objective dpo | ipo | orpo | simpo | kto | reward, which trains all weights unless `lora` is set
    method: str = "full"
    lora: bool = False  # a preference objective through a LoRA adapter (method: lora is instruction tuning's)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    quantize_base: str = ""  # int4 | int8: LoRA over a frozen quantized copy of the base (QLoRA)
    quantize_group: int = 64  # int4: inputs sharing a scale (QLoRA's block size)
    epochs: float = 3.0
    # preference tuning (TRL's names and defaults)
    beta: float = 0.1  # DPO/IPO/KTO: closeness to the reference; ORPO: the odds-ratio weight; SimPO: the scale
    label_smoothing: float = 0.0  # DPO (cDPO) and SimPO: the probability that a pair's labels are flipped
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0  # KTO
    precompute_ref: bool = False  # DPO/IPO/KTO under LoRA: the reference's log-probabilities once, before training
    truncate: bool = False  # preference data longer than max_len: cut to fit (as TRL does) instead of skipped
    # this recipe's defaults for shared fields (Alpaca's)
    out_dir: str = "out/finetune"
    micro_batch: int = 4
    lr: float = 2e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    beta2: float = 0.999
    seed: int = 42
    eval_every: int = 100
    ckpt_every: int = 100
    keep_last: int = 2

    def validate(self, source: str = "config"):
        checks = [(self.base != "", "base: the model to tune is required"),
                  (self.data != "", "data: the instruction data file is required"),
                  (not Path(self.data).is_dir(), f"data: {self.data} is a folder; give the data file"),
                  (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
                  (not (self.lora and self.method in ("full", "lora")),
                   "lora: true is for preference objectives; instruction tuning with LoRA is method: lora"),
                  (self.beta > 0, "beta must be > 0"),
                  (0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)"),
                  (self.desirable_weight > 0 and self.undesirable_weight > 0,
                   "desirable_weight and undesirable_weight must be > 0"),
                  (self.method != "kto" or self.micro_batch > 1,
                   "kto needs micro_batch > 1: its KL term is estimated over a micro-batch"),
                  (self.epochs > 0, "epochs must be > 0"),
                  (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
                  (isinstance(self.lora_targets, list), "lora_targets must be a list of module names"),
                  (self.quantize_base in ("", "int8", "int4"), "quantize_base must be int8 or int4 (or empty)"),
                  (not self.quantize_base or self.uses_lora,
                   "quantize_base needs method lora, or lora: true (a quantized base is frozen)"),
                  (self.quantize_group in (32, 64, 128, 256), "quantize_group must be 32, 64, 128 or 256"),
                  (isinstance(self.max_len, int) and self.max_len > 0, "max_len must be a positive integer")]
        _raise_failed(checks + self.run_checks(), source)

    @property
    def uses_lora(self) -> bool:
        return self.method == "lora" or self.lora

    @property
    def objective(self) -> str:
        """sft, or the preference objective."""
        return "sft" if self.method in ("full", "lora") else self.method


@dataclass
class RLHFConfig(RunConfig):
    """Reinforcement learning from a reward model (camelid rlhf): the policy samples replies to prompts, the
    reward model scores them, and the policy is tuned towards the better ones with a KL penalty to where it
    started. GRPO (group-normalised advantages) or RLOO (leave-one-out baselines), no value model."""
    policy: str = ""  # the model to tune (an SFT model)
    reward_model: str = ""  # a camelid reward model (finetune method: reward) with the policy's tokenizer
    data: str = ""  # prompts: prompt-only, preference, KTO or instruction records (their prompts are used)
    template: str = ""  # chat template (empty: the policy's own)
    method: str = "grpo"  # grpo | rloo
    group_size: int = 4  # replies sampled per prompt
    max_prompt_len: int = 256
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kl_beta: float = 0.04  # the KL penalty's weight (GRPO: in the loss; RLOO: in the reward)
    lora: bool = True  # tune a LoRA adapter (the reference is the base with it off); false: all weights
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    epochs: float = 1.0  # passes over the prompts
    out_dir: str = "out/rlhf"
    micro_batch: int = 2  # prompts per micro-batch (each with group_size replies)
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta2: float = 0.999
    seed: int = 42
    log_every: int = 1
    ckpt_every: int = 50
    keep_last: int = 2

    def validate(self, source: str = "config"):
        checks = [(self.policy != "", "policy: the model to tune is required"),
                  (self.reward_model != "", "reward_model: the reward model is required"),
                  (self.data != "", "data: the prompts file is required"),
                  (self.method in ("grpo", "rloo"), "method must be grpo or rloo"),
                  (isinstance(self.group_size, int) and self.group_size >= 2,
                   "group_size must be an integer >= 2 (advantages compare replies to the same prompt)"),
                  (self.max_prompt_len > 0 and self.max_new_tokens > 0,
                   "max_prompt_len and max_new_tokens must be > 0"),
                  (self.temperature > 0, "temperature must be > 0 (the policy must sample)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.top_k >= 0, "top_k must be >= 0"),
                  (self.kl_beta >= 0, "kl_beta must be >= 0"),
                  (self.epochs > 0, "epochs must be > 0"),
                  (not self.fsdp, "fsdp: rlhf samples replies of different lengths on each rank, which FSDP's "
                   "collective forward cannot; use DDP (torchrun without fsdp)")]
        _raise_failed(checks + self.run_checks(), source)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """key=value items (YAML values) set into `data`; model.dim=128 sets a nested field."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise CamelidError(f"override {item!r}: use key=value")
        key, value = item.split("=", 1)
        target = data
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise CamelidError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a mapping of keys")
        try:
            target[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise CamelidError(f"override {item!r}: the value is not valid YAML (quote a string)") from None
    return data


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    return load_config(path, overrides, TrainConfig)


def load_config(path: str | Path | None, overrides: list[str] = (), cls=TrainConfig):
    import yaml

    data = {}
    source = str(path) if path else "command line"
    if path:
        try:
            data = yaml.safe_load(read_text(path)) or {}
        except FileNotFoundError:
            raise CamelidError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            raise CamelidError(f"{path}: invalid YAML" + (f" at line {line + 1}" if line is not None else "")) from None
        if not isinstance(data, dict):
            raise CamelidError(f"{path}: a training config must be a mapping of keys to values")
    apply_overrides(data, overrides)
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise CamelidError(f"{source}: unknown key {key!r}")
        data[key] = _coerce(data[key], fields[key], key, source)
    cfg = cls(**data)
    cfg.validate(source)
    return cfg
