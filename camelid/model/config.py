"""The one config that describes every supported family; each family is a set of switches."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from camelid.errors import CamelidError


@dataclass
class ModelConfig:
    arch: str = "llama"  # family name, used for naming and for Hugging Face export
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means multi-head attention (= n_heads)
    head_dim: int | None = None  # None means dim // n_heads
    ffn_dim: int = 11008
    max_seq_len: int = 2048
    # block structure
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm with a bias (MPT's have none)
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    gated_mlp: bool = True  # SwiGLU-style gate * up
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x)) (GPT-J, NeoX, Falcon)
    shared_parallel_norm: bool = False  # parallel blocks that use one norm for both branches
    pre_norm: bool = True  # False: post-norm (OPT-350m)
    # positions
    positions: str = "rope"  # rope | learned | alibi (a per-head linear penalty on distance: Bloom, MPT)
    alibi_max_bias: float = 8.0  # ALiBi's slopes: 2^(-max_bias * i / heads), interleaved past a power of two
    rotary_pct: float = 1.0  # fraction of head_dim that is rotated (GPT-J, NeoX: partial)
    rope_interleaved: bool = False  # rotate pairs (GPT-J) instead of halves (NeoX/HF LLaMA)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "linear"|"llama3", ...} as in HF configs
    learned_pos_offset: int = 0  # OPT keeps two unused rows before position 0
    # positions "glm_2d", GLM-130B's blank infilling (ChatGLM-6B): the prompt's context (before the start token)
    # attends both ways; the first half of each head rotates by a token's position (from the start token on,
    # the mask token's), the second half by its place in the block that follows (0 in the context)
    glm_start_id: int | None = None  # <sop>: where the block (the reply) starts
    glm_mask_ids: list | None = None  # [MASK], [gMASK]: the one in the prompt is where the block stands
    rope_fp16_freqs: bool = False  # rotary frequencies rounded to fp16, as THUDM's ChatGLM-6B code makes them
    residual_scale: float | None = None  # each residual is the normalized input times this (GLM's DeepNorm)
    # biases and embeddings
    qkv_bias: bool = False
    qkv_clip: float | None = None  # q, k and v clamped to [-clip, clip] (MPT's clip_qkv)
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotary embedding (Qwen3)
    sliding_window: int | None = None  # a query sees only the last N positions (Mistral, Qwen2)
    sliding_layers: list | None = None  # the blocks that slide; None: all of them, when sliding_window is set
    rope_local_theta: float | None = None  # the sliding blocks' own RoPE base, unscaled (Gemma 3)
    attn_scale: float | None = None  # scores' scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    norm_plus_one: bool = False  # RMSNorm weights stored as w and applied as (1 + w), in fp32 (Gemma)
    embed_scale: bool = False  # embeddings times sqrt(dim), rounded to the compute dtype (Gemma)
    embed_norm: bool = False  # a norm on the token embeddings (Bloom)
    post_norms: bool = False  # a norm on the attention's and on the MLP's output before each residual sum
    attn_out_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    embed_proj_dim: int | None = None  # OPT-350m projects a smaller embedding up to dim
    final_norm: bool = True
    score_head: bool = False  # a scalar score per position beside the LM head: a reward model
    # mixture of experts: each token's MLP is the weighted sum of the n_experts_used experts its router picks
    n_experts: int = 0  # 0: a dense MLP
    n_experts_used: int = 0
    expert_ffn_dim: int | None = None  # each expert's hidden size; None: ffn_dim
    moe_renorm: bool = True  # the picked experts' softmax weights rescaled to sum to 1 (Mixtral, Qwen3-MoE)
    shared_expert_dim: int | None = None  # an expert every token uses, gated by sigmoid(x . w) (Qwen2-MoE)
    dense_layers: list | None = None  # blocks that keep the dense MLP of ffn_dim in a mixture-of-experts model
    # an encoder-decoder (T5, model/t5.py): n_layers decoder blocks after an encoder of n_encoder_layers
    n_encoder_layers: int = 0  # 0: decoder-only
    rel_buckets: int = 32  # positions "relative": T5's buckets of key - query distance, a learned bias each
    rel_max_distance: int = 128  # distances from here on share the last bucket
    logit_scale: float | None = None  # the final hidden state times this before the LM head (T5: dim^-0.5)
    dropout: float = 0.0  # training only: embeddings, attention weights and each residual branch
    extra: dict = field(default_factory=dict)  # family-specific fields kept for lossless export

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Every field checked for its type and range before anything derives from it: one message naming
        the key, instead of a failure deep inside the model (or NaN logits) later."""
        _check_types(self)
        choices = {"norm": ("rmsnorm", "layernorm"), "activation": ("silu", "gelu", "gelu_tanh", "relu"),
                   "positions": ("rope", "learned", "alibi", "relative", "glm_2d")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise CamelidError(f"model config: {key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "n_kv_heads", "head_dim",
                    "embed_proj_dim"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise CamelidError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
            if self.head_dim == 0:
                raise CamelidError(f"model config: dim={self.dim} is smaller than n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise CamelidError(f"model config: n_heads={self.n_heads} is not a multiple of "
                               f"n_kv_heads={self.n_kv_heads}")
        for key, low, high in (("norm_eps", 0, 1), ("rope_theta", 0, float("inf")), ("rotary_pct", 0, 1)):
            value = getattr(self, key)
            if not (low < value <= high) or not math.isfinite(value):
                raise CamelidError(f"model config: {key} must be a finite number in ({low}, {high}], got {value!r}")
        if not 0 <= self.dropout < 1:
            raise CamelidError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        if self.n_encoder_layers < 0 or (self.positions == "relative") != (self.n_encoder_layers > 0) \
                or self.rel_buckets < 4 or self.rel_max_distance <= self.rel_buckets // 4:
            raise CamelidError(f"model config: an encoder-decoder has positions 'relative', n_encoder_layers > 0, "
                               f"rel_buckets >= 4 and rel_max_distance past a quarter of them (got "
                               f"{self.positions!r}, {self.n_encoder_layers}, {self.rel_buckets}, "
                               f"{self.rel_max_distance})")
        if self.learned_pos_offset < 0:
            raise CamelidError(f"model config: learned_pos_offset must be >= 0, got {self.learned_pos_offset}")
        if self.rotates and self.rotary_dim % 2:
            raise CamelidError(f"model config: rotary dimensions (head_dim {self.head_dim} x rotary_pct "
                               f"{self.rotary_pct}) must be even")
        if self.positions == "glm_2d" and (self.glm_start_id is None or 2 * self.rotary_dim != self.head_dim
                                           or self.rope_interleaved):
            raise CamelidError("model config: positions 'glm_2d' needs glm_start_id and rotary_pct 0.5 (each half "
                               "of a head rotated by its own position), in halves")
        _check_rope_scaling(self.rope_scaling)
        if self.post_norms and (self.parallel_residual or not self.pre_norm):
            raise CamelidError("model config: post_norms applies to sequential pre-norm blocks only")
        for key in ("rope_local_theta", "residual_scale", "attn_scale", "attn_softcap", "final_softcap", "qkv_clip",
                    "alibi_max_bias"):
            value = getattr(self, key)
            if value is not None and not (0 < value < float("inf")):
                raise CamelidError(f"model config: {key} must be a positive number or null, got {value!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise CamelidError(f"model config: sliding_window must be a positive integer, got {self.sliding_window}")
        _check_experts(self)
        if self.sliding_layers is not None and not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in self.sliding_layers):
            raise CamelidError(f"model config: sliding_layers must list block indices below n_layers={self.n_layers}")

    def moe(self, layer: int) -> bool:
        """Whether block `layer`'s MLP is a mixture of experts."""
        return self.n_experts > 0 and layer not in (self.dense_layers or ())

    @property
    def rope_attention_factor(self) -> float:
        """What YaRN and LongRoPE multiply the rotary cos and sin by (1 for every other kind)."""
        s = self.rope_scaling or {}
        kind = s.get("rope_type", s.get("type"))
        if kind not in ("yarn", "longrope"):
            return 1.0
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        old = s["original_max_position_embeddings"]
        factor = s.get("factor") or self.max_seq_len / old
        if kind == "longrope":
            return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))
        if s.get("mscale") and s.get("mscale_all_dim"):
            return _yarn_mscale(factor, s["mscale"]) / _yarn_mscale(factor, s["mscale_all_dim"])
        return _yarn_mscale(factor)

    def slides(self, layer: int) -> bool:
        """Whether block `layer` attends through the sliding window."""
        return self.sliding_window is not None and (self.sliding_layers is None or layer in self.sliding_layers)

    @property
    def rotates(self) -> bool:
        """Positions enter through rotary embeddings (the model keeps frequency tables)."""
        return self.positions in ("rope", "glm_2d")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CamelidError(f"{source}: unknown model config key {unknown[0]!r}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CamelidError(f"{source}: {exc}") from None
        except CamelidError as exc:
            raise CamelidError(f"{source}: {exc}") from None


# What each field's value must be (bool is not taken for a number: `true` is no dimension).
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
          list: "a list"}
# The rope_scaling types the model computes, with the keys each needs (as Hugging Face configs name them).
ROPE_SCALING = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings"),
                # NTK-aware: past the original context, the base grows with the sequence (transformers' dynamic)
                "dynamic": ("factor", "original_max_position_embeddings"),
                "longrope": ("original_max_position_embeddings",),  # with short_factor and long_factor lists
                "factors": ()}  # GGUF's rope_freqs tensor: one divisor per frequency


def _check_types(cfg: "ModelConfig"):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds = [k for k in _KINDS if k.__name__ in f.type]
        if value is None and "None" in f.type:
            continue
        ok = any(isinstance(value, k) and (k is bool or not isinstance(value, bool)) for k in kinds)
        ok = ok or (float in kinds and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise CamelidError(f"model config: {f.name} must be {_KINDS[kinds[0]]}, got {value!r}")


def _check_experts(cfg: "ModelConfig"):
    if cfg.n_experts < 0 or (cfg.n_experts and not 0 < cfg.n_experts_used <= cfg.n_experts):
        raise CamelidError(f"model config: n_experts_used must be between 1 and n_experts={cfg.n_experts}, "
                           f"got {cfg.n_experts_used}")
    for key in ("expert_ffn_dim", "shared_expert_dim"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise CamelidError(f"model config: {key} must be a positive integer, got {value!r}")
    if cfg.dense_layers is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg.n_layers for i in cfg.dense_layers):
        raise CamelidError(f"model config: dense_layers must list block indices below n_layers={cfg.n_layers}")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _check_rope_scaling(scaling: dict | None):
    if scaling is None:
        return
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default") and not set(scaling) - {"type", "rope_type"}:
        return
    if kind not in ROPE_SCALING:
        raise CamelidError(f"model config: rope_scaling type {kind!r} is not supported "
                           f"(supported: {', '.join(ROPE_SCALING)})")
    if kind == "factors" and not (isinstance(scaling.get("factors"), list) and all(
            isinstance(x, (int, float)) and 0 < x < float("inf") for x in scaling["factors"])):
        raise CamelidError("model config: rope_scaling.factors must be a list of positive numbers")
    for key in ("short_factor", "long_factor") if kind == "longrope" else ():
        if not (isinstance(scaling.get(key), list) and all(
                isinstance(x, (int, float)) and 0 < x < float("inf") for x in scaling[key])):
            raise CamelidError(f"model config: rope_scaling.{key} must be a list of positive numbers")
    optional = {"yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"),
                "longrope": ("factor", "attention_factor")}.get(kind, ())
    for key in ROPE_SCALING[kind] + tuple(k for k in optional if scaling.get(k) is not None):
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise CamelidError(f"model config: rope_scaling.{key} must be a positive number, got {value!r}")


def _llama(dim, n_layers, n_heads, ffn_dim, n_kv_heads=None, vocab_size=32000, max_seq_len=2048, **kw):
    return dict(arch="llama", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                ffn_dim=ffn_dim, vocab_size=vocab_size, max_seq_len=max_seq_len, **kw)


def _gpt2(dim, n_layers, n_heads):
    return dict(arch="gpt2", dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=4 * dim, vocab_size=50257,
                max_seq_len=1024, norm="layernorm", activation="gelu_tanh", gated_mlp=False, positions="learned",
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True)


def _opt(dim, n_layers, n_heads, **kw):
    return dict(arch="opt", dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=4 * dim, vocab_size=50272,
                max_seq_len=2048, norm="layernorm", activation="relu", gated_mlp=False, positions="learned",
                learned_pos_offset=2, qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, **kw)


def _neox(dim, n_layers, n_heads, vocab_size=50688, **kw):
    return dict(arch="gpt_neox", dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=4 * dim,
                vocab_size=vocab_size, max_seq_len=2048, norm="layernorm", activation="gelu", gated_mlp=False,
                parallel_residual=True, rotary_pct=0.25, qkv_bias=True, attn_out_bias=True, mlp_bias=True, **kw)


def _qwen(arch, dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size=151936, **kw):
    return dict(arch=arch, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                vocab_size=vocab_size, max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0,
                qkv_bias=arch in ("qwen2", "qwen2_moe"), qk_norm=arch in ("qwen3", "qwen3_moe"), **kw)


def _gemma(arch, dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size=256000, max_seq_len=8192, **kw):
    return dict(arch=arch, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=256,
                ffn_dim=ffn_dim, vocab_size=vocab_size, max_seq_len=max_seq_len, norm_eps=1e-6, activation="gelu_tanh",
                norm_plus_one=True, embed_scale=True, tie_embeddings=True, **kw)


_ALIBI = dict(norm="layernorm", gated_mlp=False, positions="alibi", tie_embeddings=True)

# Sizes as published; `camelid info` computes the parameter counts from these (tests check them).
PRESETS: dict[str, dict] = {
    "llama-7b": _llama(4096, 32, 32, 11008),
    "llama-13b": _llama(5120, 40, 40, 13824),
    "llama-33b": _llama(6656, 60, 52, 17920),
    "llama-65b": _llama(8192, 80, 64, 22016),
    "llama2-7b": _llama(4096, 32, 32, 11008, max_seq_len=4096),
    "llama2-13b": _llama(5120, 40, 40, 13824, max_seq_len=4096),
    "llama2-70b": _llama(8192, 80, 64, 28672, n_kv_heads=8, max_seq_len=4096),
    "llama3-8b": _llama(4096, 32, 32, 14336, n_kv_heads=8, vocab_size=128256, max_seq_len=8192,
                        rope_theta=500000.0),
    "llama3-70b": _llama(8192, 80, 64, 28672, n_kv_heads=8, vocab_size=128256, max_seq_len=8192,
                         rope_theta=500000.0),
    "tinyllama-1.1b": _llama(2048, 22, 32, 5632, n_kv_heads=4),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "gptj-6b": dict(arch="gptj", dim=4096, n_layers=28, n_heads=16, ffn_dim=16384, vocab_size=50400,
                    max_seq_len=2048, norm="layernorm", activation="gelu_tanh", gated_mlp=False,
                    parallel_residual=True, shared_parallel_norm=True, rotary_pct=0.25, rope_interleaved=True,
                    mlp_bias=True, lm_head_bias=True),
    "pythia-12b": _neox(5120, 36, 40, vocab_size=50688),
    "dolly-v2-12b": _neox(5120, 36, 40, vocab_size=50280),
    "pythia-1.4b": _neox(2048, 24, 16, vocab_size=50304),
    "falcon-7b": dict(arch="falcon", dim=4544, n_layers=32, n_heads=71, n_kv_heads=1, ffn_dim=4 * 4544,
                      vocab_size=65024, max_seq_len=2048, norm="layernorm", activation="gelu", gated_mlp=False,
                      parallel_residual=True, shared_parallel_norm=True, tie_embeddings=True),
    "falcon-40b": dict(arch="falcon", dim=8192, n_layers=60, n_heads=128, n_kv_heads=8, ffn_dim=4 * 8192,
                       vocab_size=65024, max_seq_len=2048, norm="layernorm", activation="gelu", gated_mlp=False,
                       parallel_residual=True),  # the released 40B checkpoint has its own lm_head
    "opt-125m": _opt(768, 12, 12),
    "opt-350m": _opt(1024, 24, 16, embed_proj_dim=512, pre_norm=False, final_norm=False),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "mistral-7b": _llama(4096, 32, 32, 14336, n_kv_heads=8, max_seq_len=32768, sliding_window=4096),
    "mixtral-8x7b": _llama(4096, 32, 32, 14336, n_kv_heads=8, max_seq_len=32768, rope_theta=1000000.0,
                           n_experts=8, n_experts_used=2),
    "qwen2.5-0.5b": _qwen("qwen2", 896, 24, 14, 2, 4864, tie_embeddings=True),
    "qwen2.5-7b": _qwen("qwen2", 3584, 28, 28, 4, 18944, vocab_size=152064),
    "qwen3-8b": _qwen("qwen3", 4096, 36, 32, 8, 12288, head_dim=128),
    "qwen3-30b-a3b": _qwen("qwen3_moe", 2048, 48, 32, 4, 6144, head_dim=128, n_experts=128, n_experts_used=8,
                           expert_ffn_dim=768),
    "gemma-2b": _gemma("gemma", 2048, 18, 8, 1, 16384),
    "gemma-2-2b": _gemma("gemma2", 2304, 26, 8, 4, 9216, post_norms=True, attn_softcap=50.0, final_softcap=30.0,
                         attn_scale=256 ** -0.5,
                         sliding_window=4096, sliding_layers=list(range(0, 26, 2))),
    "gemma-3-1b": _gemma("gemma3", 1152, 26, 4, 1, 6912, vocab_size=262144, post_norms=True, qk_norm=True,
                         attn_scale=256 ** -0.5,
                         sliding_window=512, sliding_layers=[i for i in range(26) if (i + 1) % 6],
                         rope_theta=1000000.0, rope_local_theta=10000.0, max_seq_len=32768),
    "phi-3-mini": dict(arch="phi3", dim=3072, n_layers=32, n_heads=32, ffn_dim=8192, vocab_size=32064,
                       max_seq_len=4096, sliding_window=2047),
    "bloom-560m": dict(arch="bloom", dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, vocab_size=250880,
                       max_seq_len=2048, activation="gelu_tanh", embed_norm=True, qkv_bias=True, attn_out_bias=True,
                       mlp_bias=True, **_ALIBI),
    "mpt-7b": dict(arch="mpt", dim=4096, n_layers=32, n_heads=32, ffn_dim=16384, vocab_size=50432, max_seq_len=2048,
                   activation="gelu", norm_bias=False, **_ALIBI),
}
# Fine-tunes share their base's architecture; their names are what people type.
ALIASES = {"alpaca-7b": "llama-7b", "vicuna-7b": "llama-7b", "vicuna-13b": "llama-13b", "koala-7b": "llama-7b",
           "koala-13b": "llama-13b", "wizardlm-7b": "llama-7b", "wizardlm-13b": "llama-13b",
           "dolly-v2": "dolly-v2-12b", "mistral-7b-instruct": "mistral-7b", "mixtral-8x7b-instruct": "mixtral-8x7b",
           "qwen2.5-0.5b-instruct": "qwen2.5-0.5b", "qwen2.5-7b-instruct": "qwen2.5-7b",
           "gemma-2b-it": "gemma-2b", "gemma-2-2b-it": "gemma-2-2b", "gemma-3-1b-it": "gemma-3-1b",
           "phi-3-mini-instruct": "phi-3-mini", "bloomz-560m": "bloom-560m", "mpt-7b-instruct": "mpt-7b",
           "mpt-7b-chat": "mpt-7b"}


def preset(name: str) -> ModelConfig:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise CamelidError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return ModelConfig(**PRESETS[key])
