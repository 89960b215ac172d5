"""llama2.c checkpoints: the legacy header (7 int32) and version 1 ("ak42", 256-byte header), fp32 weights."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from camelid.errors import CamelidError
from camelid.model.config import ModelConfig

V1_MAGIC = 0x616B3432


def read_llama2c(path: Path) -> tuple[ModelConfig, dict]:
    if path.stat().st_size < 28:  # numpy cannot map an empty file
        raise CamelidError(f"{path}: too short for a llama2.c checkpoint ({path.stat().st_size} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: torch wants writable memory
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == V1_MAGIC and len(data) < 256:
        raise CamelidError(f"{path}: a version 1 llama2.c checkpoint with a header of {len(data)} bytes (256 needed)")
    if magic == V1_MAGIC:
        version = struct.unpack_from("<i", data, 4)[0]
        if version != 1:
            raise CamelidError(f"{path}: llama2.c checkpoint version {version} is not supported (legacy, 1)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 8)
        shared = bool(data[36])
        offset = 256
    else:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 0)
        shared = vocab > 0
        vocab = abs(vocab)
        offset = 28
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
        raise CamelidError(f"{path}: not a llama2.c checkpoint (implausible header)")
    try:
        cfg = ModelConfig(arch="llama", dim=dim, ffn_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                          vocab_size=vocab, max_seq_len=seq_len, norm_eps=1e-5, tie_embeddings=shared)
    except CamelidError as exc:
        raise CamelidError(f"{path}: {exc}") from None
    floats = torch.from_numpy(np.frombuffer(data, dtype=np.float32, offset=offset,
                                            count=(len(data) - offset) // 4))
    reader = _Reader(floats, path)
    hd = dim // n_heads
    L = n_layers
    if magic == V1_MAGIC:
        att_norm, ffn_norm = reader.take(L, dim), reader.take(L, dim)
        final_norm, emb = reader.take(dim), reader.take(vocab, dim)
        wq, wk, wv = reader.take(L, n_heads * hd, dim), reader.take(L, n_kv * hd, dim), reader.take(L, n_kv * hd, dim)
        wo = reader.take(L, dim, n_heads * hd)
        w1, w2, w3 = reader.take(L, hidden, dim), reader.take(L, dim, hidden), reader.take(L, hidden, dim)
    else:
        emb, att_norm = reader.take(vocab, dim), reader.take(L, dim)
        wq, wk, wv = reader.take(L, n_heads * hd, dim), reader.take(L, n_kv * hd, dim), reader.take(L, n_kv * hd, dim)
        wo, ffn_norm = reader.take(L, dim, n_heads * hd), reader.take(L, dim)
        w1, w2, w3 = reader.take(L, hidden, dim), reader.take(L, dim, hidden), reader.take(L, hidden, dim)
        final_norm = reader.take(dim)
        reader.take(seq_len * hd)  # legacy files carry precomputed RoPE tables (real and imaginary parts)
    wcls = None if shared else reader.take(vocab, dim)
    sd = {"tok_embeddings.weight": emb, "norm.weight": final_norm}
    if wcls is not None:
        sd["output.weight"] = wcls
    for i in range(L):
        # llama2.c rotates interleaved pairs (Meta layout); ours rotates halves, so permute q and k rows.
        q, k = to_half_rotary(wq[i], n_heads), to_half_rotary(wk[i], n_kv)
        sd[f"layers.{i}.attn_norm.weight"] = att_norm[i]
        sd[f"layers.{i}.mlp_norm.weight"] = ffn_norm[i]
        sd[f"layers.{i}.attn.wqkv.weight"] = torch.cat((q, k, wv[i]))
        sd[f"layers.{i}.attn.wo.weight"] = wo[i]
        sd[f"layers.{i}.mlp.w_in.weight"] = torch.cat((w1[i], w3[i]))
        sd[f"layers.{i}.mlp.w_out.weight"] = w2[i]
    return cfg, sd


def to_half_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class _Reader:
    def __init__(self, floats: torch.Tensor, path: Path):
        self.floats, self.pos, self.path = floats, 0, path

    def take(self, *shape) -> torch.Tensor:
        n = int(np.prod(shape))
        if self.pos + n > len(self.floats):
            raise CamelidError(f"{self.path}: truncated llama2.c checkpoint (weights end early)")
        t = self.floats[self.pos:self.pos + n].view(*shape)
        self.pos += n
        return t


def find_llama2c_tokenizer(model_path: Path, vocab_size: int) -> Path:
    for name in ("tokenizer.bin", f"tok{vocab_size}.bin"):
        if (model_path.parent / name).exists():
            return model_path.parent / name
    raise CamelidError(f"{model_path}: no tokenizer.bin or tok{vocab_size}.bin beside it (pass --tokenizer)")
