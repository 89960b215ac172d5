"""EasyLM's streaming checkpoints, the format Berkeley published Koala's weight diff in: a msgpack stream of
(key path, array) pairs, one per tensor, each array serialized as flax.serialization writes one (a msgpack
extension holding its shape, dtype name and bytes). EasyLM's LLaMA keeps Meta's rotary row order and stores
every kernel as (in, out).

The file is indexed once (where each tensor's bytes lie) and a tensor is read when it is taken, under
Hugging Face's LLaMA names with transformers' q/k row order, as formats/meta.py gives Meta's own checkpoints."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from camelid.errors import CamelidError
from camelid.formats.meta import to_halves
from camelid.model.config import ModelConfig

_NDARRAY = 1  # flax's msgpack extension code for an array
_LAYER = {("attention", "wq"): "self_attn.q_proj.weight", ("attention", "wk"): "self_attn.k_proj.weight",
          ("attention", "wv"): "self_attn.v_proj.weight", ("attention", "wo"): "self_attn.o_proj.weight",
          ("feed_forward", "w1"): "mlp.gate_proj.weight", ("feed_forward", "w3"): "mlp.up_proj.weight",
          ("feed_forward", "w2"): "mlp.down_proj.weight", ("attention_norm",): "input_layernorm.weight",
          ("ffn_norm",): "post_attention_layernorm.weight"}
_TOP = {("transformer", "wte", "embedding"): "model.embed_tokens.weight",
        ("transformer", "ln_f", "kernel"): "model.norm.weight", ("lm_head", "kernel"): "lm_head.weight"}


def is_easylm_file(path: Path) -> bool:
    """A msgpack stream whose first entry is (a list of strings, bytes): EasyLM's."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and head[0] == 0x92 and 0x90 <= head[1] <= 0x9f  # [ [keys...], ...


def hf_name(key: tuple[str, ...]) -> str | None:
    if key in _TOP:
        return _TOP[key]
    if len(key) >= 5 and key[:2] == ("transformer", "h") and key[2].isdigit() and key[-1] in ("kernel",):
        name = _LAYER.get(key[3:-1])
        return None if name is None else f"model.layers.{int(key[2])}.{name}"
    return None


class EasyLMTensors(Mapping):
    """The file's tensors under Hugging Face's names (`cfg`: the LLaMA they belong to, for q/k's heads)."""

    def __init__(self, path: Path, cfg: ModelConfig):
        import msgpack

        self.path, self.cfg, self.where = path, cfg, {}
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=0, read_size=1 << 20)
            start = 0
            try:
                for entry in unpacker:
                    end = unpacker.tell()
                    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], bytes)
                            and isinstance(entry[0], (list, tuple)) and all(isinstance(k, str) for k in entry[0])):
                        raise CamelidError(f"{path}: at byte {start}: not an EasyLM entry (a key path and a tensor)")
                    key = tuple(entry[0])
                    name = hf_name(key)
                    if name is None:
                        raise CamelidError(f"{path}: tensor {'/'.join(key)!r} is not one of EasyLM's LLaMA tensors")
                    self.where[name] = (start, end, key)
                    start = end
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
                raise CamelidError(f"{path}: at byte {start}: not a msgpack stream ({exc})") from None
        if start != path.stat().st_size:
            raise CamelidError(f"{path}: truncated after byte {start} (the last tensor is incomplete)")

    def __getitem__(self, name: str) -> torch.Tensor:
        import msgpack

        start, end, key = self.where[name]
        with open(self.path, "rb") as f:
            f.seek(start)
            _, value = msgpack.unpackb(f.read(end - start), raw=False)
        t = _array(msgpack.unpackb(value, raw=False, ext_hook=_ext), self.path, key)
        if key[-1] == "kernel" and t.dim() == 2:
            t = t.t().contiguous()  # flax's (in, out) -> torch's (out, in)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.cfg.n_heads if name.endswith("q_proj.weight") else self.cfg.n_kv_heads
            if t.shape[0] % (2 * heads):
                raise CamelidError(f"{self.path}: {'/'.join(key)} has {t.shape[0]} rows, not pairs for {heads} heads")
            t = to_halves(t, heads)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _ext(code: int, data: bytes):
    import msgpack

    if code != _NDARRAY:
        raise CamelidError(f"msgpack extension {code} is not an array")
    return msgpack.unpackb(data, raw=False)


def _array(value, path: Path, key: tuple) -> torch.Tensor:
    where = f"{path}: {'/'.join(key)}"
    if not (isinstance(value, (list, tuple)) and len(value) == 3):
        raise CamelidError(f"{where}: not a serialized array")
    shape, dtype, data = value
    if dtype == "bfloat16":
        t = torch.frombuffer(bytearray(data), dtype=torch.bfloat16)
    else:
        try:
            t = torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype)).copy())
        except TypeError:
            raise CamelidError(f"{where}: dtype {dtype!r} is not an array type camelid reads") from None
    if t.numel() != int(np.prod(shape)):
        raise CamelidError(f"{where}: {t.numel()} values for shape {tuple(shape)}")
    return t.reshape(tuple(shape))
