"""Device selection shared by the commands (``--device auto|cpu|cuda|cuda:N``)."""

from __future__ import annotations

import torch

from .errors import InputError, arg


def resolve_device(name: str = "auto") -> torch.device:
    """Map a ``--device`` value to a torch device; ``auto`` prefers CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"{arg('device')}: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{arg('device', name)}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{arg('device', name)}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InputError(f"{arg('device')}: unsupported device type {dev.type!r}")
    return dev
