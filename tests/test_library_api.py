"""The library API takes typed values (the CLI parses strings at its boundary); the old text
forms still work and give the same result."""

import shutil
from pathlib import Path

import pytest
from oracle import run_cli

from tuckerctl.analysis import analyze
from tuckerctl.compress import compress
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
        with pytest.raises(InputError, match="^ranks: "):
            parse_ranks(bad, "ranks")


def test_errors_name_keyword_arguments_for_the_library_and_options_for_the_cli(tmp_path):
    """One message, spelled for whoever reads it: ``tol``/``method='svd'`` from the library,
    ``--tol``/``--method svd`` from the command line."""
    with pytest.raises(InputError) as lib:
        analyze(EXAMPLE, tol=2.0, device="cpu")
    assert str(lib.value) == "tol: 2.0 is not in (0, 1)"
    cli = run_cli("analyze", EXAMPLE, "--tol", "2")
    assert cli.code == 2 and "error: --tol: 2.0 is not in (0, 1)" in cli.stderr
    with pytest.raises(InputError) as lib:
        compress(EXAMPLE, tmp_path / "a", ranks=(2, 4, 4), method="svd", device="cpu")
    assert str(lib.value) == "method='svd' takes params or energy, not ranks"
    cli = run_cli("compress", EXAMPLE, "-o", tmp_path / "b", "--ranks", "2,4,4", "--method", "svd")
    assert cli.code == 2 and "error: --method svd takes --params or --energy, not --ranks" in cli.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(EXAMPLE / "model.safetensors", bare)  # no config.json
    with pytest.raises(InputError) as lib:
        analyze(bare, device="cpu")
    assert str(lib.value).endswith("give config, or heads (and kv_heads/head_dim where needed)")
    cli = run_cli("analyze", bare)
    assert cli.code == 2 and "give --config, or --heads (and --kv-heads/--head-dim where needed)" in cli.stderr


def test_compressed_layer_unpacks_like_a_tensorly_tucker(tmp_path):
    """``load(path).layer(i).post`` is a plain Tucker: ``core, factors = ...`` and TensorLy's
    ``tucker_to_tensor`` rebuild the same dense tensor as the factors contracted by hand."""
    import tensorly as tl
    import torch

    from tuckerctl import load
    from tuckerctl.compress import compress

    compress(EXAMPLE, tmp_path / "out", ranks=(2, 8, 4), structure="tucker", device="cpu", hooi_iters=0)
    layer = load(tmp_path / "out").layer(0, dtype=torch.float64)
    for t in (layer.pre, layer.post):
        core, (U1, U2, U3) = t
        by_hand = torch.einsum("abc,ha,mb,nc->hmn", core, U1, U2, U3)
        with tl.backend_context("pytorch"):
            dense = tl.tucker_to_tensor(t)
        assert dense.shape == by_hand.shape == (U1.shape[0], U2.shape[0], U3.shape[0])
        assert torch.allclose(dense, by_hand, rtol=1e-12, atol=1e-12)
