"""The library API takes typed values (the CLI parses strings at its boundary); the old text
forms still work and give the same result."""

from pathlib import Path

import pytest

from tuckerctl.analysis import analyze
from tuckerctl.errors import InputError
from tuckerctl.options import parse_ranks

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny-gqa"


def test_layers_as_indices_equal_the_text_form():
    typed = analyze(EXAMPLE, layers=[1, 0], device="cpu")
    text = analyze(EXAMPLE, layers="0-1", device="cpu")
    assert [r["index"] for r in typed["layers"]] == [0, 1]
    assert typed["layers"] == text["layers"]
    with pytest.raises(InputError, match="outside"):
        analyze(EXAMPLE, layers=[99], device="cpu")


def test_ranks_as_a_tuple_equal_the_text_form():
    assert parse_ranks((8, 128, 64), "ranks") == parse_ranks("8,128,64", "ranks") == (8, 128, 64)
    for bad in [(8, 128), (8, 0, 64), ("a", 1, 1)]:
        with pytest.raises(InputError, match="ranks"):
            parse_ranks(bad, "ranks")
