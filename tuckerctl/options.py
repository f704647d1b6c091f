"""Command-line option values checked before any work (and before torch is imported).

Each function raises :class:`~tuckerctl.errors.InputError` naming the option.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .errors import InputError, arg

STORE_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def fraction(value: float | None, option: str, closed: bool = True) -> float | None:
    """A number in (0, 1] (``closed``) or (0, 1); NaN and infinities are rejected."""
    if value is None:
        return None
    ok = math.isfinite(value) and 0 < value and (value <= 1 if closed else value < 1)
    if not ok:
        raise InputError(f"{arg(option)}: {value} is not in (0, 1{']' if closed else ')'}")
    return value


def energies(text: str) -> tuple[float, ...]:
    """``"0.9,0.99"`` -> (0.9, 0.99), each in (0, 1]."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise InputError(f"{arg('energy')}: cannot parse {text!r} (use e.g. 0.9,0.99,0.999)") from None
    for v in values:
        fraction(v, "energy")
    return values


def device(name: str) -> str:
    if not _DEVICE.fullmatch(name):
        raise InputError(f"{arg('device')}: unknown device {name!r} (use auto, cpu, cuda or cuda:N)")
    return name


def non_negative(value: float | None, option: str) -> float | None:
    """A finite number >= 0 (``--max-error``); NaN is rejected."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise InputError(f"{arg(option)}: {value} must be a finite number >= 0")
    return value


def positive_int(value: int, option: str) -> int:
    if value < 1:
        raise InputError(f"{arg(option)}: {value} must be positive")
    return value


def parse_ranks(text: str | Sequence[int] | None, option: str) -> tuple[int, int, int] | None:
    """``"8,128,64"`` or (8, 128, 64) -> (8, 128, 64), checked; errors name the option."""
    if text is None:
        return None
    try:
        ranks = tuple(int(t) for t in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        raise InputError(f"{arg(option)}: cannot parse {text!r} (use three integers, e.g. 8,128,64)") from None
    if len(ranks) != 3 or min(ranks) <= 0:
        raise InputError(f"{arg(option)}: need three positive ranks (head,query,key), got {text!r}")
    return ranks


def compress_choice(ranks, ranks_post, energy, params, hooi_iters: int = 0, dtype: str | None = None) -> None:
    """Exactly one rank rule, in range; the other compress settings valid."""
    chosen = sum(x is not None for x in (ranks, energy, params))
    if chosen != 1:
        raise InputError(f"give exactly one of {arg('ranks')}, {arg('energy')} or {arg('params')}")
    if ranks_post is not None and ranks is None:
        raise InputError(f"{arg('ranks_post')} needs {arg('ranks')}")
    fraction(energy, "energy")
    if params is not None and not (math.isfinite(params) and 0 < params <= 1):
        raise InputError(f"{arg('params')}: {params} is not in (0, 1] (a fraction of the attention parameters)")
    if hooi_iters < 0:
        raise InputError(f"{arg('hooi_iters')}: {hooi_iters} is negative")
    if dtype is not None and dtype not in STORE_DTYPES:
        raise InputError(f"{arg('dtype')}: {dtype!r} is not one of {', '.join(STORE_DTYPES)}")


REPORT_FORMATS = ("png", "svg", "pdf", "csv")  # figures, and ranks.csv


def formats(text: str) -> tuple[str, ...]:
    """``report --format``: ``"png,csv"`` -> ("png", "csv")."""
    fmts = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()))
    bad = [f for f in fmts if f not in REPORT_FORMATS]
    if bad or not fmts:
        raise InputError(f"{arg('formats')}: {', '.join(bad) or 'nothing'} is not one of {', '.join(REPORT_FORMATS)}")
    return fmts
