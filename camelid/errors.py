"""The exceptions the CLI and the server turn into a one-line message (and a 4xx/5xx) instead of a traceback."""

from __future__ import annotations

import errno


class CamelidError(Exception):
    """A problem with the user's input (a path, a file, a key, a parameter), said in one line."""


class ModelError(CamelidError):
    """The model itself produced something unusable (NaN logits): a fault of the model, not of the request."""


class Preempted(Exception):
    """A signal stopped a training run after it checkpointed; `--resume auto` continues it."""

    EXIT_CODE = 75  # EX_TEMPFAIL: job runners retry it; 0 would read as a finished run


def os_error_message(exc: OSError) -> str:
    """One line for an OS error, naming the path: a full disk says so in words."""
    path = exc.filename if exc.filename is not None else ""
    where = f"{path}: " if path else ""
    if exc.errno == errno.ENOSPC:
        return f"{where}no space left on device"
    return f"{where}{exc.strerror or exc}"


def require(*modules: str, extra: str):
    """Optional dependencies: a missing one is a one-line error saying what to install."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CamelidError(f"this needs {', '.join(missing)}: pip install 'camelid[{extra}]'")
