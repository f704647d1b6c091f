"""Errors that the CLI turns into one-line messages and exit codes."""

from collections.abc import Callable

# An argument named in a message is wrapped in private-use code points (never in real text),
# so that it can be spelled for whoever reads the message: the library's caller sees the
# keyword argument, the CLI's user the option.
_OPEN, _SEP, _CLOSE = "\ue000", "\ue001", "\ue002"
_NO_VALUE = object()


def arg(name: str, value=_NO_VALUE) -> str:
    """The keyword argument ``name`` (with ``value``: that setting of it) inside an
    :class:`InputError` message. ``str(error)`` shows it as ``name`` / ``name='svd'``;
    the CLI shows it as its option, ``--name`` / ``--name svd`` (a flag: ``--name``)."""
    if value is _NO_VALUE:
        return f"{_OPEN}{name}{_SEP}{_SEP}{_CLOSE}"
    return f"{_OPEN}{name}{_SEP}{'' if value is True else value}{_SEP}={value!r}{_CLOSE}"


def _spell(message: str, name_as: Callable[[str, str, str], str]) -> str:
    out, rest = [], message
    while _OPEN in rest:
        before, _, rest = rest.partition(_OPEN)
        inner, _, rest = rest.partition(_CLOSE)
        name, option_value, python_value = inner.split(_SEP)
        out += [before, name_as(name, option_value, python_value)]
    return "".join(out) + rest


class InputError(Exception):
    """Bad usage or unreadable/unsupported input: exit code 2, no traceback.

    The message must name the file, tensor or field at fault; arguments are named with
    :func:`arg`, so that it reads right both from the library and from the CLI.
    """

    def __str__(self) -> str:
        return _spell(super().__str__(), lambda name, _, value: name + value)

    def for_options(self, option: Callable[[str], str]) -> str:
        """The message with each argument spelled as the option ``option(name)``."""
        return _spell(super().__str__(), lambda name, value, _: f"{option(name)} {value}".rstrip())


class CheckFailed(Exception):
    """A requested check did not hold (e.g. error above --max-error): exit code 1."""


def printable(text) -> str:
    """``text`` with control characters (terminal escape codes, newlines) shown as escapes,
    so that a message stays one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
