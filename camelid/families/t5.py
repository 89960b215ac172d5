"""Google's T5 (ReLU, tied output scaled by dim^-0.5), T5 v1.1 and Flan-T5 (gated GELU, their own output
layer), and LMSYS's FastChat-T5 (a Flan-T5-XL): the encoder-decoder of model/t5.py. Its checkpoints name two
stacks (`encoder.block.*`, `decoder.block.*`), so the family maps its tensors itself rather than through one
stack's layout; q/k/v, cross-attention's k/v and gate/up are fused as camelid's other families fuse them."""

from __future__ import annotations

import torch

from camelid.errors import CamelidError
from camelid.families.spec import Family, GGUFLayout, GGUFPart, HFLayout, activation, ffn_rows, q_rows
from camelid.model.config import ModelConfig

# copies of the shared embedding some checkpoints carry
_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def config_from_hf(hf: dict) -> dict:
    proj = hf.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    tied = hf.get("tie_word_embeddings", True)
    # transformers 5 writes `scale_decoder_outputs` (its configs always say tied); older configs scale when tied
    scaled = hf.get("scale_decoder_outputs", tied)
    return dict(arch="t5", vocab_size=hf["vocab_size"], dim=hf["d_model"], n_heads=hf["num_heads"],
                head_dim=hf["d_kv"], ffn_dim=hf["d_ff"], n_encoder_layers=hf["num_layers"],
                n_layers=hf.get("num_decoder_layers") or hf["num_layers"], max_seq_len=hf.get("n_positions") or 512,
                norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6),
                activation="gelu_tanh" if act == "gelu" else activation(act), gated_mlp=gated,
                positions="relative", rel_buckets=hf.get("relative_attention_num_buckets", 32),
                rel_max_distance=hf.get("relative_attention_max_distance", 128), attn_scale=1.0,
                tie_embeddings=tied, logit_scale=hf["d_model"] ** -0.5 if scaled else None,
                extra={"decoder_start_token_id": hf.get("decoder_start_token_id", 0)})


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.positions != "relative" or cfg.norm != "rmsnorm" or cfg.qkv_bias or cfg.mlp_bias \
            or cfg.activation not in ("relu", "gelu_tanh", "silu"):
        raise CamelidError(f"this {cfg.arch} model's blocks are not T5's; it has no T5 form")
    act = {"relu": "relu", "gelu_tanh": "gelu", "silu": "silu"}[cfg.activation]
    return dict(model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=cfg.dim, d_kv=cfg.head_dim,
                d_ff=cfg.ffn_dim, num_layers=cfg.n_encoder_layers, num_decoder_layers=cfg.n_layers,
                num_heads=cfg.n_heads, relative_attention_num_buckets=cfg.rel_buckets,
                relative_attention_max_distance=cfg.rel_max_distance, layer_norm_epsilon=cfg.norm_eps,
                feed_forward_proj=("gated-" if cfg.gated_mlp else "") + act, n_positions=cfg.max_seq_len,
                is_encoder_decoder=True, scale_decoder_outputs=cfg.logit_scale is not None,
                decoder_start_token_id=cfg.extra.get("decoder_start_token_id", 0), dropout_rate=0.0)


def tensor_names(cfg: ModelConfig) -> dict[str, str | tuple[str, ...]]:
    """camelid tensor -> the checkpoint's (a tuple: several whose rows it concatenates)."""
    names: dict[str, str | tuple[str, ...]] = {
        "tok_embeddings.weight": "shared.weight", "encoder_norm.weight": "encoder.final_layer_norm.weight",
        "norm.weight": "decoder.final_layer_norm.weight",
        "encoder_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder_bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    wi = ("wi_0", "wi_1") if cfg.gated_mlp else ("wi",)
    for stack, ours, count in (("encoder", "encoder", cfg.n_encoder_layers), ("decoder", "layers", cfg.n_layers)):
        for i in range(count):
            b, o = f"{stack}.block.{i}.layer.", f"{ours}.{i}."
            attn, mlp = b + "0.SelfAttention.", b + ("2" if stack == "decoder" else "1")
            names.update({o + "attn_norm.weight": b + "0.layer_norm.weight",
                          o + "attn.wqkv.weight": tuple(f"{attn}{p}.weight" for p in "qkv"),
                          o + "attn.wo.weight": attn + "o.weight", o + "mlp_norm.weight": mlp + ".layer_norm.weight",
                          o + "mlp.w_in.weight": tuple(f"{mlp}.DenseReluDense.{w}.weight" for w in wi),
                          o + "mlp.w_out.weight": mlp + ".DenseReluDense.wo.weight"})
            if stack == "decoder":
                cross = b + "1.EncDecAttention."
                names.update({o + "cross_norm.weight": b + "1.layer_norm.weight",
                              o + "cross.wq.weight": cross + "q.weight",
                              o + "cross.wkv.weight": (cross + "k.weight", cross + "v.weight"),
                              o + "cross.wo.weight": cross + "o.weight"})
    return names


def state_dict_from_hf(hf_sd: dict, cfg: ModelConfig, source: str, convert=None) -> dict:
    remaining = dict(hf_sd)
    for name in _COPIES + (("lm_head.weight",) if cfg.tie_embeddings else ()):
        remaining.pop(name, None)
    sd = {}
    for ours, theirs in tensor_names(cfg).items():
        parts = (theirs,) if isinstance(theirs, str) else theirs
        missing = next((p for p in parts if p not in remaining), None)
        if missing is not None:
            raise CamelidError(f"{source}: tensor {missing!r} is missing")
        t = torch.cat([remaining.pop(p) for p in parts]) if len(parts) > 1 else remaining.pop(parts[0])
        sd.update(convert(ours, t) if convert else {ours: t})
    if remaining:
        raise CamelidError(f"{source}: unexpected tensor {next(iter(remaining))!r} for t5")
    return sd


def state_dict_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    out = {}
    for ours, theirs in tensor_names(cfg).items():
        if ours not in sd:
            continue
        parts = (theirs,) if isinstance(theirs, str) else theirs
        for name, t in zip(parts, sd[ours].chunk(len(parts))):
            out[name] = t.contiguous()
    return out


def peft_module(path: str, target: str) -> str:
    """A camelid LoRA layer's target (`encoder.0.attn.wqkv`, q) -> T5's module, as PEFT names its adapter's
    tensors (`encoder.block.0.layer.0.SelfAttention.q`)."""
    stack, i, part = path.split(".")[:3]
    hf_stack = "encoder" if stack == "encoder" else "decoder"
    if part == "attn":
        return f"{hf_stack}.block.{i}.layer.0.SelfAttention.{target}"
    if part == "cross":
        return f"decoder.block.{i}.layer.1.EncDecAttention.{target}"
    return f"{hf_stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}.DenseReluDense.{target}"


# llama.cpp's bucketing reaches 128 positions whatever the model was trained with
GGUF_MAX_DISTANCE = 128


def gguf_config(gf, key, floats) -> dict:
    """llama.cpp's `t5` metadata. Its graph takes relu for a plain MLP and (tanh) GELU for a gated one, and
    writes no output scale: a file without its own output layer (or with a copy of the embedding table, as
    T5's checkpoints saved it) is T5's tied one, scaled by dim^-0.5 as transformers scales it."""
    src, t = str(gf.path), gf.tensors
    for name in ("enc.blk.1.attn_rel_b.weight", "dec.blk.1.attn_rel_b.weight"):
        if name in t:
            raise CamelidError(f"{src}: tensor {name!r}: a relative position bias in every block (umT5) is not "
                               "supported; T5 and Flan-T5 learn one per stack")
    n_enc, dim, heads = key("block_count"), key("embedding_length"), key("attention.head_count")
    n_dec = key("decoder_block_count", default=n_enc)
    gated = "enc.blk.0.ffn_gate.weight" in t
    embd, out = t["token_embd.weight"], t.get("output.weight")
    tied = out is None or bool(out.type == embd.type and out.shape == embd.shape and (out.data == embd.data).all())
    rel = t.get("enc.blk.0.attn_rel_b.weight")
    buckets = key("attention.relative_buckets_count")
    if rel is None or tuple(rel.shape) != (buckets, heads):
        raise CamelidError(f"{src}: tensor 'enc.blk.0.attn_rel_b.weight' should hold {buckets} buckets for {heads} "
                           "heads (attention.relative_buckets_count, attention.head_count)")
    return dict(arch="t5", vocab_size=embd.shape[0], dim=dim, n_heads=heads, n_kv_heads=heads,
                head_dim=key("attention.key_length", default=dim // heads), ffn_dim=key("feed_forward_length"),
                n_encoder_layers=n_enc, n_layers=n_dec, max_seq_len=key("context_length", default=512),
                norm="rmsnorm", norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-6),
                activation="gelu_tanh" if gated else "relu", gated_mlp=gated, positions="relative",
                rel_buckets=buckets, rel_max_distance=GGUF_MAX_DISTANCE, attn_scale=1.0, tie_embeddings=tied,
                logit_scale=dim ** -0.5 if tied else None,
                extra={"decoder_start_token_id": gf.metadata.get(f"{gf.metadata['general.architecture']}"
                                                                 ".decoder_start_token_id", 0)})


def gguf_parts(cfg: ModelConfig, has_output: bool) -> dict[str, list[GGUFPart]]:
    """camelid tensor -> llama.cpp's, in its converter's order: the embeddings, the decoder, the encoder."""
    parts = {"tok_embeddings.weight": [GGUFPart("token_embd.weight")]}
    ffn = ["ffn_gate", "ffn_up"] if cfg.gated_mlp else ["ffn_up"]
    for stack, ours, count in (("dec", "layers", cfg.n_layers), ("enc", "encoder", cfg.n_encoder_layers)):
        parts[f"{ours if stack == 'enc' else 'decoder'}_bias.weight"] = [GGUFPart(f"{stack}.blk.0.attn_rel_b.weight")]
        for i in range(count):
            b, o = f"{stack}.blk.{i}.", f"{ours}.{i}."
            parts.update({o + "attn_norm.weight": [GGUFPart(b + "attn_norm.weight")],
                          o + "attn.wqkv.weight": [GGUFPart(f"{b}attn_{p}.weight", q_rows) for p in "qkv"],
                          o + "attn.wo.weight": [GGUFPart(b + "attn_o.weight")]})
            if stack == "dec":
                parts.update({o + "cross_norm.weight": [GGUFPart(b + "cross_attn_norm.weight")],
                              o + "cross.wq.weight": [GGUFPart(b + "cross_attn_q.weight")],
                              o + "cross.wkv.weight": [GGUFPart(f"{b}cross_attn_{p}.weight", q_rows) for p in "kv"],
                              o + "cross.wo.weight": [GGUFPart(b + "cross_attn_o.weight")]})
            parts.update({o + "mlp_norm.weight": [GGUFPart(b + "ffn_norm.weight")],
                          o + "mlp.w_in.weight": [GGUFPart(f"{b}{p}.weight", ffn_rows) for p in ffn],
                          o + "mlp.w_out.weight": [GGUFPart(b + "ffn_down.weight")]})
        parts[("norm" if stack == "dec" else "encoder_norm") + ".weight"] = [GGUFPart(f"{stack}.output_norm.weight")]
    if has_output:
        parts["output.weight"] = [GGUFPart("output.weight")]
    return parts


def gguf_exports(cfg: ModelConfig) -> bool:
    return cfg.rel_max_distance == GGUF_MAX_DISTANCE and cfg.activation == ("gelu_tanh" if cfg.gated_mlp else "relu")


def gguf_write_metadata(w, cfg: ModelConfig):
    w.add_decoder_block_count(cfg.n_layers)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_relative_attn_buckets_count(cfg.rel_buckets)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_decoder_start_token_id(cfg.extra.get("decoder_start_token_id", 0))


FAMILY = Family(name="t5", hf_model_types=("t5",), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                hf=HFLayout(prefix="", layer="", layer_names=lambda cfg: {}, global_names={},
                            tensors=(state_dict_from_hf, state_dict_to_hf), peft_module=peft_module),
                gguf=GGUFLayout(arch="t5", config=gguf_config, layer_parts=lambda cfg: {}, exports=gguf_exports,
                                write_metadata=gguf_write_metadata, always_output=True, parts=gguf_parts,
                                block_count=lambda cfg: cfg.n_encoder_layers, add_eos=True),
                template="one_shot")  # FastChat serves FastChat-T5 with its one_shot format
