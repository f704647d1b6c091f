"""Errors that the CLI turns into one-line messages and exit codes."""


class InputError(Exception):
    """Bad usage or unreadable/unsupported input: exit code 2, no traceback.

    The message must name the file, tensor or field at fault.
    """


class CheckFailed(Exception):
    """A requested check did not hold (e.g. error above --max-error): exit code 1."""


def printable(text) -> str:
    """``text`` with control characters (terminal escape codes, newlines) shown as escapes,
    so that a message stays one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
