"""Usage checks that need no torch: run by the CLI before anything heavy is imported,
so that a mistyped command answers at once, with a hint aimed at the mistake."""

from __future__ import annotations

import difflib
from pathlib import Path

from .errors import InputError, arg


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_layer_spec(text: str) -> list[tuple[int, int]]:
    """``"0,5-7"`` -> [(0, 0), (5, 7)]: the syntax of --layers, without the layer count."""
    spans = []
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise InputError(f"{arg('layers')}: cannot parse {part.strip()!r} (use e.g. 0,5-7; layers count "
                             "from 0)") from None
        if lo > hi:
            raise InputError(f"{arg('layers')}: {part.strip()!r} is a reversed range (did you mean {hi}-{lo}?)")
        spans.append((lo, hi))
    return spans


def check_checkpoint_source(source: str) -> None:
    """A missing path is named at once; an analysis JSON given as a checkpoint gets
    pointed at ``report``."""
    path = Path(source)
    if not path.exists():
        from .sources import check_exists

        check_exists(source)  # a Hub id is looked up later; anything else is a missing path
        return
    if path.suffix != ".json" or not path.is_file() or path.name == "config.json" or \
            path.name.endswith(".index.json"):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return
    if '"tuckerctl.analys' in head:
        raise InputError(f"{source}: this is an analysis JSON (from `tuckerctl analyze --json`), not a "
                         f"checkpoint; draw it with `tuckerctl report {source} -o report/`")


def check_ranks_options(ranks: str | None, ranks_post: str | None, energy, params) -> None:
    """compress: exactly one way of choosing ranks; --ranks-post only beside --ranks."""
    if ranks_post is not None and ranks is None:
        raise InputError(f"{arg('ranks_post')} needs {arg('ranks')} (the pre-softmax ranks), e.g. "
                         f"{arg('ranks', '8,64,32')} {arg('ranks_post', '8,64,32')}")
    chosen = [n for n, v in (("ranks", ranks), ("energy", energy), ("params", params)) if v is not None]
    if len(chosen) > 1:
        raise InputError(f"{' and '.join(map(arg, chosen))}: choose one way of setting the ranks")
