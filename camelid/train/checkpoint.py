"""A training run's folder: its checkpoints (written whole or not at all, the newest intact one found on
resume), its step log, and the leftovers a killed run leaves behind. Pretraining and fine-tuning share it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from camelid.errors import CamelidError
from camelid.files import atomic_file, claim_folder, write_text

CKPT_DIR = "checkpoints"
LOG = "log.jsonl"


def prepare_run_folder(out: Path, main: bool = True):
    """A run writes into a folder of its own: a folder camelid did not write is refused, never mixed into.
    Every rank checks; the main one creates it and clears what a killed run left."""
    claim_folder(out, create=main)
    if not main:
        return
    for leftover in (out / CKPT_DIR).glob("*.tmp"):  # a checkpoint a killed run was writing
        leftover.unlink()


def list_checkpoints(out: Path) -> list[Path]:
    return sorted((out / CKPT_DIR).glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def write_checkpoint(out: Path, step: int, state: dict, keep_last: int) -> Path:
    folder = out / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    with atomic_file(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a full disk as "unexpected pos"
            if shutil.disk_usage(folder).free < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise CamelidError(f"{path}: cannot be written ({str(exc).splitlines()[0]})") from None
    for old in list_checkpoints(out)[:-keep_last]:
        old.unlink()
    return path


def read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CamelidError(f"{path}: no such checkpoint") from None
    except Exception as exc:
        raise CamelidError(f"{path}: cannot be read as a camelid checkpoint ({str(exc).splitlines()[0]})") from None


def checkpoint_to_resume(resume: str, out: Path, check: Callable[[Path, dict], None]) -> tuple[Path, dict] | None:
    """The checkpoint `resume` names, or with "auto" the newest one that reads and passes `check`: a
    corrupt newest one (a disk error, a copy cut short) falls back to the one before, with a warning.
    None when "auto" finds none (a fresh start)."""
    if resume != "auto":
        state = read_checkpoint(Path(resume))
        check(Path(resume), state)
        return Path(resume), state
    failures = []
    for path in reversed(list_checkpoints(out)):
        try:
            state = read_checkpoint(path)
            check(path, state)
            return path, state
        except CamelidError as exc:
            failures.append(exc)
            print(f"camelid: warning: {exc}; trying the checkpoint before it", file=sys.stderr)
    if failures:
        raise CamelidError(f"no intact checkpoint in {out / CKPT_DIR} ({failures[-1]})")
    return None


def truncate_log(path: Path, step: int):
    """Keeps the log's records up to `step`: the steps after it are redone (none, for a fresh start)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if line and json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
    write_text(path, "".join(line + "\n" for line in keep))
