"""Reading and writing tensor files: single or sharded safetensors (memory-mapped), and pickled
`pytorch_model.bin` read with `weights_only=True` so untrusted files cannot run code."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from camelid.errors import CamelidError
from camelid.files import atomic_file, read_json

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_DONTNEED = 4


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CamelidError(f"{path}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None


def release_pages(t: torch.Tensor) -> None:
    """Unmap the pages under a tensor memory-mapped from a file, once it has been converted and will not be read
    again: they would otherwise count in this process's memory until it exits. A loader that converts (to bf16,
    or quantizes) releases them tensor by tensor, so its peak is about the converted model. Only a file mapping
    nobody has written to is touched, so nothing is lost: a later read fetches the file's bytes again."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE  # only the pages the tensor covers whole
    if last > first and _unwritten_file_mapping(start, end):
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def _unwritten_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one mapping of a file with no private (written, copied-on-write) pages."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if not inside and "-" in line.split(maxsplit=1)[0]:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= start < hi:
                    if end > hi or len(fields) < 6 or not fields[5].startswith("/"):
                        return False
                    inside = True
            elif inside and line.startswith("Anonymous:"):
                return int(line.split()[1]) == 0
    return False


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


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
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CamelidError(f"{index}: not a valid shard index (needs a 'weight_map' of file names)")
            shards = sorted(set(weight_map.values()))
            if any(Path(shard).name != shard for shard in shards):  # a shard outside the folder is not ours to read
                raise CamelidError(f"{index}: shard names must be files in {folder}")
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
    # GPTQ tools name their one file after the quantization (gptq_model-4bit-128g.safetensors, llama-7b-4bit.pt)
    for pattern, loader in (("*.safetensors", load_safetensors), ("*.pt", load_pickle_weights)):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return loader(found[0])
        if len(found) > 1:
            raise CamelidError(f"{folder}: several {pattern} files and no shard index to say which make the model "
                               f"({', '.join(p.name for p in found[:3])})")
    raise CamelidError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    """Write atomically: a crash leaves the old file or none, never half a file."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
