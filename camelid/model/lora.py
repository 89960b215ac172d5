"""LoRA (Hu et al. 2021): a frozen weight W plus a trained low-rank update (alpha / r) * B @ A.

camelid fuses projections (q, k and v in `wqkv`; gate and up in `w_in`), so a LoRA target is a slice of
rows of a fused layer: targeting q_proj and v_proj, as alpaca-lora does, adds one (A, B) pair per slice and
leaves k's rows alone. Targets use the Hugging Face / PEFT names, which `camelid.formats.peft` writes;
`qkv_proj` and `gate_up_proj` take the whole fused layer, as PEFT does for the families whose checkpoints
store q/k/v (Bloom, GPT-NeoX, Falcon, MPT, Phi-3, GPT-2, StarCoder) or gate/up (Phi-3) as one module."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from camelid.errors import CamelidError
from camelid.model.dropout import dropout
from camelid.model.quant import QUANTIZED

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
# an encoder-decoder's (T5's) modules, each in both stacks, q/k/v/o in cross-attention too, as PEFT matches them
T5_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
_T5_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "wi_0", "down_proj": "wo"}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self):
        unknown = [t for t in self.targets if t not in TARGETS + T5_TARGETS]
        if unknown:
            raise CamelidError(f"LoRA target module {unknown[0]!r} does not exist; choose from {', '.join(TARGETS)} "
                               f"(T5: {', '.join(T5_TARGETS)})")
        if not self.targets or self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise CamelidError("LoRA needs targets, rank >= 1, alpha > 0 and 0 <= dropout < 1")


class LoRALinear(nn.Module):
    """A frozen layer and one low-rank update per targeted slice of its output rows. The base is an nn.Linear,
    or an int8/int4/GGUF-block layer (QLoRA: the 4-bit weights stay 4-bit, gradients reach only A and B)."""

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int]], cfg: LoRAConfig):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.slices = slices
        self.scaling = cfg.scaling
        self.dropout = cfg.dropout
        self.enabled = True  # off: the layer is its base (preference tuning's reference model)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        # The adapter is trained, so it stays fp32 even over a bf16 base (frozen weights need no fp32 master).
        device, dtype = next(iter((*base.parameters(), *base.buffers()))).device, torch.float32
        for name, (lo, hi) in slices.items():
            a = torch.empty(cfg.rank, base.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's initialisation: B = 0, so training starts at W
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(hi - lo, cfg.rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = dropout(x, self.dropout, self.training)
        for name, (lo, hi) in self.slices.items():
            a, b = self.lora_A[name], self.lora_B[name]
            delta = (F.linear(F.linear(h.to(a.dtype), a), b) * self.scaling).to(y.dtype)
            y = y + (delta if hi - lo == y.shape[-1] else F.pad(delta, (lo, y.shape[-1] - hi)))
        return y

    def delta(self) -> torch.Tensor:
        """The update to the full weight, (alpha / r) * B @ A on each slice."""
        a = next(iter(self.lora_A.values()))
        d = torch.zeros(self.base.out_features, self.base.in_features, device=a.device)
        for name, (lo, hi) in self.slices.items():
            d[lo:hi] = (self.lora_B[name] @ self.lora_A[name]) * self.scaling
        return d


def target_slices(model, layer: int, cfg_targets: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """{layer path: {target: rows}} for one block, e.g. {"layers.0.attn.wqkv": {"q_proj": (0, 512)}}."""
    mc = model.cfg
    q, kv, ffn = mc.n_heads * mc.head_dim, mc.n_kv_heads * mc.head_dim, mc.ffn_dim
    where = {"q_proj": ("attn", "wqkv", (0, q)), "k_proj": ("attn", "wqkv", (q, q + kv)),
             "v_proj": ("attn", "wqkv", (q + kv, q + 2 * kv)), "o_proj": ("attn", "wo", (0, mc.dim)),
             "gate_proj": ("mlp", "w_in", (0, ffn)),
             "up_proj": ("mlp", "w_in", (ffn, 2 * ffn) if mc.gated_mlp else (0, ffn)),
             "down_proj": ("mlp", "w_out", (0, mc.dim)), "qkv_proj": ("attn", "wqkv", (0, q + 2 * kv)),
             "gate_up_proj": ("mlp", "w_in", (0, 2 * ffn))}
    if mc.moe(layer) and {"gate_proj", "up_proj", "down_proj", "gate_up_proj"} & set(cfg_targets):
        raise CamelidError("LoRA targets the attention of a mixture-of-experts model (q_proj, k_proj, v_proj, "
                           "o_proj): its MLP is many experts")
    for name in ("gate_proj", "gate_up_proj"):
        if name in cfg_targets and not mc.gated_mlp:
            raise CamelidError(f"LoRA target module {name!r} does not exist in this model (its MLP is not gated)")
    for whole, parts in (("qkv_proj", {"q_proj", "k_proj", "v_proj"}), ("gate_up_proj", {"gate_proj", "up_proj"})):
        if whole in cfg_targets and parts & set(cfg_targets):
            raise CamelidError(f"LoRA target {whole} already covers {', '.join(sorted(parts))}")
    out: dict = {}
    for t in cfg_targets:
        parent, attr, rows = where[t]
        out.setdefault(f"layers.{layer}.{parent}.{attr}", {})[t] = rows
    return out


def t5_targets(mc) -> tuple[str, ...]:
    return ("q", "k", "v", "o") + (("wi_0", "wi_1") if mc.gated_mlp else ("wi",)) + ("wo",)


def model_targets(mc, targets: list[str]) -> list[str]:
    """The targets as this model names its modules: a T5 takes its own (q, v, wi, ...), or the usual names
    (q_proj, v_proj, up_proj, ...) for the same modules; a decoder-only model takes the usual names."""
    if not mc.n_encoder_layers:
        t5_names = [t for t in targets if t in T5_TARGETS]
        if t5_names:
            raise CamelidError(f"LoRA target module {t5_names[0]!r} is a T5 module; this model's are "
                               f"{', '.join(TARGETS)}")
        return list(targets)
    aliases = {**_T5_ALIASES, "up_proj": "wi_1" if mc.gated_mlp else "wi"}
    out = list(dict.fromkeys(aliases.get(t, t) for t in targets))
    unknown = [t for t in out if t not in t5_targets(mc)]
    if unknown:
        raise CamelidError(f"LoRA target module {unknown[0]!r} does not exist in this T5 (its modules: "
                           f"{', '.join(t5_targets(mc))})")
    return out


def t5_target_slices(model, targets: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """{layer path: {target: rows}} for every block of both stacks: q, k and v are slices of the fused
    self-attention and (in the decoder) of cross-attention's q and fused k/v; wi_0 and wi_1 of the fused MLP."""
    mc = model.cfg
    inner, ffn = mc.n_heads * mc.head_dim, mc.ffn_dim
    self_rows = {"q": (0, inner), "k": (inner, 2 * inner), "v": (2 * inner, 3 * inner)}
    cross_rows = {"q": ("cross.wq", (0, inner)), "k": ("cross.wkv", (0, inner)), "v": ("cross.wkv", (inner, 2 * inner)),
                  "o": ("cross.wo", (0, mc.dim))}
    mlp_rows = {"wi": ("mlp.w_in", (0, ffn)), "wi_0": ("mlp.w_in", (0, ffn)), "wi_1": ("mlp.w_in", (ffn, 2 * ffn)),
                "wo": ("mlp.w_out", (0, mc.dim))}
    out: dict = {}
    for stack, count in (("encoder", mc.n_encoder_layers), ("layers", mc.n_layers)):
        for i in range(count):
            for t in targets:
                if t in self_rows:
                    where = [("attn.wqkv", self_rows[t])]
                else:
                    where = [("attn.wo", (0, mc.dim)) if t == "o" else mlp_rows[t]]
                if stack == "layers" and t in cross_rows:
                    where.append(cross_rows[t])
                for layer, rows in where:
                    out.setdefault(f"{stack}.{i}.{layer}", {})[t] = rows
    return out


def add_lora(model, cfg: LoRAConfig):
    """Freeze the model and wrap the targeted layers; only the LoRA matrices are left trainable."""
    cfg.validate()
    cfg.targets = model_targets(model.cfg, cfg.targets)
    model.requires_grad_(False)
    if model.cfg.n_encoder_layers:
        per_block = [t5_target_slices(model, cfg.targets)]
    else:
        per_block = [target_slices(model, i, cfg.targets) for i in range(model.cfg.n_layers)]
    for block in per_block:
        for path, slices in block.items():
            parent_path, attr = path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise CamelidError(f"{path} already has a LoRA adapter")
            setattr(parent, attr, LoRALinear(base, slices, cfg))
    model.lora_config = cfg
    return model


def _float_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight = layer.dequantize()
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                    dtype=dtype)
    out.weight.copy_(weight)
    if layer.bias is not None:
        out.bias.copy_(layer.bias)
    return out.requires_grad_(False)


def lora_layers(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_off(model):
    """The base model, for as long as the block runs: the frozen weights without any adapter's update."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and put the plain layers back. A quantized base is
    dequantized first: the merged layer is float (quantize the merged model again if you want it small)."""
    for name, layer in lora_layers(model).items():
        base = layer.base
        if isinstance(base, QUANTIZED):
            base = _float_linear(base, getattr(model, "dtype", torch.float32))
        base.weight += layer.delta().to(base.weight.dtype)
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, base)
    model.lora_config = None
    return model


# ---------------------------------------------------------------- several adapters, one per batch row


_ROWS = threading.local()  # each thread's choice: the engine's decode steps and an embedding batch never mix


class MultiLoRALinear(nn.Module):
    """A frozen layer and several adapters' updates, applied per batch row: row b takes adapter
    `adapter_rows(...)[b]` (0: none). Adapters of different ranks are zero-padded to the largest, which changes
    nothing; each update is pre-scaled. Serving keeps the adapters apart, so one batch decodes for many."""

    def __init__(self, base: nn.Module, updates: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
                 slices: dict[str, tuple[int, int]]):
        super().__init__()
        self.base, self.slices = base, slices
        rank = max((a.shape[0] for u in updates for a, _ in u.values()), default=1)
        device = next(iter((*base.parameters(), *base.buffers()))).device
        for name, (lo, hi) in slices.items():
            a = torch.zeros(len(updates) + 1, rank, base.in_features, device=device)
            b = torch.zeros(len(updates) + 1, hi - lo, rank, device=device)
            for k, update in enumerate(updates, 1):
                if name in update:
                    ua, ub = update[name]
                    a[k, :ua.shape[0]], b[k, :, :ub.shape[1]] = ua, ub
            self.register_buffer(f"a_{name}", a)
            self.register_buffer(f"b_{name}", b)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = getattr(_ROWS, "ids", None)
        if rows is None or not bool((rows > 0).any()):
            return y
        for name, (lo, hi) in self.slices.items():
            a, b = getattr(self, f"a_{name}")[rows], getattr(self, f"b_{name}")[rows]  # (B, r, in), (B, out, r)
            delta = torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)).to(y.dtype)
            y = y + (delta if hi - lo == y.shape[-1] else F.pad(delta, (lo, y.shape[-1] - hi)))
        return y


@contextmanager
def adapter_rows(ids: torch.Tensor | list[int]):
    """For the forwards this thread runs inside the block, batch row b applies adapter ids[b] (0: the base)."""
    before = getattr(_ROWS, "ids", None)
    _ROWS.ids = torch.as_tensor(ids, dtype=torch.long)
    try:
        yield
    finally:
        _ROWS.ids = before


def take_adapter(model) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]]:
    """The model's LoRA adapter as data, {layer path: {target: (A, B scaled, rows)}}, the plain layers put back."""
    out = {}
    for path, layer in lora_layers(model).items():
        out[path] = {name: (layer.lora_A[name].detach().float(), (layer.lora_B[name] * layer.scaling).detach().float(),
                            rows) for name, rows in layer.slices.items()}
        parent, attr = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, layer.base)
    model.lora_config = None
    return out


def set_adapters(model, adapters: list[dict | None]) -> None:
    """Give `model` these adapters (each as `take_adapter` returns it; None for a freed place, so the others
    keep their ids), chosen per batch row with `adapter_rows`: the k-th of the list is id k + 1. Adapters it
    had before are replaced."""
    for path, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]:
        parent, attr = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, layer.base)
    adapters = [a or {} for a in adapters]
    for path in sorted({p for adapter in adapters for p in adapter}):
        slices = {name: rows for adapter in adapters for name, (_, _, rows) in adapter.get(path, {}).items()}
        updates = [{name: (a, b) for name, (a, b, _) in adapter.get(path, {}).items()} for adapter in adapters]
        parent_path, attr = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, MultiLoRALinear(getattr(parent, attr), updates, slices))
