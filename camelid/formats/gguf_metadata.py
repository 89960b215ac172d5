"""GGUF metadata as a plain dict (the tensors are read by the GGUF model loader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from camelid.errors import CamelidError


def open_gguf(path: str | Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise CamelidError(f"{path}: not a readable GGUF file ({exc})") from None


def read_gguf_metadata(reader) -> dict:
    from gguf import GGUFValueType

    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == GGUFValueType.ARRAY and len(field.types) > 1 and field.data:
            # gguf's contents() converts element by element; a 150K-token vocabulary takes seconds that way.
            parts = [field.parts[i] for i in field.data]
            if field.types[1] == GGUFValueType.STRING:
                meta[key] = [bytes(p).decode("utf-8", errors="replace") for p in parts]
            elif field.types[1] != GGUFValueType.ARRAY:
                meta[key] = np.concatenate(parts).tolist()
            else:
                meta[key] = field.contents()
        else:
            meta[key] = field.contents()
    return meta
