"""Reading and writing the user's files safely: every output appears whole or not at all, a folder that is
not camelid's own is never replaced, and unreadable input is a one-line error naming the file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from camelid.errors import CamelidError

# Written into every folder camelid produces, so that a later run can tell its own output (which it may
# replace when told to) from a user's folder (which it never touches).
MARKER = ".camelid-output"
# Folders written before the marker existed are recognised by these files, all of one group together.
_OLDER_SIGNS = [("camelid.json",), ("report.json", "train.jsonl"), ("train/index.json",),
                ("log.jsonl", "checkpoints"), ("study.db", "best.yaml")]
TMP_SUFFIX = ".tmp-camelid"
# Read once: os.umask can only be read by setting it, which would race with other threads creating files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _honour_umask(path: Path):
    """Some writers (safetensors, mkstemp) create files 0600; outputs get the mode the user's umask gives."""
    os.chmod(path, 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename, on failure it is
    removed, so a crash or a full disk leaves the old file or none, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        _honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | Path, text: str):
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def is_camelid_output(folder: Path) -> bool:
    return (folder / MARKER).exists() or any(all((folder / n).exists() for n in sign) for sign in _OLDER_SIGNS)


def check_output_folder(dest: str | Path, force: bool = False, flag: str = "--force"):
    """Refuses a destination that would lose someone's files: a regular file, a folder camelid did not
    write, or (without `force`) a previous camelid output. An empty folder is fine."""
    shown = str(dest)
    dest = Path(os.path.abspath(dest))
    if dest.exists() and not dest.is_dir():
        raise CamelidError(f"{shown}: exists and is not a folder; choose a folder path")
    if not dest.exists() or not any(dest.iterdir()):
        return
    if not is_camelid_output(dest):
        raise CamelidError(f"{shown}: exists and is not a camelid output; choose another folder "
                           f"(camelid never replaces a folder it did not write)")
    if not force:
        raise CamelidError(f"{shown}: holds an earlier camelid output; pass {flag} to replace it")


def claim_folder(folder: str | Path, create: bool = True):
    """A folder camelid adds to over several runs (a training run, a sweep, GGUF exports of one model): one
    it did not write is refused; it is created and marked as camelid's."""
    check_output_folder(folder, force=True)
    if create:
        Path(folder).mkdir(parents=True, exist_ok=True)
        mark_output_folder(Path(folder))


@contextlib.contextmanager
def output_folder(dest: str | Path, force: bool = False, flag: str = "--force") -> Iterator[Path]:
    """Yields a temporary folder beside `dest` to write into. On success it takes `dest`'s place whole (an
    earlier camelid output there is replaced only with `force`); on any failure it is removed."""
    check_output_folder(dest, force, flag)
    final = Path(os.path.abspath(dest))
    tmp = final.with_name(final.name + TMP_SUFFIX)
    remove_leftover(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        mark_output_folder(tmp)
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mark_output_folder(folder: Path):
    (folder / MARKER).write_text("written by camelid; a later `--force` may replace this folder\n")


def remove_leftover(path: Path):
    """A temporary file or folder a killed run left behind (its name says it is camelid's)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace_folder(tmp: Path, final: Path):
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old" + TMP_SUFFIX)
    remove_leftover(old)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def read_text(path: str | Path) -> str:
    """A text file's contents; bytes that are not UTF-8 are an error naming the file and the offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CamelidError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def parse_json(text: str, path: str | Path, line: int = 1):
    """JSON from `text`, which starts at `line` of `path`; an error names the file and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CamelidError(f"{path}:{line + exc.lineno - 1}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise CamelidError(f"{path}:{line}: JSON nested too deeply") from None


def read_json(path: str | Path, kind: type = dict):
    """A JSON file whose top level must be `kind` (an object by default)."""
    value = parse_json(read_text(path), path)
    if not isinstance(value, kind):
        want = {dict: "an object", list: "an array"}.get(kind, kind.__name__)
        raise CamelidError(f"{path}: the JSON must be {want}, not {type(value).__name__}")
    return value


def check_writable(path: str | Path):
    """Fails now, before hours of work, if a file could not be written at `path` later: a file is created
    and removed in the nearest folder that exists (root may write where `os.access` says yes and still fail)."""
    parent = Path(os.path.abspath(path))
    while not parent.is_dir():
        parent = parent.parent
    probe = parent / f".camelid-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CamelidError(f"{path}: cannot be written ({exc.strerror or exc})") from None
