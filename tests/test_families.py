"""The family table (tuckerctl.families) is the one list of supported model types: every row is
read by exactly one adapter, every adapter reads rows of its own, and the README names each
row (adding a family = one row + one oracle test + one README line)."""

import re
from pathlib import Path

from tuckerctl.adapters import ADAPTERS, family_adapter
from tuckerctl.families import FAMILIES, GGUF_ARCHITECTURES, facts

README = Path(__file__).parent.parent / "README.md"


def test_every_row_has_exactly_one_adapter():
    read = [f for a in ADAPTERS for f in a.families]
    assert sorted(read) == sorted(FAMILIES)
    for name, row in FAMILIES.items():
        assert type(family_adapter(name)).__name__ == row.adapter
    assert all(a.families for a in ADAPTERS)


def test_readme_names_every_family():
    table = README.read_text(encoding="utf-8")
    named = set(re.findall(r"`([A-Za-z0-9_]+)`", table))
    assert set(FAMILIES) - named == set()


def test_gguf_architectures_are_rows_the_readers_know():
    assert GGUF_ARCHITECTURES["gemma3"].model_type == "gemma3_text"
    assert GGUF_ARCHITECTURES["llama"].gguf_permuted and not GGUF_ARCHITECTURES["qwen2"].gguf_permuted
    assert {a for a, f in GGUF_ARCHITECTURES.items() if f.gguf_norm_plus_one} == {"gemma2", "gemma3"}


def test_unknown_family_gets_the_defaults():
    row = facts("not_a_family")
    assert row.causal and not row.alibi and not row.qk_norm_one_plus_w
    assert not facts("bert").causal and facts("bloom").alibi
