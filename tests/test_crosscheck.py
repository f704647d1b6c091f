"""``analyze --cross-check``: the structured spectra against TensorLy's dense HOSVD, on the
shipped example model (what CI runs), with negative controls for the check itself."""

import copy
import json
from pathlib import Path

import pytest
import tensorly as tl
import torch
from oracle import run_cli

from tuckerctl import crosscheck
from tuckerctl.adapters import detect
from tuckerctl.analysis import analyze
from tuckerctl.checkpoint import open_checkpoint

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny-gqa"


@pytest.fixture(scope="module")
def example_doc():
    return analyze(EXAMPLE, device="cpu")


def test_example_spectra_match_tensorly(example_doc):
    with tl.backend_context("numpy"):  # a user's process on another TensorLy backend
        cc = crosscheck.cross_check(EXAMPLE, example_doc, device="cpu")
        assert tl.get_backend() == "numpy"  # the PyTorch backend was local to the check
    assert [r["index"] for r in cc["layers"]] == [0, 1, 2, 3] and cc["skipped_layers"] == []
    for row in cc["layers"]:
        assert set(row["pre"]) == {"head", "query", "key"} and set(row["post"]) == {"head", "output", "value"}
    # float64 on both sides: agreement at rounding level, far inside the 1e-6 tolerance.
    assert cc["passed"] and cc["max_deviation"] <= 1e-12


def test_a_wrong_spectrum_is_caught(example_doc):
    doc = copy.deepcopy(example_doc)
    sv = doc["layers"][2]["post"]["modes"]["value"]["singular_values"]
    sv[5] *= 1.001  # a 0.1% error in the sixth value
    dropped = copy.deepcopy(example_doc)
    del dropped["layers"][1]["pre"]["modes"]["key"]["singular_values"][-3:]  # omitted non-zero values
    for bad, (layer, key, mode) in ((doc, (2, "post", "value")), (dropped, (1, "pre", "key"))):
        cc = crosscheck.cross_check(EXAMPLE, bad, device="cpu")
        assert not cc["passed"]
        row = next(r for r in cc["layers"] if r["index"] == layer)
        assert row[key][mode] > 1e-6
        others = [v for r in cc["layers"] for k in ("pre", "post") for m, v in r[k].items()
                  if (r["index"], k, m) != (layer, key, mode)]
        assert max(others) <= 1e-12


def test_layers_over_the_size_limit_are_skipped_unread(example_doc, monkeypatch):
    read = []
    adapter, _ = detect(open_checkpoint(EXAMPLE))  # the registry's instance, as cross_check gets it
    original = adapter.layer
    monkeypatch.setattr(adapter, "layer", lambda ckpt, spec, i: read.append(i) or original(ckpt, spec, i))
    # The example's pre tensor is 8 x 128 x 128 = 131072 numbers.
    cc = crosscheck.cross_check(EXAMPLE, example_doc, device="cpu", max_elements=8 * 128 * 128 - 1)
    assert cc["skipped_layers"] == [0, 1, 2, 3] and cc["layers"] == [] and read == []
    cc = crosscheck.cross_check(EXAMPLE, example_doc, device="cpu", max_elements=8 * 128 * 128)
    assert cc["skipped_layers"] == [] and read == [0, 1, 2, 3]


def test_deviation_definition():
    dense = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert crosscheck.deviation([4.0, 2.0, 1.0], dense) == 0.0  # a structural zero omitted
    assert crosscheck.deviation([4.0, 2.0], dense) == pytest.approx(0.25)  # sigma_3 = 1 omitted
    assert crosscheck.deviation([4.0, 2.2, 1.0], dense) == pytest.approx(0.05)


def test_cli_cross_check_on_the_example(tmp_path, monkeypatch):
    res = run_cli("analyze", EXAMPLE, "--cross-check", "--json", "--device", "cpu")
    assert res.code == 0, res.stderr
    cc = json.loads(res.stdout)["cross_check"]
    assert cc["passed"] and len(cc["layers"]) == 4
    assert "cross-check against TensorLy" in res.stderr
    monkeypatch.setattr(crosscheck, "deviation", lambda s, d: 1e-3)
    res = run_cli("analyze", EXAMPLE, "--cross-check", "--quiet", "--layers", "0")
    assert res.code == 1 and "deviate from TensorLy's" in res.stderr
