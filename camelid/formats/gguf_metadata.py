"""GGUF metadata (the key/value header) as a plain dict.

Read directly: gguf-py's reader builds a Python object per array element, which takes seconds for a
150K-token vocabulary; here numeric arrays are one numpy view and strings a tight loop.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from camelid.errors import CamelidError

# GGUF value types -> (struct format, numpy dtype)
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 0, path

    def unpack(self, fmt):
        try:
            values = struct.unpack_from(fmt, self.data, self.pos)
        except struct.error:
            raise CamelidError(f"{self.path}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return values[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = bytes(self.data[self.pos:self.pos + n])
        if len(raw) != n:
            raise CamelidError(f"{self.path}: truncated GGUF header")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                end = self.pos + count * dtype.itemsize
                if end > len(self.data):
                    raise CamelidError(f"{self.path}: truncated GGUF header")
                arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
                self.pos = end
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise CamelidError(f"{self.path}: unknown GGUF value type {vtype}")


def read_gguf_metadata(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise CamelidError(f"{path}: cannot be read ({exc})") from None
    if bytes(data[:4]) != b"GGUF":
        raise CamelidError(f"{path}: not a GGUF file (no GGUF magic)")
    cur = _Cursor(data, path)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise CamelidError(f"{path}: GGUF version {version} is not supported (2, 3)")
    cur.unpack("<Q")  # tensor count
    return {cur.string(): cur.value(cur.unpack("<I")) for _ in range(cur.unpack("<Q"))}
