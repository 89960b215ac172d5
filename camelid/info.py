"""What `camelid info` and `camelid estimate` say: a model's shape, size and memory needs."""

from __future__ import annotations

from pathlib import Path

from camelid.errors import CamelidError
from camelid.model.config import ALIASES, PRESETS, ModelConfig, preset
from camelid.model.memory import (
    BYTES_PER_PARAM,
    estimate_memory,
    human_bytes,
    human_count,
    machine_memory,
    model_parameters,
)
from camelid.model.transformer import count_parameters


def config_for(model_or_preset: str) -> tuple[ModelConfig, str]:
    if Path(model_or_preset).exists():
        from camelid.formats.load import read_config

        return read_config(model_or_preset), model_or_preset
    if model_or_preset.lower() in PRESETS or model_or_preset.lower() in ALIASES:
        return preset(model_or_preset), f"preset {model_or_preset}"
    raise CamelidError(f"{model_or_preset!r} is neither a model path nor a preset "
                       f"(presets: {', '.join(sorted(PRESETS))})")


def architecture_summary(cfg: ModelConfig) -> str:
    positions = {"learned": "learned positions", "alibi": "ALiBi",
                 "relative": f"relative position buckets ({cfg.rel_buckets})",
                 "glm_2d": "GLM's 2D RoPE (a two-way context, each half of a head by its own position)"}.get(
        cfg.positions, f"RoPE ({'interleaved' if cfg.rope_interleaved else 'half'}, {cfg.rotary_pct:g} of each head)")
    parts = [cfg.norm, cfg.activation + (" gated (SwiGLU-style)" if cfg.gated_mlp else ""), positions]
    if cfg.n_encoder_layers:
        parts.insert(0, f"encoder-decoder ({cfg.n_encoder_layers} encoder blocks, {cfg.n_layers} decoder blocks)")
    if cfg.n_experts:
        parts.append(f"mixture of {cfg.n_experts} experts, {cfg.n_experts_used} per token"
                     + (" plus a shared one" if cfg.shared_expert_dim else ""))
    if cfg.sliding_window:
        some = "" if cfg.sliding_layers is None else f" in {len(cfg.sliding_layers)} of {cfg.n_layers} blocks"
        parts.append(f"sliding window of {cfg.sliding_window}{some}")
    if cfg.n_kv_heads == 1:
        parts.append("multi-query attention")
    elif cfg.n_kv_heads != cfg.n_heads:
        parts.append(f"grouped-query attention ({cfg.n_kv_heads} KV heads)")
    if cfg.parallel_residual:
        parts.append("parallel attention/MLP")
    if not cfg.pre_norm:
        parts.append("post-norm")
    if cfg.tie_embeddings:
        parts.append("tied embeddings")
    return ", ".join(parts)


def describe(model_or_preset: str, context: int | None = None) -> str:
    cfg, source = config_for(model_or_preset)
    params = model_parameters(cfg)
    ctx = context or cfg.max_seq_len
    lines = [f"{source}: {cfg.arch}",
             f"  architecture   {architecture_summary(cfg)}",
             f"  layers         {cfg.n_layers}, dim {cfg.dim}, heads {cfg.n_heads} (head dim {cfg.head_dim}), "
             f"FFN {cfg.ffn_dim}, vocab {cfg.vocab_size}",
             f"  parameters     {params:,} ({human_count(params)})" + _active(cfg, params),
             f"  context        {cfg.max_seq_len} tokens",
             f"  memory         weights + KV cache at {ctx} tokens (+10% runtime):"]
    for quant in BYTES_PER_PARAM:
        if quant == "fp16":
            continue
        est = estimate_memory(cfg, quant, ctx, params)
        lines.append(f"    {quant:<5} {human_bytes(est.weights_bytes):>10} weights, "
                     f"{human_bytes(est.kv_cache_bytes):>10} KV cache, {human_bytes(est.total_bytes):>10} total")
    return "\n".join(lines)


def _active(cfg: ModelConfig, params: int) -> str:
    """A mixture of experts' parameters a token uses: all but the experts it does not pick."""
    if not cfg.n_experts:
        return ""
    per_expert = cfg.dim * (cfg.expert_ffn_dim or cfg.ffn_dim) * (3 if cfg.gated_mlp else 2)
    idle = per_expert * (cfg.n_experts - cfg.n_experts_used) * sum(cfg.moe(i) for i in range(cfg.n_layers))
    return f", {human_count(params - idle)} active per token"


def fits(model_or_preset: str, quant: str, context: int | None = None) -> tuple[str, bool]:
    cfg, source = config_for(model_or_preset)
    est = estimate_memory(cfg, quant, context)
    total, available = machine_memory()
    ok = est.total_bytes <= available
    verdict = "fits" if ok else ("does not fit in free memory" if est.total_bytes <= total
                                 else "does not fit in this machine's RAM")
    report = (f"{source} at {quant}: needs about {human_bytes(est.total_bytes)} "
              f"({human_bytes(est.weights_bytes)} weights + {human_bytes(est.kv_cache_bytes)} KV cache "
              f"at {context or cfg.max_seq_len} tokens); this machine has {human_bytes(available)} free of "
              f"{human_bytes(total)}: {verdict}.")
    return report, ok


def list_presets() -> str:
    rows = [f"{name:<16} {cfg['arch']:<9} {human_count(count_parameters(ModelConfig(**cfg))):>8}"
            for name, cfg in PRESETS.items()]
    aliases = ", ".join(f"{a} = {b}" for a, b in ALIASES.items())
    return "\n".join(rows) + f"\naliases: {aliases}"
