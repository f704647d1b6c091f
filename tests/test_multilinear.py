"""Structured spectra, HOSVD and HOOI against dense float64 / TensorLy oracles."""

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tucker as tl_tucker

from tuckerctl.multilinear import HeadStack, mode_spectra, reduce, tucker
from tuckerctl.pareto import tail_error
from tuckerctl.ranks import family_ceilings, numerical_rank

tl.set_backend("pytorch")
f64 = dict(dtype=torch.float64)


def random_stack(H, G, d, r, bias=False, left_basis=None, right_basis=None, seed=0):
    """Random per-head factors; ``bias`` appends a homogeneous row (d + 1)."""
    g = torch.Generator().manual_seed(seed)
    m = d + bias
    left = torch.randn(H, left_basis or m, r, generator=g, **f64)
    right = torch.randn(G, right_basis or m, r, generator=g, **f64)
    lb = torch.randn(m, left_basis, generator=g, **f64) if left_basis else None
    rb = torch.randn(m, right_basis, generator=g, **f64) if right_basis else None
    return HeadStack(left, right, lb, rb)


def dense_spectra(W):
    H, m, n = W.shape
    return [torch.linalg.svdvals(W.reshape(H, -1)),
            torch.linalg.svdvals(W.permute(1, 0, 2).reshape(m, -1)),
            torch.linalg.svdvals(W.permute(2, 0, 1).reshape(n, -1))]


CASES = {
    "MHA": dict(H=6, G=6, d=48, r=8),
    "MHA-bias": dict(H=6, G=6, d=48, r=8, bias=True),
    "GQA": dict(H=8, G=2, d=64, r=8),
    "GQA-bias": dict(H=8, G=2, d=64, r=8, bias=True),
    "MQA": dict(H=6, G=1, d=40, r=5),
    "MQA-bias": dict(H=6, G=1, d=40, r=5, bias=True),
    "MHA-wide-heads": dict(H=4, G=4, d=20, r=8),  # H d_h > d
    "MLA": dict(H=6, G=6, d=64, r=12, left_basis=24, right_basis=20),
    "MLA-bias": dict(H=6, G=6, d=64, r=12, left_basis=24, right_basis=20, bias=True),
}


@pytest.mark.parametrize("case", CASES)
def test_structured_spectra_match_dense(case):
    stack = random_stack(**CASES[case])
    W = stack.dense()
    for ours, dense in zip(mode_spectra(stack), dense_spectra(W)):
        k = len(ours)
        assert k <= len(dense)
        # Agreement to 1e-10 of sigma_1 on what we compute; what we omit is zero.
        assert float((ours - dense[:k]).abs().max()) <= 1e-10 * float(dense[0])
        if len(dense) > k:
            assert float(dense[k:].max()) <= 1e-10 * float(dense[0])


@pytest.mark.parametrize("case", CASES)
def test_ceilings_hold_and_are_reached_by_random_factors(case):
    stack = random_stack(**CASES[case])
    W = stack.dense()
    measured = [numerical_rank(s.tolist(), 1e-10) for s in dense_spectra(W)]
    assert tuple(measured) == stack.ceilings


def test_family_ceiling_table_matches_structure():
    H, G, d, dh = 8, 2, 64, 8
    stack = random_stack(H, G, d, dh)
    assert family_ceilings("GQA", d, H, G, dh)["pre"] == stack.ceilings
    mla = random_stack(6, 6, 64, 12, left_basis=24, right_basis=20)
    # MLA pre: (H, q_lora, kv_lora + rope) with kv_lora + rope = 20
    assert family_ceilings("MLA", 64, 6, 6, 12, q_lora_rank=24, kv_lora_rank=16, rope_dim=4)["pre"] == mla.ceilings


def test_gqa_key_mode_rank_is_exactly_G_dh():
    stack = random_stack(H=12, G=3, d=96, r=8)
    key = mode_spectra(stack).right
    assert len(key) == 24 and numerical_rank(key.tolist(), 1e-12) == 24
    dense_key = dense_spectra(stack.dense())[2]
    assert numerical_rank(dense_key.tolist(), 1e-12) == 24


@pytest.mark.parametrize("case", ["MHA-bias", "GQA", "MQA", "MLA"])
def test_hosvd_matches_tensorly(case):
    stack = random_stack(**CASES[case])
    W = stack.dense()
    ranks = (3, 10, 6)
    ours = tucker(stack, ranks, hooi_iters=0)
    ref = tl_tucker(W, rank=list(ours.ranks), n_iter_max=0, init="svd")
    ref_err = float((W - tl.tucker_to_tensor(ref)).norm() / W.norm())
    dense_err = float((W - ours.to_tensor()).norm() / W.norm())
    assert abs(ours.rel_error - ref_err) <= 1e-6
    assert abs(ours.rel_error - dense_err) <= 1e-9
    # Same subspaces: the projectors onto each factor's span agree.
    for U, V in zip(ours.factors, ref.factors):
        assert torch.allclose(U @ U.T, V @ V.T, atol=1e-8)


@pytest.mark.parametrize("case", ["MHA", "GQA-bias", "MLA"])
def test_hooi_never_increases_error_and_reports_dense_error(case):
    stack = random_stack(**CASES[case])
    W = stack.dense()
    ours = tucker(stack, (3, 9, 5), hooi_iters=4)
    errs = ours.errors
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < errs[0]
    dense_err = float((W - ours.to_tensor()).norm() / W.norm())
    assert abs(ours.rel_error - dense_err) <= 1e-9
    # TensorLy HOOI from the same HOSVD start reaches an error no better than ours by more than noise.
    ref = tl_tucker(W, rank=list(ours.ranks), n_iter_max=4, init="svd", tol=0)
    ref_err = float((W - tl.tucker_to_tensor(ref)).norm() / W.norm())
    assert abs(ours.rel_error - ref_err) <= 1e-6


@pytest.mark.parametrize("case", CASES)
def test_tail_bound_holds(case):
    stack = random_stack(**CASES[case])
    spectra = mode_spectra(stack)
    for ranks in [(2, 5, 5), (4, 12, 3), (1, 1, 1)]:
        t = tucker(stack, ranks)
        assert t.rel_error <= tail_error([s.tolist() for s in spectra], t.ranks) + 1e-12


def test_full_rank_is_exact_and_ceiling_rank_of_gqa_is_exact():
    stack = random_stack(H=8, G=2, d=64, r=8, bias=True)
    t = tucker(stack, stack.ceilings)
    W = stack.dense()
    assert float((W - t.to_tensor()).norm() / W.norm()) <= 1e-12
    assert t.rel_error <= 1e-7


def test_reduce_shrinks_gqa_key_side():
    red = reduce(random_stack(H=8, G=2, d=64, r=8))
    assert red.rc.shape[1] == 16 and red.QR.shape == (64, 16)
    assert torch.allclose(red.QR.T @ red.QR, torch.eye(16, **f64), atol=1e-12)


def test_float32_stack_gives_same_spectra_to_float32_precision():
    stack = random_stack(H=8, G=2, d=64, r=8)
    s64 = mode_spectra(stack)
    s32 = mode_spectra(stack.to(dtype=torch.float32))
    for a, b in zip(s64, s32):
        assert float((a - b.double()).abs().max()) <= 1e-4 * float(a[0])


@pytest.mark.parametrize("H,G,x,y,r", [(8, 2, 30, 12, 5), (6, 6, 7, 9, 11), (4, 1, 50, 3, 2)])
def test_both_head_gram_evaluations_match_dense(H, G, x, y, r):
    from tuckerctl.multilinear import _head_gram_from_products, _head_gram_from_slices, head_gram

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(H, x, r, generator=g, **f64), torch.randn(G, y, r, generator=g, **f64)
    stack = HeadStack(a, b)
    M = stack.dense().reshape(H, -1)
    dense = M @ M.T
    for fn in (head_gram, _head_gram_from_products, _head_gram_from_slices):
        assert torch.allclose(fn(a, b, stack.group_of), dense, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("case", ["MHA-bias", "GQA", "MQA", "MLA"])
def test_gram_path_for_big_modes_matches_dense(case, monkeypatch):
    """Big modes (short side > 512) go through the float64 Gram summed from the factors;
    force that path on small tensors and compare with the dense oracle."""
    import tuckerctl.multilinear as ml

    monkeypatch.setattr(ml, "_GRAM_ABOVE", 0)
    stack = random_stack(**CASES[case])
    W = stack.dense()
    for ours, dense in zip(mode_spectra(stack), dense_spectra(W)):
        assert float((ours - dense[: len(ours)]).abs().max()) <= 1e-9 * float(dense[0])
    t = tucker(stack, (3, 10, 6))
    ref = tl_tucker(W, rank=list(t.ranks), n_iter_max=0, init="svd")
    assert abs(t.rel_error - float((W - tl.tucker_to_tensor(ref)).norm() / W.norm())) <= 1e-6


def test_mode_summary_follows_the_definitions():
    import math

    from tuckerctl.ranks import energy_rank, mode_summary

    sigma = [5.0, 3.0, 1.0, 0.5, 1e-9, 0.0]
    m = mode_summary(sigma, 8, 6, (0.5, 0.9, 0.99, 1.0), 1e-6)
    assert m["numerical_rank"] == numerical_rank(sigma, 1e-6) == 4
    assert m["energy_ranks"] == {f"{t:g}": energy_rank(sigma, t) for t in (0.5, 0.9, 0.99, 1.0)}
    assert m["energy_ranks"] == {"0.5": 1, "0.9": 2, "0.99": 3, "1": 4}
    p = [s / sum(sigma) for s in sigma if s > 0]
    assert math.isclose(m["entropy_rank"], math.exp(-sum(x * math.log(x) for x in p)), rel_tol=1e-12)
    assert math.isclose(m["stable_rank"], sum(s * s for s in sigma) / 25.0, rel_tol=1e-12)


def test_tucker_value_is_a_tensorly_tucker_tensor():
    """``core, factors = t`` unpacks; TensorLy's tucker_to_tensor (PyTorch backend) rebuilds
    the same tensor from the value and from ``to_tensorly()``; at full rank that is W."""
    torch.manual_seed(0)
    stack = HeadStack(torch.randn(6, 20, 4, dtype=torch.float64), torch.randn(2, 20, 4, dtype=torch.float64))
    t = tucker(stack, (6, 20, 20))
    core, factors = t
    assert core is t.core and factors is t.factors
    tt = t.to_tensorly()
    assert tt.rank == t.ranks and tt.shape == stack.shape
    with tl.backend_context("pytorch", local_threadsafe=True):
        for value in (t, tt):
            assert torch.allclose(tl.tucker_to_tensor(value), stack.dense(), atol=1e-12, rtol=0)


def test_sandwich_sum_in_symmetric_row_blocks_matches_the_direct_sum():
    # Large sides multiply only the row blocks from the diagonal rightwards and mirror the upper
    # triangle (x = 601: uneven blocks); the direct float64 sum is the oracle.
    from tuckerctl.multilinear import _sandwich_sum

    g = torch.Generator().manual_seed(4)
    c = torch.randn(5, 601, 7, generator=g, dtype=torch.float64)
    a = torch.randn(5, 7, 7, generator=g, dtype=torch.float64)
    w = a @ a.transpose(1, 2)
    want = sum(c[j] @ w[j] @ c[j].T for j in range(5))
    got = _sandwich_sum(c, w)
    assert torch.equal(got, got.T)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
