"""Delta weights: a fine-tuned model published as its difference from a base (Vicuna v0 and v1.1, LMSYS's way
round LLaMA's license; Koala, Berkeley's), applied to the base to give the model, tensor by tensor.

- A Hugging Face folder (Vicuna's): the sum is FastChat's `apply_delta`, both in the delta's dtype (fp16 as
  published). A delta whose embedding and output rows outnumber the base's (Vicuna v0 added a pad token) gets
  its extra rows as they are, the base taken as zero there, as FastChat's v0 script resized the base. The
  result takes the delta's config and tokenizer.
- An EasyLM streaming checkpoint (Koala's diff, formats/easylm.py): the sum is EasyLM's `diff_checkpoint
  --recover_diff`, in fp32, stored as bf16 (its default float_dtype). The result takes the base's config and
  tokenizer.

Both sides are read tensor by tensor and the result is written shard by shard, so memory stays about one shard;
it goes into a temporary folder that takes OUT's place only when every tensor is written. The output is a
Hugging Face folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from camelid.errors import CamelidError
from camelid.files import output_folder
from camelid.formats import easylm, meta
from camelid.formats.tensors import load_tensor_files, release_pages, save_safetensors

SHARD_BYTES = 2 << 30
_IGNORED = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved, recomputed by every loader
_WEIGHTS = (".bin", ".safetensors", ".pth", ".pt", ".msgpack", ".h5", ".index.json")
_VOCAB = ("embed_tokens.weight", "lm_head.weight")


def _tensors(path: Path, role: str, base: Path | None = None) -> Mapping[str, torch.Tensor]:
    """The base's tensors (a Hugging Face folder or Meta's) or the delta's (a Hugging Face folder, or an EasyLM
    file for the LLaMA `base` is), by name."""
    if role == "base" and meta.is_meta_folder(path):
        return meta.MetaTensors(path, meta.open_params(path)[0])
    if role == "delta" and easylm.is_easylm_file(path):
        from camelid.formats.load import read_config

        return easylm.EasyLMTensors(path, read_config(base))
    if path.is_dir() and (path / "config.json").exists():
        return load_tensor_files(path)
    raise CamelidError(f"{path}: the {role} must be a Hugging Face folder" +
                       (" or Meta's params.json + consolidated.*.pth" if role == "base" else
                        " or an EasyLM streaming checkpoint (Koala's diff)"))


def apply_delta(base: str | Path, delta: str | Path, out: str | Path, force: bool = False,
                shard_bytes: int = SHARD_BYTES) -> int:
    """Write base + delta to `out`; returns the number of tensors."""
    base, delta = Path(base), Path(delta)
    for p in (base, delta):
        if not p.exists():
            raise CamelidError(f"{p}: no such file or directory")
    b, d = _tensors(base, "base"), _tensors(delta, "delta", base)
    koala = isinstance(d, easylm.EasyLMTensors)
    names = [n for n in d if not n.endswith(_IGNORED)]
    missing = [n for n in names if n not in b]
    extra = [n for n in b if not n.endswith(_IGNORED) and n not in d]
    if missing or extra:
        name, where = ((missing[0], f"not in the base {base}") if missing
                       else (extra[0], f"in the base but not in {delta}"))
        raise CamelidError(f"{delta}: tensor {name} is {where}: this delta is not for this base")
    shards, size = [[]], 0
    for n in names:
        nbytes = d[n].numel() * d[n].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    weight_map, total = {}, 0
    with output_folder(out, force) as tmp, tqdm(total=len(names), desc="applying the delta", unit="tensor") as bar:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            written = {}
            for n in shard:
                base_t, delta_t = b[n], d[n]
                written[n] = _easylm_sum(base_t, delta_t, n, base, delta) if koala else \
                    _sum(base_t, delta_t, n, base, delta)
                release_pages(base_t)
                release_pages(delta_t)
                weight_map[n] = file
                total += written[n].numel() * written[n].element_size()
                bar.update()
            save_safetensors(written, tmp / file, metadata={"format": "pt"})
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if koala:
            _describe_from_base(base, tmp)
        else:
            for f in delta.iterdir():  # its config and tokenizer describe the result
                if f.is_file() and not f.name.endswith(_WEIGHTS):
                    shutil.copy(f, tmp / f.name)
    return len(names)


def _describe_from_base(base: Path, tmp: Path):
    """An EasyLM diff holds weights only: the base's config and tokenizer describe the result."""
    if meta.is_meta_folder(base):
        from camelid.formats.hf import config_to_hf

        cfg, _ = meta.open_params(base)
        (tmp / "config.json").write_text(json.dumps({**config_to_hf(cfg), "torch_dtype": "bfloat16"}, indent=2))
        shutil.copy(meta.find_tokenizer(base), tmp / "tokenizer.model")
        return
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHTS):
            shutil.copy(f, tmp / f.name)
    config = json.loads((tmp / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2))


def _easylm_sum(base_t: torch.Tensor, delta_t: torch.Tensor, name: str, base: Path, delta: Path) -> torch.Tensor:
    if base_t.shape != delta_t.shape:
        raise CamelidError(f"{delta}: {name} has shape {tuple(delta_t.shape)}, the base {base}'s "
                           f"{tuple(base_t.shape)}: this diff is not for this base")
    return (base_t.float() + delta_t.float()).to(torch.bfloat16)


def _sum(base_t: torch.Tensor, delta_t: torch.Tensor, name: str, base: Path, delta: Path) -> torch.Tensor:
    if base_t.shape != delta_t.shape:
        grown = (name.endswith(_VOCAB) and base_t.dim() == 2 and delta_t.shape[1:] == base_t.shape[1:]
                 and delta_t.shape[0] > base_t.shape[0])
        if not grown:
            raise CamelidError(f"{delta}: {name} has shape {tuple(delta_t.shape)}, the base {base}'s "
                               f"{tuple(base_t.shape)}: this delta is not for this base")
    out = delta_t.clone()
    out[:base_t.shape[0]] += base_t.to(out.dtype)  # rows the base lacks (tokens the delta added) stay the delta's
    return out
