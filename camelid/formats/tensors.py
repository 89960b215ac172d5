"""Reading and writing tensor files: single or sharded safetensors (memory-mapped), and pickled
`pytorch_model.bin` read with `weights_only=True` so untrusted files cannot run code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from camelid.errors import CamelidError


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CamelidError(f"{path}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        try:  # old (non-zip) serialization cannot be memory-mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CamelidError(f"{path}: cannot be read as PyTorch weights ({str(exc).splitlines()[0]})") from None
    except Exception as exc:
        raise CamelidError(f"{path}: cannot be read as PyTorch weights ({str(exc).splitlines()[0]})") from None


def load_tensor_files(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, preferring safetensors; shards follow their index file."""
    for index_name, loader in (("model.safetensors.index.json", load_safetensors),
                               ("pytorch_model.bin.index.json", load_pickle_weights)):
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise CamelidError(f"{index}: not a valid shard index (needs a 'weight_map')") from None
            out = {}
            for shard in tqdm(shards, desc=f"loading {folder.name}", unit="shard", disable=len(shards) < 4):
                if not (folder / shard).exists():
                    raise CamelidError(f"{index}: shard {shard} is missing")
                out.update(loader(folder / shard))
            return out
    if (folder / "model.safetensors").exists():
        return load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return load_pickle_weights(folder / "pytorch_model.bin")
    raise CamelidError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    """Write atomically: a crash leaves the old file or none, never half a file."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
