"""The GGUF container: the key/value header and the tensor index, over a read-only memory map.

Read directly rather than with gguf-py's GGUFReader: that builds a Python object per array element (seconds
for a 150K-token vocabulary) and trusts the file. Here every count, length and offset is checked against the
file's size before it is used, so a truncated or corrupt file is a one-line error, never a read outside it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camelid.errors import CamelidError

# GGUF value types -> (struct format, numpy dtype)
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 8

# ggml tensor types a file may hold (those gguf's numpy code decodes): id -> (name, elements per block, bytes per
# block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
              12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 16: ("IQ2_XXS", 256, 66),
              17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18),
              21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1),
              25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
              30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17)}
GGML_TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}


@dataclass
class GGUFTensor:
    name: str
    type: str  # ggml type name: "F16", "Q4_K", ...
    shape: tuple[int, ...]  # PyTorch order: the last dimension is a row (GGUF's ne[0])
    data: np.ndarray  # the raw bytes, (rows, bytes per row), a view of the memory map
    offset: int  # absolute position of the data in the file


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, GGUFTensor]
    _map: mmap.mmap | None = None

    def release(self, tensor: GGUFTensor) -> None:
        """Drop a tensor's pages from this process's resident memory once it has been converted (they stay in
        the page cache); without this a quantized file is resident twice while it loads."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        page = mmap.PAGESIZE
        start = -(-tensor.offset // page) * page
        end = (tensor.offset + tensor.data.nbytes) // page * page
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        _trim_heap()


def _trim_heap():
    """Give the conversion's freed scratch memory back to the system now: glibc otherwise keeps large freed
    blocks in its heap, and a 1B-parameter file would peak at half its size again in garbage."""
    if _LIBC:
        _LIBC[0].malloc_trim(0)


def _libc():
    try:
        import ctypes

        return [ctypes.CDLL("libc.so.6")]
    except OSError:  # not glibc: nothing to trim
        return []


_LIBC = _libc()


class _Cursor:
    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str):
        raise CamelidError(f"{self.path}: {what} (at byte {self.pos})")

    def unpack(self, fmt):
        try:
            values = struct.unpack_from(fmt, self.data, self.pos)
        except struct.error:
            self.fail("truncated GGUF file")
        self.pos += struct.calcsize(fmt)
        return values[0]

    def count(self, min_item_bytes: int, what: str) -> int:
        n = self.unpack("<Q")
        if n * min_item_bytes > len(self.data) - self.pos:
            self.fail(f"truncated or corrupt GGUF file: {what} count {n} runs past its end")
        return n

    def string(self) -> str:
        n = self.count(1, "string length")
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                self.fail("arrays nested too deeply")
            item_type = self.unpack("<I")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                n = self.count(dtype.itemsize, "array")
                arr = np.frombuffer(self.data, dtype=dtype, count=n, offset=self.pos)
                self.pos += n * dtype.itemsize
                return arr.tolist()
            if item_type not in (_STRING, _ARRAY):
                self.fail(f"unknown GGUF value type {item_type}")
            return [self.value(item_type, depth + 1) for _ in range(self.count(8, "array"))]
        self.fail(f"unknown GGUF value type {vtype}")


def _open_map(path: Path):
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise CamelidError(f"{path}: cannot be read ({exc})") from None


def _header(cur: _Cursor, path: Path) -> tuple[int, int, dict]:
    if bytes(cur.data[:4]) != b"GGUF":
        raise CamelidError(f"{path}: not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise CamelidError(f"{path}: GGUF version {version} is not supported (2, 3)")
    n_tensors = cur.count(24, "tensor")
    meta = {}
    for _ in range(cur.count(13, "metadata key")):
        key = cur.string()
        if key in meta:
            cur.fail(f"duplicate metadata key {key!r}")
        meta[key] = cur.value(cur.unpack("<I"))
    return version, n_tensors, meta


def read_gguf_metadata(path: str | Path) -> dict:
    path = Path(path)
    data = _open_map(path)
    return _header(_Cursor(data, path), path)[2]


def read_gguf(path: str | Path) -> GGUFFile:
    """The header and a zero-copy view of every tensor, each checked to lie inside the file."""
    path = Path(path)
    data = _open_map(path)
    cur = _Cursor(data, path)
    version, n_tensors, meta = _header(cur, path)
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise CamelidError(f"{path}: general.alignment={align!r} is not a power of two")
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= 4:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to 4)")
        ne = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
    start = -(-cur.pos // align) * align
    view = np.frombuffer(data, dtype=np.uint8)
    tensors = {}
    for name, ne, type_id, offset in infos:
        if name in tensors:
            raise CamelidError(f"{path}: duplicate tensor {name!r}")
        tensors[name] = _tensor(path, view, name, ne, type_id, offset, start, align)
    return GGUFFile(path, version, meta, tensors, data)


def _tensor(path, view, name, ne, type_id, offset, start, align) -> GGUFTensor:
    if type_id not in GGML_TYPES:
        raise CamelidError(f"{path}: tensor {name!r} has ggml type {type_id}, which camelid does not read "
                           f"({', '.join(t[0] for t in GGML_TYPES.values())})")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    if any(n <= 0 for n in ne) or ne[0] % block:
        raise CamelidError(f"{path}: tensor {name!r} has shape {ne}, not whole {type_name} blocks of {block}")
    if offset % align:
        raise CamelidError(f"{path}: tensor {name!r} is not aligned to {align} bytes")
    row_bytes = ne[0] // block * block_bytes
    rows = int(np.prod(ne[1:], dtype=object)) if len(ne) > 1 else 1
    begin = start + offset
    if begin + rows * row_bytes > len(view):
        raise CamelidError(f"{path}: tensor {name!r} points outside the file (truncated or corrupt)")
    data = view[begin:begin + rows * row_bytes].reshape(rows, row_bytes)
    return GGUFTensor(name, type_name, tuple(reversed(ne)), data, begin)
