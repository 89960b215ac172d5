"""GGUF metadata as a plain dict (the tensors are read by the GGUF model loader)."""

from __future__ import annotations

from pathlib import Path

from camelid.errors import CamelidError


def open_gguf(path: str | Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise CamelidError(f"{path}: not a readable GGUF file ({exc})") from None


def read_gguf_metadata(reader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
