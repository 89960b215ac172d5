"""Writing camelid models as GGUF files that llama.cpp and Ollama run, with a model card and a Modelfile.

Quantization follows llama-quantize's choices, so a camelid export looks like what people download:
- 1-D tensors (norms, biases) stay F32.
- Q4_0 and Q4_K_M files keep the output layer at Q6_K.
- Q4_K_M gives attn_v and ffn_down Q6_K in llama.cpp's "more bits" layers.
- A row length that a block type cannot split falls back as llama.cpp's does (Q4_K to Q5_0, Q6_K to Q8_0,
  legacy types to F16).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from camelid.errors import CamelidError
from camelid.families import FAMILIES, family
from camelid.files import atomic_file, check_output_folder, claim_folder, write_text
from camelid.formats.gguf import global_parts, layer_parts
from camelid.formats.gguf_blocks import quantize
from camelid.formats.gguf_file import GGML_TYPE_IDS, GGML_TYPES
from camelid.model.memory import model_parameters
from camelid.tokenizer.chat_template import resolve_template
from camelid.tokenizer.tokenizer import HFBackend, PieceBackend, SentencePieceBackend, Tokenizer

# --quant -> (base type, llama.cpp's general.file_type)
QUANTS = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2), "q4_k_m": ("Q4_K", 15)}
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q4_0": "F16", "Q8_0": "F16", "Q5_0": "F16"}
_BLOCK = {name: block for name, block, _ in GGML_TYPES.values()}


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, layer: int | None, n_layers: int,
                q4_output_type: str = "Q6_K", has_output: bool = True, n_experts: int = 0) -> str:
    base = QUANTS[quant][0]
    if len(shape) == 1 or name == "position_embd.weight" or name.endswith("ffn_gate_inp.weight"):
        return "F32"  # llama-quantize keeps the routers in float too
    kind = base
    output = name == "output.weight" or (name == "token_embd.weight" and not has_output)  # tied: one table
    if quant in ("q4_0", "q4_k_m") and output:
        kind = q4_output_type
    elif quant == "q4_k_m" and layer is not None and name.split(".")[2] in ("attn_v", "ffn_down") \
            and _more_bits(layer, n_layers):
        kind = "Q6_K"
    elif quant in ("q4_0", "q4_k_m") and n_experts == 8 and layer is not None and name.split(".")[2] in ("attn_k",
                                                                                                          "attn_v"):
        kind = "Q8_0"  # llama-quantize's rule for 8-expert models (Mixtral 8x7B)
    while shape[-1] % _BLOCK[kind]:
        kind = _FALLBACK[kind]
    return kind


def gguf_tensors(sd: dict[str, torch.Tensor], cfg) -> list[tuple[str, torch.Tensor, int | None]]:
    """camelid's state dict -> (GGUF name, tensor in PyTorch order, layer index) in llama.cpp's naming: each
    camelid tensor split into its family's GGUF parts (q/k/v, gate/up), q and k rows in Meta's order."""
    fam = family(cfg.arch)
    has_output = not cfg.tie_embeddings or fam.gguf.always_output
    if fam.gguf.parts is not None:
        groups = [(None, fam.gguf.parts(cfg, has_output))]
    else:
        top = global_parts(cfg, has_output)
        first = {k: top.pop(k) for k in ("tok_embeddings.weight", "embed_norm.weight", "embed_norm.bias",
                                         "pos_embeddings.weight") if k in top}
        # in llama.cpp's converter's order: the embeddings, the blocks, the final norm and output layer
        groups = [(None, first), *((i, layer_parts(cfg, i)) for i in range(cfg.n_layers)), (None, top)]
    out = []
    for layer, parts in groups:
        for ours, sources in parts.items():
            t = sd.get(ours)
            if ours == "output.weight" and t is None:
                t = sd["tok_embeddings.weight"]  # llama.cpp's graph wants the tied table as its own tensor
            if ours == "output.weight" and cfg.logit_scale is not None:
                t = t * cfg.logit_scale  # llama.cpp's graph does not scale the logits (T5's tied output)
            if t is None:
                continue
            if ours.endswith("norm.weight") and fam.gguf.norm_offset:
                t = t + fam.gguf.norm_offset
            if t.dim() == 2 and t.shape[0] == 1:  # a (1, n) matrix is a vector to llama.cpp
                t = t.flatten()
            pieces = t.split([p.rows(cfg) for p in sources]) if len(sources) > 1 else [t]
            out += [(p.name, _permute(piece, p.heads(cfg)) if p.heads else piece, layer, p.expert)
                    for p, piece in zip(sources, pieces)]
    out += [(name, t, None, None) for name, t in fam.gguf.extra_tensors(cfg).items()]
    return _stack_experts(out)


def _stack_experts(tensors: list) -> list[tuple[str, torch.Tensor, int | None]]:
    """Each expert's slices stacked into the 3-D tensor llama.cpp reads, where its first slice was."""
    experts: dict[str, list[torch.Tensor]] = {}
    out = []
    for name, t, layer, expert in tensors:
        if expert is None:
            out.append((name, t, layer))
            continue
        if name not in experts:
            experts[name] = []
            out.append((name, experts[name], layer))
        experts[name].append(t)
    return [(name, torch.stack(t) if isinstance(t, list) else t, layer) for name, t, layer in out]


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face half-split q/k rows -> Meta's interleaved rows, which llama.cpp's RoPE expects."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_arch(cfg, source: str, quant: str = "f32") -> str:
    """llama.cpp's architecture for this model, or a one-line error where llama.cpp's graph would compute
    something else (llama.cpp reads no flags for these variants)."""
    fam = FAMILIES.get(cfg.arch)
    if fam is None or fam.gguf is None or not fam.gguf.exports(cfg):
        writable = ", ".join(f.name for f in FAMILIES.values() if f.gguf)
        raise CamelidError(f"{source}: GGUF export covers the {writable} families as llama.cpp runs them; "
                           f"this model is {cfg.arch!r}" + ("" if fam is None or fam.gguf is None else
                                                            " in a variant llama.cpp's graph does not compute"))
    if cfg.n_experts and (fam.gguf.experts is None or not fam.gguf.experts(cfg) or cfg.dense_layers):
        raise CamelidError(f"{source}: llama.cpp's {fam.gguf.arch} graph does not route experts as this model does")
    scaling = (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type"))
    if cfg.rope_scaling and scaling not in fam.gguf.rope_scaling_types:
        raise CamelidError(f"{source}: GGUF export does not write rope scaling {scaling!r}")
    if quant == "q4_k_m" and (not fam.gguf.q4_k_m or cfg.n_experts):
        raise CamelidError(f"--quant q4_k_m: camelid writes llama-quantize's Q4_K_M mix for the LLaMA family; "
                           f"for {cfg.arch!r}, run llama-quantize on the f16 export")
    return fam.gguf.arch


def export_gguf(lm, dest: str | Path, quant: str = "f16", name: str | None = None, force: bool = False) -> Path:
    """Write DEST/NAME-QUANT.gguf, DEST/README.md (a model card) and DEST/Modelfile; returns the GGUF path.
    DEST collects the quantizations of one model: a folder camelid did not write is refused, and a file of
    the same name is replaced only with `force`."""
    from camelid.formats.load import plain_state_dict

    if quant not in QUANTS:
        raise CamelidError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    cfg = lm.config
    gguf_arch(cfg, lm.source, quant)
    dest = Path(dest)
    name = name or Path(lm.source.rstrip("/")).stem or "model"
    path = dest / f"{name}-{quant.upper()}.gguf"
    check_output_folder(dest, force=True)  # a file, or a folder camelid did not write, is refused even so
    if path.exists() and not force:
        raise CamelidError(f"{path}: exists; pass --force to replace it")
    claim_folder(dest)
    with atomic_file(path) as tmp:
        _write(lm, cfg, plain_state_dict(lm), tmp, quant, name)
    write_model_card(lm, dest, name, path)
    return path


def _write(lm, cfg, sd, tmp: Path, quant: str, name: str):
    import gguf

    arch = gguf_arch(cfg, lm.source, quant)
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(name)
    w.add_file_type(QUANTS[quant][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(family(cfg.arch).gguf.block_count(cfg))
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    family(cfg.arch).gguf.write_metadata(w, cfg)
    _add_tokenizer(w, lm.tokenizer, cfg.vocab_size, lm.source, family(cfg.arch).gguf.add_eos)
    if lm.template != "raw":
        w.add_chat_template(resolve_template(lm.template)[0])
    tensors = gguf_tensors(sd, cfg)
    has_output = any(tname == "output.weight" for tname, _, _ in tensors)
    for tname, t, layer in tqdm(tensors, desc=f"quantizing to {quant}", unit="tensor", leave=False):
        kind = tensor_type(tname, tuple(t.shape), quant, layer, cfg.n_layers, family(cfg.arch).gguf.q4_output_type,
                           has_output, cfg.n_experts)
        data = quantize(t.detach().float().cpu().numpy(), kind)
        if kind in ("F32", "F16"):
            w.add_tensor(tname, data)
        else:
            w.add_tensor(tname, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType(GGML_TYPE_IDS[kind]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


# ------------------------------------------------------------------------------------ tokenizer

CONTROL, NORMAL, UNKNOWN, USER_DEFINED, UNUSED, BYTE = 3, 1, 2, 4, 5, 6


def _add_tokenizer(w, tok: Tokenizer, vocab_size: int, source: str, add_eos: bool = False):
    b = tok.backend
    unigram = _unigram_spec(b)
    if unigram is not None:
        _ugm(w, *unigram, vocab_size)
    elif isinstance(b, PieceBackend):
        v = b.vocab
        tokens = [p if i in v.byte_of else p.replace(v.space, "▁") for i, p in enumerate(v.pieces)]
        types = [CONTROL if i in v.special_ids and i != v.unk_id else UNKNOWN if i == v.unk_id
                 else BYTE if i in v.byte_of else NORMAL for i in range(len(tokens))]
        _spm(w, tokens, list(v.scores), types, v.unk_id, v.add_space_prefix, vocab_size)
    elif isinstance(b, SentencePieceBackend):
        sp = b.sp
        n = sp.get_piece_size()
        types = [CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else BYTE if sp.is_byte(i)
                 else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
        tokens = [sp.id_to_piece(i) for i in range(n)]
        for i, t in enumerate(tokens):  # user-defined symbols (camelid's special tokens) are not normal pieces
            if types[i] == NORMAL and t.startswith("<") and t.endswith(">") and len(sp.encode(t)) == 1 \
                    and sp.get_score(i) == 0.0:
                types[i] = USER_DEFINED
        _spm(w, tokens, [sp.get_score(i) for i in range(n)], types, sp.unk_id(), True, vocab_size)
    elif isinstance(b, HFBackend):
        _hf_tokenizer(w, json.loads(b.tok.to_str()), source, vocab_size)
    else:
        raise CamelidError(f"{source}: this tokenizer cannot be written to GGUF")
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_ids:
        w.add_eos_token_id(tok.eos_ids[0])
        if len(tok.eos_ids) > 1:
            w.add_eot_token_id(tok.eos_ids[1])
    w.add_add_bos_token(bool(tok.add_bos and tok.bos_id is not None))
    w.add_add_eos_token(add_eos)


def _unigram_spec(b) -> tuple | None:
    """(tokens, scores, types, unk_id, add_space_prefix, remove_extra_whitespaces, precompiled_charsmap) of a
    SentencePiece unigram vocabulary (T5's), from its .model file or its tokenizer.json; None for others."""
    if isinstance(b, SentencePieceBackend):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(b.sp.serialized_model_proto())
        if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
            return None
        sp, n = b.sp, b.sp.get_piece_size()
        types = [CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else BYTE if sp.is_byte(i)
                 else UNUSED if sp.is_unused(i) else USER_DEFINED if p.type == p.USER_DEFINED else NORMAL
                 for i, p in zip(range(n), proto.pieces)]
        norm = proto.normalizer_spec
        return ([sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types, sp.unk_id(),
                norm.add_dummy_prefix, norm.remove_extra_whitespaces, bytes(norm.precompiled_charsmap))
    if not isinstance(b, HFBackend):
        return None
    spec = json.loads(b.tok.to_str())
    model = spec.get("model", {})
    if model.get("type") != "Unigram":
        return None
    import base64

    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens = [piece for piece, _ in model["vocab"]]
    scores = [float(score) for _, score in model["vocab"]]
    unk = model.get("unk_id")
    types = [UNKNOWN if i == unk else CONTROL if i in added and added[i].get("special") else
             USER_DEFINED if i in added else NORMAL for i in range(len(tokens))]
    steps = _steps(spec.get("normalizer"))
    charsmap = next((st.get("precompiled_charsmap") for st in steps if st.get("type") == "Precompiled"), None)
    spaces = any(st.get("type") == "Replace" and st.get("pattern", {}).get("Regex") == " {2,}" for st in steps)
    prefix = any(st.get("type") == "Metaspace" and st.get("prepend_scheme", "always") != "never"
                 for st in _steps(spec.get("pre_tokenizer")))
    return tokens, scores, types, unk, prefix, spaces, base64.b64decode(charsmap) if charsmap else b""


def _steps(part: dict | None) -> list[dict]:
    """A tokenizer.json normalizer or pre-tokenizer as its list of steps."""
    if not part:
        return []
    inner = part.get("normalizers") or part.get("pretokenizers")
    return [s for p in inner for s in _steps(p)] if inner is not None else [part]


def _ugm(w, tokens, scores, types, unk_id, add_space_prefix, remove_extra_whitespaces, charsmap, vocab_size):
    """llama.cpp's `t5` vocabulary, as its converter writes one from T5's spiece.model."""
    tokens, scores, types = _padded(tokens, scores, types, vocab_size)
    w.add_tokenizer_model("t5")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if unk_id is not None:
        w.add_unk_token_id(unk_id)
    w.add_add_space_prefix(add_space_prefix)
    w.add_remove_extra_whitespaces(remove_extra_whitespaces)
    if charsmap:
        w.add_precompiled_charsmap(charsmap)


def _padded(tokens: list, scores: list | None, types: list, vocab_size: int):
    """llama.cpp wants one token per embedding row; rows past the tokenizer (padding) become unused tokens."""
    extra = max(vocab_size - len(tokens), 0)
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), len(tokens) + extra)]
    return tokens, None if scores is None else scores + [-1e9] * extra, types + [UNUSED] * extra


def _spm(w, tokens, scores, types, unk_id, add_space_prefix, vocab_size):
    tokens, scores, types = _padded(tokens, scores, types, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(unk_id)
    w.add_add_space_prefix(add_space_prefix)


def _hf_tokenizer(w, spec: dict, source: str, vocab_size: int):
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CamelidError(f"{source}: GGUF export supports BPE tokenizers, not {model.get('type')!r}")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        tokens[i] = piece
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    types = [CONTROL if t in added and added[t].get("special") else USER_DEFINED if t in added
             else UNUSED if t.startswith("[PAD") else NORMAL for t in tokens]
    if model.get("byte_fallback"):
        # a SentencePiece vocabulary in tokenizers' clothes (Hugging Face LLaMA): llama.cpp merges by score,
        # so each piece scores by the rank of the merge that makes it
        rank = {a + b: -r for r, (a, b) in enumerate(m.split(" ", 1) for m in merges)}
        types = [BYTE if t.startswith("<0x") and len(t) == 6 else ty for t, ty in zip(tokens, types)]
        unk = model.get("unk_token")
        _spm(w, tokens, [float(rank.get(t, 0)) for t in tokens], types, vocab.get(unk, 0),
             "Prepend" in json.dumps(spec.get("normalizer")), vocab_size)
        return
    tokens, _, types = _padded(tokens, None, types, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


# ------------------------------------------------------------------------------------ model card

_OLLAMA_TEMPLATES = {
    "alpaca": "{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. Write a "
              "response that appropriately completes the request.{{ end }}\n\n### Instruction:\n{{ .Prompt }}"
              "\n\n### Response:{{ .Response }}",
    "vicuna": "{{ if .System }}{{ .System }} {{ else }}A chat between a curious user and an artificial "
              "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
              "questions. {{ end }}USER: {{ .Prompt }} ASSISTANT:{{ .Response }}",
    "chatml": "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n"
              "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}",
    "llama2": "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]"
              "{{ .Response }}",
    "raw": "{{ .Prompt }}{{ .Response }}",
}


def write_model_card(lm, dest: Path, name: str, latest: Path):

    cfg = lm.config
    files = sorted(dest.glob(f"{name}-*.gguf"))
    rows = "\n".join(f"| [{f.name}]({f.name}) | {f.name[len(name) + 1:-5]} | {f.stat().st_size / 1e6:.1f} MB |"
                     for f in files)
    stop = [lm.tokenizer.special_text(i) for i in lm.tokenizer.eos_ids] + list(lm.stop)
    template = lm.template if lm.template in _OLLAMA_TEMPLATES else None
    card = f"""---
library_name: gguf
tags: [gguf, camelid, {cfg.arch}]
pipeline_tag: text-generation
---

# {name} (GGUF)

A {cfg.arch} model with {model_parameters(cfg) / 1e6:.1f}M parameters, exported by camelid from `{lm.source}`.

| file | quantization | size |
|---|---|---|
{rows}

## Architecture

| | |
|---|---|
| layers | {f"{cfg.n_encoder_layers} encoder, {cfg.n_layers} decoder" if cfg.n_encoder_layers else cfg.n_layers} |
| hidden size | {cfg.dim} |
| attention heads (KV heads) | {cfg.n_heads} ({cfg.n_kv_heads}) |
| feed-forward size | {cfg.ffn_dim} |
| context length | {cfg.max_seq_len} |
| vocabulary | {cfg.vocab_size} |

Chat template: `{lm.template if len(lm.template) < 40 else 'custom (stored in the GGUF metadata)'}`;
generation stops at {', '.join(f'`{s}`' for s in stop) or 'the end-of-text token'}.

## Use

```sh
llama-cli -m {latest.name} -p "Once upon a time"
ollama create {name.lower()} -f Modelfile && ollama run {name.lower()}
camelid chat {latest.name}
```
"""
    write_text(dest / "README.md", card)
    modelfile = [f"FROM ./{latest.name}"]
    if template:
        modelfile.append(f'TEMPLATE """{_OLLAMA_TEMPLATES[template]}"""')
    modelfile += [f"PARAMETER stop {json.dumps(s)}" for s in stop if s]
    write_text(dest / "Modelfile", "\n".join(modelfile) + "\n")
