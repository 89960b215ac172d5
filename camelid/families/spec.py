"""What camelid knows about one model family, as data: the shape of a `Family`, and the helpers its modules
share. The loaders and exporters in `formats/` are generic over these specs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from camelid.errors import CamelidError
from camelid.model.config import ModelConfig


class HFExperts(NamedTuple):
    """A mixture-of-experts block's module names inside a Hugging Face layer."""
    router: str  # e.g. "block_sparse_moe.gate"
    expert: str  # one expert's prefix, with "{e}" for its index: "block_sparse_moe.experts.{e}."
    gate_up_down: tuple[str, str, str]  # an expert's three projections: ("w1", "w3", "w2")
    shared: str | None = None  # the shared expert's prefix (Qwen2-MoE: "mlp.shared_expert.")
    shared_gate: str | None = None  # and its gate (a dim -> 1 projection)


@dataclass(frozen=True)
class HFLayout:
    """A family's tensor names in a Hugging Face checkpoint."""
    prefix: str  # the wrapper module's prefix, e.g. "model."
    layer: str  # a block's prefix inside it, with "{i}" for its index
    layer_names: Callable[[ModelConfig], dict[str, str]]  # camelid per-layer tensor -> HF name in the block
    global_names: dict[str, str]  # camelid tensor outside the blocks -> HF name inside the prefix
    qkv: tuple[str, str, str] | None = None  # separate q/k/v modules, fused here into attn.wqkv
    gate_up: tuple[str, str] | None = None  # separate gate/up modules, fused into mlp.w_in
    qkv_groups: Callable[[ModelConfig], int | None] = lambda cfg: None  # a fused QKV grouped per head group
    transposed: bool = False  # 2-D weights stored (in, out), as GPT-2's Conv1D does
    unprefixed: frozenset[str] = frozenset({"lm_head.weight", "lm_head.bias", "embed_out.weight"})
    experts: HFExperts | None = None
    # (from_hf(hf_sd, cfg, source, convert) -> sd, to_hf(sd, cfg) -> hf_sd): a family whose checkpoint is not
    # one stack of blocks (T5's encoder and decoder) maps its tensors itself
    tensors: tuple[Callable, Callable] | None = None
    # (camelid LoRA layer path, target) -> the checkpoint's module, for such a family's PEFT adapters
    peft_module: Callable[[str, str], str] | None = None

    def all_layer_names(self, cfg: ModelConfig) -> dict[str, str]:
        """layer_names, and a mixture-of-experts block's router and down projections."""
        names = dict(self.layer_names(cfg))
        ex = self.experts
        if ex is None or not cfg.n_experts:
            return names
        names["mlp.router.weight"] = ex.router + ".weight"
        for e in range(cfg.n_experts):
            names[f"mlp.experts.{e}.w_out.weight"] = ex.expert.format(e=e) + ex.gate_up_down[2] + ".weight"
        if ex.shared:
            names["mlp.shared.w_out.weight"] = ex.shared + ex.gate_up_down[2] + ".weight"
            names["mlp.shared_gate.weight"] = ex.shared_gate + ".weight"
        return names

    def fusions(self, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
        """camelid layer -> the Hugging Face modules whose rows it concatenates (q/k/v; gate/up, an
        expert's too)."""
        out = {}
        if self.qkv:
            out["attn.wqkv"] = self.qkv
        if self.gate_up:
            out["mlp.w_in"] = self.gate_up
        ex = self.experts
        if ex is not None and cfg.n_experts:
            for e in range(cfg.n_experts):
                out[f"mlp.experts.{e}.w_in"] = tuple(ex.expert.format(e=e) + n for n in ex.gate_up_down[:2])
            if ex.shared:
                out["mlp.shared.w_in"] = tuple(ex.shared + n for n in ex.gate_up_down[:2])
        return out


class GGUFPart(NamedTuple):
    """One llama.cpp tensor among those a camelid tensor's rows are made of."""
    name: str  # with "{i}" for the block index where it is a block's
    rows: Callable[[ModelConfig], int] | None = None  # its share of the rows where there are several
    heads: Callable[[ModelConfig], int] | None = None  # heads whose q/k rows llama.cpp interleaves (Meta's order)
    expert: int | None = None  # one expert's slice of a 3-D `ffn_*_exps` tensor


@dataclass(frozen=True)
class GGUFLayout:
    """A family as llama.cpp names it."""
    arch: str  # general.architecture
    # (gf, key, floats) -> ModelConfig fields beyond the sizes every file gives: key(name, kind, default) reads
    # "{arch}.{name}" from the metadata, floats(tensor name) a tensor's values
    config: Callable
    layer_parts: Callable[[ModelConfig], dict[str, list[GGUFPart]]]  # camelid block tensor -> its GGUF parts
    exports: Callable[[ModelConfig], bool]  # llama.cpp's graph for `arch` computes what this config says
    write_metadata: Callable  # (gguf.GGUFWriter, cfg): the family's metadata keys
    q4_output_type: str = "Q6_K"  # llama-quantize's type for the output layer of a 4-bit file
    q4_k_m: bool = False  # camelid writes llama-quantize's Q4_K_M mix for this family
    always_output: bool = False  # llama.cpp's graph reads output.weight even for tied embeddings
    rope_scaling_types: tuple[str, ...] = ()  # the rope_scaling types camelid writes as this arch's metadata
    norm_offset: float = 0.0  # added to every norm weight in the file (Gemma's converter stores 1 + w)
    # None: llama.cpp's graph for `arch` has no experts; else whether it routes as this config does
    experts: Callable[[ModelConfig], bool] | None = None
    # cfg -> {name: tensor} the file carries beside the weights (Phi-3's LongRoPE factors); the loader reads
    # them in `config`
    extra_tensors: Callable[[ModelConfig], dict[str, torch.Tensor]] = lambda cfg: {}
    # (cfg, has_output) -> every camelid tensor's GGUF parts, for a file that is not one stack of `blk.*` blocks
    # (T5's `enc.blk.*` and `dec.blk.*`); `config` then reads every ModelConfig field itself
    parts: Callable[[ModelConfig, bool], dict[str, list[GGUFPart]]] | None = None
    block_count: Callable[[ModelConfig], int] = lambda cfg: cfg.n_layers  # {arch}.block_count
    add_eos: bool = False  # llama.cpp appends EOS to what it tokenizes (T5's encoder input)


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.arch
    hf_model_types: tuple[str, ...]  # config.json's model_type values this family reads
    config_from_hf: Callable[[dict], dict]  # config.json -> ModelConfig fields
    config_to_hf: Callable[[ModelConfig], dict]  # and back
    hf: HFLayout
    gguf: GGUFLayout | None = None  # None: llama.cpp has no graph for it
    template: str = "raw"  # the chat template when the model brings none
    stop: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- helpers the family modules share


def first(hf: dict, *keys, default=None):
    """The first of `keys` config.json sets (families name one setting in several ways)."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    return default


def rope_from_hf(hf: dict, default_theta=10000.0) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers layout: the old keys or `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    theta = first(hf, "rope_theta", "rotary_emb_base", default=params.get("rope_theta", default_theta))
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "dynamic":  # transformers scales from max_position_embeddings, whatever else the dict says
        scaling = dict(scaling, original_max_position_embeddings=hf.get("max_position_embeddings"))
    elif kind in ("llama3", "yarn", "longrope"):  # as transformers completes them
        scaling = dict(scaling)
        if hf.get("original_max_position_embeddings") is not None:  # Phi-3 keeps it outside rope_scaling
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        if kind == "yarn" and scaling.get("factor") is None and scaling["original_max_position_embeddings"]:
            scaling["factor"] = hf.get("max_position_embeddings", 0) / scaling["original_max_position_embeddings"]
    return float(theta), scaling


ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
ACTIVATION_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise CamelidError(f"activation {name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def ungroup_qkv(t: torch.Tensor, groups: int, cfg: ModelConfig) -> torch.Tensor:
    """(groups, q_per_group + 2, head_dim, ...) rows -> camelid's q | k | v rows: NeoX's and Falcon's fused
    layouts are this one with different group sizes."""
    per = cfg.n_heads // groups
    g = t.reshape(groups, per + 2, cfg.head_dim, *t.shape[1:])
    q = g[:, :per].reshape(-1, *t.shape[1:])
    k = g[:, per].reshape(-1, *t.shape[1:])
    v = g[:, per + 1].reshape(-1, *t.shape[1:])
    return torch.cat((q, k, v))


def group_qkv(t: torch.Tensor, groups: int, cfg: ModelConfig) -> torch.Tensor:
    per = cfg.n_heads // groups
    hd = cfg.head_dim
    q, k, v = t.split((cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd))
    q = q.reshape(groups, per, hd, *t.shape[1:])
    k = k.reshape(groups, 1, hd, *t.shape[1:])
    v = v.reshape(groups, 1, hd, *t.shape[1:])
    return torch.cat((q, k, v), dim=1).reshape(t.shape)


def q_rows(cfg: ModelConfig) -> int:
    return cfg.n_heads * cfg.head_dim


def kv_rows(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads * cfg.head_dim


def ffn_rows(cfg: ModelConfig) -> int:
    return cfg.ffn_dim


def q_heads(cfg: ModelConfig) -> int:
    return cfg.n_heads


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads


def expert_rows(cfg: ModelConfig) -> int:
    return cfg.expert_ffn_dim or cfg.ffn_dim


def shared_rows(cfg: ModelConfig) -> int:
    return cfg.shared_expert_dim


def moe_parts(cfg: ModelConfig) -> dict[str, list[GGUFPart]]:
    """A mixture-of-experts block's tensors as llama.cpp names them, the same in every family: the router
    (ffn_gate_inp), the experts stacked in 3-D tensors, and the shared expert where there is one."""
    b = "blk.{i}."
    parts = {"mlp.router.weight": [GGUFPart(b + "ffn_gate_inp.weight")]}
    for e in range(cfg.n_experts):
        parts[f"mlp.experts.{e}.w_in.weight"] = [GGUFPart(b + "ffn_gate_exps.weight", expert_rows, expert=e),
                                                 GGUFPart(b + "ffn_up_exps.weight", expert_rows, expert=e)]
        parts[f"mlp.experts.{e}.w_out.weight"] = [GGUFPart(b + "ffn_down_exps.weight", expert=e)]
    if cfg.shared_expert_dim:
        parts["mlp.shared_gate.weight"] = [GGUFPart(b + "ffn_gate_inp_shexp.weight")]
        parts["mlp.shared.w_in.weight"] = [GGUFPart(b + "ffn_gate_shexp.weight", shared_rows),
                                           GGUFPart(b + "ffn_up_shexp.weight", shared_rows)]
        parts["mlp.shared.w_out.weight"] = [GGUFPart(b + "ffn_down_shexp.weight")]
    return parts


def write_moe_metadata(w, cfg: ModelConfig):
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_used)


def one_part(names: dict[str, str]) -> dict[str, list[GGUFPart]]:
    """camelid block tensor -> one GGUF tensor each, weights and biases, for {camelid layer: llama.cpp name}."""
    return {f"{ours}.{p}": [GGUFPart(f"blk.{{i}}.{theirs}.{p}")] for ours, theirs in names.items()
            for p in ("weight", "bias")}


def gguf_rope_scaling(gf, key, arch: str) -> dict | None:
    """`{arch}.rope.scaling.*` as a rope_scaling camelid computes; any other type is refused by name."""
    kind = gf.metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": key("rope.scaling.factor", float)}
    raise CamelidError(f"{gf.path}: {arch}.rope.scaling.type={kind!r} is not supported (none, linear)")


def write_rms_rope_metadata(w, cfg: ModelConfig):
    """The metadata llama.cpp's RMSNorm-and-rotary graphs (llama, qwen2, qwen3) read beyond the sizes."""
    import gguf

    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if (cfg.rope_scaling or {}).get("type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
