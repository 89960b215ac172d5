"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class CamelidError(Exception):
    """A problem with the user's input (a path, a file, a key, a parameter), said in one line."""


def require(*modules: str, extra: str):
    """Optional dependencies: a missing one is a one-line error saying what to install."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CamelidError(f"this needs {', '.join(missing)}: pip install 'camelid[{extra}]'")
