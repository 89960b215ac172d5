"""Token shards: documents tokenized, separated by EOS, stored as memory-mapped uint16/uint32 files with an
index. Training windows (inputs and next-token targets) are cut on the fly; window i of a run depends only
on (seed, i), so a resumed run that knows its step sees exactly the data it would have seen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from camelid.errors import CamelidError
from camelid.files import atomic_file, write_text

INDEX = "index.json"


def write_shards(docs: Iterable[list[int]], folder: str | Path, eos_id: int, vocab_size: int,
                 shard_tokens: int = 1 << 26, tokenizer_id: str = "") -> dict:
    """Write token shards; returns the index, or None when there are no tokens (nothing is written).
    Each shard file is written whole, then renamed, and the index last."""
    folder = Path(folder)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    shards, buf, n_docs = [], [], 0

    def flush():
        if not buf:
            return
        folder.mkdir(parents=True, exist_ok=True)
        name = f"shard_{len(shards):05d}.bin"
        arr = np.concatenate(buf).astype(dtype)
        with atomic_file(folder / name) as tmp:
            arr.tofile(tmp)
        shards.append({"file": name, "tokens": int(arr.size)})
        buf.clear()

    size = 0
    for doc in docs:
        if not doc:
            continue
        buf.append(np.asarray(list(doc) + [eos_id], dtype=np.int64))
        size += len(doc) + 1
        n_docs += 1
        if size >= shard_tokens:
            flush()
            size = 0
    flush()
    if not shards:
        return None
    index = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "eos_id": eos_id, "documents": n_docs,
             "tokens": sum(s["tokens"] for s in shards), "tokenizer": tokenizer_id, "shards": shards}
    write_text(folder / INDEX, json.dumps(index, indent=2))
    return index


def file_digest(path: str | Path) -> str:
    """Names the tokenizer a set of shards was made with, so training can refuse a mismatched one."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class TokenShards:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / INDEX
        if not path.exists():
            raise CamelidError(f"{folder}: no {INDEX} (make shards with `camelid data tokenize`)")
        try:
            self.index = json.loads(path.read_text())
            self.arrays = [np.memmap(folder / s["file"], dtype=self.index["dtype"], mode="r")
                           for s in self.index["shards"]]
        except (json.JSONDecodeError, KeyError, OSError, ValueError) as exc:
            raise CamelidError(f"{path}: not a valid shard index ({exc})") from None
        sizes = np.array([len(a) for a in self.arrays], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self.folder = folder

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    def window(self, i: int, seq_len: int, seed: int) -> np.ndarray:
        """Window i: seq_len + 1 consecutive tokens from a shard chosen in proportion to its size."""
        rng = np.random.default_rng([seed, i])
        shard = self.arrays[rng.choice(len(self.arrays), p=self.weights)] if len(self.arrays) > 1 else self.arrays[0]
        if len(shard) <= seq_len + 1:
            raise CamelidError(f"{self.folder}: a shard has {len(shard)} tokens, fewer than seq_len + 1")
        start = int(rng.integers(0, len(shard) - seq_len - 1))
        return np.asarray(shard[start:start + seq_len + 1], dtype=np.int64)

    def batch(self, first: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.window(first + r, seq_len, seed) for r in range(batch_size)]))
        return rows[:, :-1], rows[:, 1:]
