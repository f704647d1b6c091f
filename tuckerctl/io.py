"""Atomic single-file writes (kept for callers of the old API; see :mod:`tuckerctl.outputs`,
which also decides whether a path may be written at all)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .outputs import Kind, Target


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp path beside ``path``, fsync, and rename it over.

    Replaces ``path`` unconditionally: callers must have checked it with
    :func:`tuckerctl.outputs.claim` (which also refuses inputs and foreign files)."""
    target = Target(Path(path), Kind("file", False, lambda p: True, "file"), replace=True)
    with target.staging() as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

