"""The qk_input structure (exact with the model's own RoPE) against dense float64 oracles."""

import pytest
import torch
from test_compress import make_llama, source_layers

import tuckerctl
from tuckerctl.compress import compress
from tuckerctl.verify import verify


def dense_qk_input_error(stack, t):
    W = stack.to(dtype=torch.float64).dense()
    U2, U3 = (f.double() for f in t.pre_factors[1:])
    What = U2 @ t.pre_mixers().double() @ U3.T
    return float((W - What).norm() / W.norm())


@pytest.mark.parametrize("bias", [False, True])
def test_qk_input_is_the_rope_default_and_exact_at_the_ceilings(bias, tmp_path):
    src = make_llama(tmp_path / "src", bias=bias)
    info = compress(src, tmp_path / "out", ranks="1000,100000,100000", hooi_iters=0, device="cpu")
    assert info["structure"] == "qk_input" and info["flags"]["latent_rope_needed"] is False
    tk = tuckerctl.load(tmp_path / "out")
    for layer, t, rec in zip(source_layers(src), tk, info["layers"]):
        assert t.structure == "qk_input" and t.pre_core is None
        H, m, n = layer.pre.shape
        assert t.query_heads.shape == (H, m if not bias else 49, 8)[:1] + (t.pre_factors[1].shape[1], 8)
        assert rec["pre"]["ranks"][0] == H  # the head mode is never truncated
        assert dense_qk_input_error(layer.pre, t) <= 1e-6
        # the per-head coordinates reproduce each head's own query/key factors
        A = layer.pre.left.double()
        assert torch.allclose(t.pre_factors[1].double() @ t.query_heads.double(), A, atol=1e-5)


def test_qk_input_low_rank_error_and_verify(tmp_path):
    src = make_llama(tmp_path / "src", bias=True)
    info = compress(src, tmp_path / "out", ranks="1,20,10", hooi_iters=2, device="cpu")
    tk = tuckerctl.load(tmp_path / "out")
    res = verify(tmp_path / "out", src, device="cpu", tokens=16)
    for layer, t, rec, row in zip(source_layers(src), tk, info["layers"], res["layers"]):
        dense = dense_qk_input_error(layer.pre, t)
        assert 0.01 < dense < 1 and abs(rec["pre"]["rel_error"] - dense) <= 1e-5
        assert abs(row["pre"]["rel_error"] - dense) <= 1e-5
        # params: U2, U3 and the per-head/per-group coordinates
        H, m, n = layer.pre.shape
        assert rec["pre"]["params"] == m * 20 + n * 10 + H * 20 * 8 + 2 * 10 * 8


def test_qk_input_params_budget_holds(tmp_path):
    src = make_llama(tmp_path / "src", layers=2)
    info = compress(src, tmp_path / "out", params=0.5, device="cpu", hooi_iters=0)
    assert info["structure"] == "qk_input"
    assert info["summary"]["params_tucker"] <= 0.5 * info["summary"]["params_original"]
