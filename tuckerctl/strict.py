"""Strict reading of untrusted inputs (no torch): standard JSON only, regular files only.

Configs, shard indexes, safetensors headers, compressed-checkpoint metadata and analysis
JSON all come from files a user may not control; these helpers turn every way they can
be malformed into a one-line :class:`~tuckerctl.errors.InputError`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import InputError


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InputError(f"duplicate key {dup!r}")
    return dict(pairs)


def _no_constant(name):
    raise InputError(f"non-standard JSON constant {name}")


def loads_strict(text, what: str, constants: bool = False):
    """Parse JSON as the standard defines it: no NaN/Infinity (unless ``constants``: the
    caller validates every number and names the field), no duplicate keys; errors (also
    nesting too deep) are one-line InputErrors starting with ``what``."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=None if constants else _no_constant)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{what}: not valid JSON") from None
    except RecursionError:
        raise InputError(f"{what}: JSON nested too deeply") from None


def read_json(path: Path, expected: str = "JSON", constants: bool = False):
    """Read and parse the JSON file ``path`` strictly (:func:`loads_strict`); every failure is
    a one-line InputError naming the file (and the line and column of a syntax error)."""
    try:
        text = regular_file(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file (expected {expected})") from None
    try:
        json.loads(text)  # for the position of a syntax error
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        pass  # reported by loads_strict
    return loads_strict(text, str(path), constants=constants)


def regular_file(path: Path) -> Path:
    """``path`` if it is a regular file (after symlinks); a FIFO, device or socket would
    block or stream forever, so it is an InputError before anything opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "directory" if stat.S_ISDIR(mode) else "FIFO, device or socket"
        raise InputError(f"{path}: is a {kind}, not a regular file")
    return path
