"""llama.cpp's LLaMA files from before GGUF (2023): GGML (unversioned), GGMF v1 and GGJT v1-v3 `.bin`.

Read into the structures a GGUF file gives (`GGUFFile`), with the metadata llama.cpp's
convert_llama_ggml_to_gguf.py writes, so they run through camelid's GGUF loader and `camelid convert --to gguf`
writes what that converter writes. The header has no norm epsilon or context length: the converter's defaults
(5e-6, 2048) stand in, as there; the key/value heads come from the wk tensor's shape (the converter asks for
--gqa).

The blocks changed twice. GGJT v2 stopped interleaving 4-bit pairs (v1: a byte holds elements 2j and 2j+1;
v2: j and j + 16); v3 stored Q4_0, Q4_1 and Q8_0 scales in fp16 instead of fp32. Older blocks are rewritten in
today's layout: the interleaving is a permutation (exact), while fp32 scales are rounded to fp16, as llama.cpp's
own v3 migration did (at most 2^-11 of each block's scale). llama.cpp's converter refuses such files; camelid
reads them, and says that it rounded."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from camelid.errors import CamelidError
from camelid.formats.gguf_file import GGML_TYPES, GGUFFile, GGUFTensor, _Cursor, _open_map

MAGICS = {b"lmgg": "GGML", b"fmgg": "GGMF", b"tjgg": "GGJT"}
CONTEXT_LENGTH, NORM_EPS = 2048, 5e-6  # convert_llama_ggml_to_gguf.py's defaults
_FTYPES = {0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 4: "MOSTLY_Q4_1_SOME_F16",
           7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S",
           12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S",
           17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K"}
# Meta's names, as the 2023 files kept them -> GGUF's
_GLOBAL = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
_LAYER = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
          "attention_norm": "attn_norm", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
          "feed_forward.w3": "ffn_up", "ffn_norm": "ffn_norm"}
_PRE_V3_SCALES = {"Q4_0": 20, "Q4_1": 24, "Q8_0": 36}  # bytes per block with fp32 scales


def is_legacy_ggml(path: Path) -> bool:
    """Whether a file starts as a ggml-family file does ("gg.." read as a little-endian word), known or not."""
    try:
        with open(path, "rb") as f:
            return f.read(4)[2:] == b"gg"
    except OSError:
        return False


def read_legacy_ggml(path: str | Path) -> tuple[GGUFFile, str]:
    """The file as GGUF structures, and a note when blocks' scales were rounded (else "")."""
    path = Path(path)
    data = _open_map(path)
    cur = _Cursor(data, path)
    kind = MAGICS.get(bytes(data[:4]))
    if kind is None:
        magic = bytes(data[:4])[::-1].decode("latin-1")
        raise CamelidError(f"{path}: magic {magic!r} is not a llama.cpp model file camelid reads (ggml, ggmf, ggjt)")
    cur.pos = 4
    version = 1 if kind == "GGML" else cur.unpack("<I")
    if version not in ((1,) if kind == "GGMF" else (1, 2, 3)):
        raise CamelidError(f"{path}: {kind} version {version} is not one llama.cpp wrote "
                           f"({'1' if kind == 'GGMF' else '1 to 3'})")
    n_vocab, n_embd, _n_mult, n_head, n_layer, _n_rot, ftype = (cur.unpack("<I") for _ in range(7))
    if ftype not in _FTYPES or not (n_vocab and n_embd and n_head and n_layer) or n_embd % n_head:
        raise CamelidError(f"{path}: implausible {kind} header (n_vocab={n_vocab}, n_embd={n_embd}, "
                           f"n_head={n_head}, n_layer={n_layer}, ftype={ftype})")
    tokens, scores = _vocab(cur, n_vocab, scores=kind != "GGML")
    tensors, rounded = {}, set()
    view = np.frombuffer(data, dtype=np.uint8)
    while cur.pos < len(data):
        t, was_rounded = _tensor(cur, view, kind, version)
        if t.name in tensors:
            raise CamelidError(f"{path}: duplicate tensor {t.name!r}")
        tensors[t.name] = t
        if was_rounded:
            rounded.add(t.type)
    meta = _metadata(path, kind, version, ftype, (n_embd, n_head, n_layer), tokens, scores, tensors)
    note = "" if not rounded else (
        f"{path.name} is {kind} v{version}: its {'/'.join(sorted(rounded))} blocks' fp32 scales were rounded to "
        f"fp16, as llama.cpp's GGJT v3 stores them (each weight moves by at most 2^-11 of its block's scale)")
    return GGUFFile(path, 3, meta, tensors, data), note


def _vocab(cur: _Cursor, n: int, scores: bool) -> tuple[list[bytes], list[float]]:
    tokens, values = [], []
    for _ in range(n):
        size = cur.unpack("<I")
        if size >= 4096 or cur.pos + size > len(cur.data):
            cur.fail(f"vocabulary item of {size} bytes (truncated or corrupt file)")
        tokens.append(bytes(cur.data[cur.pos:cur.pos + size]))
        cur.pos += size
        values.append(cur.unpack("<f") if scores else 0.0)
    return tokens, values


def _tensor(cur: _Cursor, view: np.ndarray, kind: str, version: int) -> tuple[GGUFTensor, bool]:
    n_dims, name_len, type_id = (cur.unpack("<I") for _ in range(3))
    if not 1 <= n_dims <= 4 or name_len >= 4096:
        cur.fail(f"a tensor header with {n_dims} dimensions and a {name_len}-byte name (corrupt file)")
    dims = [cur.unpack("<I") for _ in range(n_dims)]
    raw_name = bytes(cur.data[cur.pos:cur.pos + name_len])
    cur.pos += name_len
    name = _gguf_name(raw_name.decode("utf-8", errors="replace"), cur)
    if kind == "GGJT":  # tensor data aligned to 32 bytes, for mmap
        cur.pos = -(-cur.pos // 32) * 32
    type_name, block, block_bytes = _legacy_type(type_id, kind, version, name, cur)
    if any(d <= 0 for d in dims) or dims[0] % block:
        cur.fail(f"tensor {name!r} has shape {dims}, not whole {type_name} blocks of {block}")
    rows = int(np.prod(dims[1:], dtype=np.int64)) if n_dims > 1 else 1
    row_bytes = dims[0] // block * block_bytes
    start = cur.pos
    if start + rows * row_bytes > len(view):
        cur.fail(f"tensor {name!r} runs past the end of the file (truncated)")
    cur.pos += rows * row_bytes
    raw = view[start:start + rows * row_bytes].reshape(rows, row_bytes)
    shuffled = (kind != "GGJT" or version == 1) and type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
    rescale = block_bytes == _PRE_V3_SCALES.get(type_name)
    if shuffled or rescale:
        raw = _today(raw, type_name, shuffled, rescale)
    return GGUFTensor(name, type_name, tuple(reversed(dims)), raw, start), rescale


def _gguf_name(name: str, cur: _Cursor) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if m is None or m.group(2) not in _LAYER:
        cur.fail(f"tensor {name!r} is not one of a LLaMA model's (camelid reads llama.cpp's LLaMA files)")
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight"


def _legacy_type(type_id: int, kind: str, version: int, name: str, cur: _Cursor) -> tuple[str, int, int]:
    if type_id in (4, 5):
        cur.fail(f"tensor {name!r} is Q4_{type_id - 2}, a format llama.cpp removed in May 2023")
    if type_id not in GGML_TYPES or type_id > 14 or type_id == 9:
        cur.fail(f"tensor {name!r} has ggml type {type_id}, which no {kind} file held")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    if type_id >= 10 and (kind, version) != ("GGJT", 3):
        cur.fail(f"tensor {name!r} is {type_name}, which only GGJT v3 files held")
    if type_name in _PRE_V3_SCALES and (kind != "GGJT" or version < 3):
        block_bytes = _PRE_V3_SCALES[type_name]
    return type_name, block, block_bytes


def _today(raw: np.ndarray, type_name: str, shuffled: bool, rescale: bool) -> np.ndarray:
    """Blocks of an older file in today's layout: fp32 scales as fp16, 4-bit pairs as elements j and j + 16."""
    rows, row_bytes = raw.shape
    blocks = raw.reshape(rows, -1, _PRE_V3_SCALES[type_name] if rescale else GGML_TYPES[_type_id(type_name)][2])
    n_scales = {"Q4_1": 2}.get(type_name, 1) if rescale else 0
    body = blocks[..., 4 * n_scales:].copy()
    if shuffled:
        qs = body[..., -16:]
        q = np.empty(qs.shape[:-1] + (32,), np.uint8)
        q[..., 0::2], q[..., 1::2] = qs & 0x0F, qs >> 4
        body[..., -16:] = q[..., :16] | (q[..., 16:] << 4)
    if rescale:
        scales = np.ascontiguousarray(blocks[..., :4 * n_scales]).view("<f4").astype("<f2").view(np.uint8)
        body = np.concatenate([scales, body], axis=-1)
    return np.ascontiguousarray(body).reshape(rows, -1)


def _type_id(type_name: str) -> int:
    return next(i for i, (n, _, _) in GGML_TYPES.items() if n == type_name)


def _token_type(i: int, text: bytes) -> tuple[bytes, int]:
    """A token's text and llama type as the converter writes them: <unk>, <s>, </s> first, bytes as <0xXX>,
    spaces as SentencePiece's U+2581."""
    if i <= 2:
        return (b"<unk>", 2) if i == 0 else (b"<s>", 3) if i == 1 else (b"</s>", 3)
    if not text:
        return text, 3
    if i <= 258 and len(text) == 1:
        return f"<0x{text[0]:02X}>".encode(), 6
    return text.replace(b" ", "\u2581".encode()), 1


def _metadata(path: Path, kind, version, ftype, sizes, tokens, scores, tensors) -> dict:
    n_embd, n_head, n_layer = sizes
    for needed in ("token_embd.weight", "blk.0.ffn_gate.weight", "blk.0.attn_k.weight"):
        if needed not in tensors:
            raise CamelidError(f"{path}: tensor {needed!r} is missing")
    head_dim = n_embd // n_head
    if len(tokens) < 3:
        raise CamelidError(f"{path}: a vocabulary of {len(tokens)} tokens (at least <unk>, <s>, </s>)")
    typed = [_token_type(i, t) for i, t in enumerate(tokens)]
    return {"general.architecture": "llama", "general.name": path.name,
            "general.description": f"converted from legacy {kind}v{version} {_FTYPES[ftype]} format",
            "general.file_type": ftype, "llama.context_length": CONTEXT_LENGTH, "llama.embedding_length": n_embd,
            "llama.block_count": n_layer, "llama.feed_forward_length": tensors["blk.0.ffn_gate.weight"].shape[0],
            "llama.rope.dimension_count": head_dim, "llama.attention.head_count": n_head,
            "llama.attention.head_count_kv": tensors["blk.0.attn_k.weight"].shape[0] // head_dim,
            "llama.attention.layer_norm_rms_epsilon": NORM_EPS, "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [t.decode("utf-8", errors="replace") for t, _ in typed],
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": [k for _, k in typed],
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}


def write_gguf(gf: GGUFFile, dest: Path):
    """The file as convert_llama_ggml_to_gguf.py writes it: the same metadata, the blocks as they are."""
    import gguf

    from camelid.files import atomic_file

    meta = gf.metadata
    with atomic_file(dest) as tmp:
        w = gguf.GGUFWriter(tmp, "llama", use_temp_file=False)
        w.add_name(meta["general.name"])
        w.add_description(meta["general.description"])
        w.add_file_type(meta["general.file_type"])
        w.add_context_length(meta["llama.context_length"])
        w.add_embedding_length(meta["llama.embedding_length"])
        w.add_block_count(meta["llama.block_count"])
        w.add_feed_forward_length(meta["llama.feed_forward_length"])
        w.add_rope_dimension_count(meta["llama.rope.dimension_count"])
        w.add_head_count(meta["llama.attention.head_count"])
        w.add_head_count_kv(meta["llama.attention.head_count_kv"])
        w.add_layer_norm_rms_eps(meta["llama.attention.layer_norm_rms_epsilon"])
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([t.encode() for t in meta["tokenizer.ggml.tokens"]])
        w.add_token_scores(meta["tokenizer.ggml.scores"])
        w.add_token_types(meta["tokenizer.ggml.token_type"])
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        for t in gf.tensors.values():  # gguf-py derives the shape from the bytes' shape
            w.add_tensor(t.name, t.data.reshape(*t.shape[:-1], -1),
                         raw_dtype=gguf.GGMLQuantizationType(_type_id(t.type)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
