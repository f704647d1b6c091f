"""``analyze --cross-check``: the structured spectra against TensorLy's dense HOSVD, on the
shipped example model (what CI runs), with negative controls for the check itself.

The example is a RoPE model: with ``rope_offsets=0`` both tensors are checked in the
zero-offset form; with a few offsets the query-key spectra are the offset-averaged ones,
checked against the dense tensor stacked over those offsets."""

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
from tuckerctl.loader import open_checkpoint

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny-gqa"


@pytest.fixture(scope="module")
def example_doc():
    return analyze(EXAMPLE, device="cpu", rope_offsets=0)


def check(doc, **kw):
    return crosscheck.cross_check(EXAMPLE, doc, device="cpu", rope_offsets=0, **kw)


def test_example_spectra_match_tensorly(example_doc):
    with tl.backend_context("numpy"):  # a user's process on another TensorLy backend
        cc = check(example_doc)
        assert tl.get_backend() == "numpy"  # the PyTorch backend was local to the check
    assert [r["index"] for r in cc["layers"]] == [0, 1, 2, 3] and cc["skipped"] == []
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
        cc = check(bad)
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
    cc = check(example_doc, max_elements=8 * 128 * 128 - 1)
    assert [(s["index"], s["tensor"]) for s in cc["skipped"]] == [(i, k) for i in range(4) for k in ("pre", "post")]
    assert cc["layers"] == [] and read == []
    cc = check(example_doc, max_elements=8 * 128 * 128)
    assert cc["skipped"] == [] and read == [0, 1, 2, 3]


def test_offset_averaged_rope_spectra_match_the_stacked_dense_tensor():
    """analyze's closed-form offset averages against the dense tensor over every offset,
    R(t) built from the config; the default 2048 offsets are too many to form densely."""
    doc = analyze(EXAMPLE, device="cpu", rope_offsets=5, layers="1,3")
    cc = crosscheck.cross_check(EXAMPLE, doc, device="cpu", rope_offsets=5)
    assert cc["rope_offsets"] == 5 and cc["skipped"] == [] and {"pre", "post"} <= set(cc["layers"][0])
    assert cc["passed"] and cc["max_deviation"] <= 1e-12
    zero = analyze(EXAMPLE, device="cpu", rope_offsets=0, layers="1,3")
    assert not crosscheck.cross_check(EXAMPLE, zero, device="cpu", rope_offsets=5)["passed"]  # the forms differ
    full = analyze(EXAMPLE, device="cpu", layers="1")
    cc = crosscheck.cross_check(EXAMPLE, full, device="cpu")
    assert cc["skipped"] == [{"index": 1, "tensor": "pre", "elements": 2048 * 8 * 128 * 128}]
    assert set(cc["layers"][0]) == {"index", "post"} and cc["passed"]


def test_rotations_follow_transformers_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    R = crosscheck.rotations(8, 100.0, 0.5, 4)  # rotary width 4 of 8
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    inv = 100.0 ** (-torch.arange(0, 4, 2, dtype=torch.float64) / 4)
    ang = torch.arange(4, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([ang, ang], -1)
    rot, _ = apply_rotary_pos_emb(q[..., :4], q[..., :4], emb.cos()[None], emb.sin()[None])
    want = torch.cat([rot, q[..., 4:]], -1)[0, 0]
    assert torch.allclose(torch.einsum("ti,tij->tj", q[0, 0], R), want, atol=1e-14)


def test_deviation_definition():
    dense = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert crosscheck.deviation([4.0, 2.0, 1.0], dense) == 0.0  # a structural zero omitted
    assert crosscheck.deviation([4.0, 2.0], dense) == pytest.approx(0.25)  # sigma_3 = 1 omitted
    assert crosscheck.deviation([4.0, 2.2, 1.0], dense) == pytest.approx(0.05)


def test_cli_cross_check_on_the_example(tmp_path, monkeypatch):
    res = run_cli("analyze", EXAMPLE, "--cross-check", "--json", "--device", "cpu", "--rope-offsets", "0")
    assert res.code == 0, res.stderr
    cc = json.loads(res.stdout)["cross_check"]
    assert cc["passed"] and len(cc["layers"]) == 4 and cc["skipped"] == []
    assert "cross-check against TensorLy" in res.stderr
    monkeypatch.setattr(crosscheck, "deviation", lambda s, d: 1e-3)
    res = run_cli("analyze", EXAMPLE, "--cross-check", "--quiet", "--layers", "0")
    assert res.code == 1 and "deviate from TensorLy's" in res.stderr
