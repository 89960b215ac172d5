"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class CamelidError(Exception):
    """A problem with the user's input (a path, a file, a key, a parameter), said in one line."""
