"""Exact trade-off errors (tuckerctl.exact) against dense float64 oracles and exhaustive search."""

import itertools

import pytest
import torch

from tuckerctl.exact import contiguous_groups, gqa_errors, gqa_residual, greedy_groups, hosvd_residuals
from tuckerctl.multilinear import HeadStack

f64 = dict(dtype=torch.float64)


def stack(H, G, d, r, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Decaying column scales so that truncations are not all alike.
    scale = torch.logspace(0, -1.5, d + bias, **f64)[:, None]
    return HeadStack(torch.randn(H, d + bias, r, generator=g, **f64) * scale,
                     torch.randn(G, d + bias, r, generator=g, **f64) * scale.flip(0))


def dense_hosvd_residual(W, ranks):
    """Truncated HOSVD of the dense tensor, squared residual, all in float64."""
    Us = []
    for mode, r in enumerate(ranks):
        X = W.movedim(mode, 0).reshape(W.shape[mode], -1)
        Us.append(torch.linalg.svd(X, full_matrices=False)[0][:, :r])
    P = torch.einsum("hij,ha,ib,jc->abc", W, *Us)
    Wh = torch.einsum("abc,ha,ib,jc->hij", P, *Us)
    return float(((W - Wh) ** 2).sum())


@pytest.mark.parametrize("H,G,d,r,bias", [(4, 4, 10, 3, False), (6, 2, 12, 3, True), (4, 1, 9, 4, False),
                                          (3, 3, 5, 4, False)])
def test_hosvd_residuals_match_dense_truncations(H, G, d, r, bias):
    st = stack(H, G, d, r, bias)
    W = st.dense()
    grids = [sorted({1, 2, H}), sorted({1, 3, 5, d + bias}), sorted({2, 4, d + bias})]
    table, norm_sq = hosvd_residuals(st, grids)
    assert norm_sq == pytest.approx(float((W ** 2).sum()), rel=1e-12)
    for (a, r1), (b, r2), (c, r3) in itertools.product(*(list(enumerate(g)) for g in grids)):
        want = dense_hosvd_residual(W, (r1, r2, r3))
        assert float(table[a, b, c]) == pytest.approx(want, rel=1e-8, abs=1e-10 * norm_sq)


def dense_gqa_residual(W, groups, width):
    """Eckart-Young on each group's stacked [W[h]^T] (dense, float64)."""
    total = 0.0
    for g in groups:
        X = torch.cat([W[h].T for h in g], dim=1)
        s = torch.linalg.svdvals(X)
        total += float((s[width:] ** 2).sum())
    return total


def test_gqa_residual_is_eckart_young_and_achieved():
    st = stack(8, 8, 16, 3, seed=1)
    W = st.dense()
    groups = contiguous_groups(8, 2)
    got = gqa_residual(st, groups, 3)
    assert got == pytest.approx(dense_gqa_residual(W, groups, 3), rel=1e-10)
    # Achieved: shared Y = top-3 right singular vectors of the group's stacked W[h]; A_h = W[h] Y.
    resid = 0.0
    for g in groups:
        Y = torch.linalg.svd(torch.cat([W[h].T for h in g], dim=1), full_matrices=False)[0][:, :3]
        resid += sum(float(((W[h] - W[h] @ Y @ Y.T) ** 2).sum()) for h in g)
    assert got == pytest.approx(resid, rel=1e-10)


@pytest.mark.parametrize("d,width", [(40, 3), (40, 5), (6, 3), (6, 2)])
def test_gqa_residual_of_groupings_that_mix_stored_groups_matches_dense(d, width):
    # Heads of a GQA source regrouped across its stored key matrices: at d = 40 a group with
    # fewer stored sources than heads takes the reduced D^1/2 R^T R D^1/2 route (t r < |S| r),
    # the others and d = 6 the block-Gram route.
    st = stack(8, 4, d, 3, seed=3)
    W = st.dense()
    for groups in ([[0, 2, 4, 6], [1, 3, 5, 7]], [[0, 1, 2, 7], [3, 4, 5, 6]], contiguous_groups(8, 2)):
        want = dense_gqa_residual(W, groups, width)
        assert gqa_residual(st, groups, width) == pytest.approx(want, rel=1e-9, abs=1e-12 * float((W ** 2).sum()))


def test_gqa_residual_with_a_zero_head_falls_back_to_qr_and_matches_dense(monkeypatch):
    # The key-side blocks use Cholesky factors of the heads' r x r Grams; a zero head's Gram is
    # singular, so they come from thin QRs instead: same residuals as the dense oracle either way.
    import tuckerctl.exact as exact

    calls = []
    qr = exact._r_factors
    monkeypatch.setattr(exact, "_r_factors", lambda x: calls.append(x.shape) or qr(x))
    for zero in (False, True):
        st = stack(8, 4, 40, 3, seed=5)
        if zero:
            st.left[2] = 0
        W = st.dense()
        for groups in ([[0, 2, 4, 6], [1, 3, 5, 7]], [[0, 1, 2, 7], [3, 4, 5, 6]]):
            want = dense_gqa_residual(W, groups, 3)
            assert gqa_residual(st, groups, 3) == pytest.approx(want, rel=1e-9, abs=1e-12 * float((W ** 2).sum()))
        assert bool(calls) == zero
        calls.clear()


def test_gqa_of_a_gqa_model_is_exact_at_its_own_grouping_and_one_group_is_the_key_tail():
    st = stack(6, 3, 14, 2, seed=2)
    assert gqa_errors(st, 3, 2)["error_contiguous"] < 1e-7
    assert gqa_errors(st, 6, 2)["error_contiguous"] < 1e-7
    # G' = 1: one group = the whole key mode truncated at d_h.
    W = st.dense()
    s = torch.linalg.svdvals(W.permute(2, 0, 1).reshape(14, -1))
    tail = float((s[2:] ** 2).sum() / (s ** 2).sum()) ** 0.5
    assert gqa_errors(st, 1, 2)["error_best"] == pytest.approx(tail, rel=1e-9)


def test_greedy_regrouping_finds_a_planted_grouping_and_exhaustive_agrees_it_is_best():
    # Heads 0,3 / 1,4 / 2,5 share keys: the contiguous grouping (0,1 / 2,3 / 4,5) does not.
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 12, 2, generator=g, **f64)
    right = keys[torch.tensor([0, 1, 2, 0, 1, 2])] + 1e-3 * torch.randn(6, 12, 2, generator=g, **f64)
    st = HeadStack(torch.randn(6, 12, 2, generator=g, **f64), right)
    assert greedy_groups(st, 3) == [[0, 3], [1, 4], [2, 5]]
    res = gqa_errors(st, 3, 2)
    assert res["best_grouping"] == [[0, 3], [1, 4], [2, 5]]
    assert res["error_best"] < res["error_contiguous"] / 10
    # Exhaustive over all pairings of 6 heads.
    def pairings(items):
        if not items:
            yield []
            return
        a = items[0]
        for b in items[1:]:
            rest = [x for x in items if x not in (a, b)]
            for p in pairings(rest):
                yield [[a, b]] + p
    best = min(gqa_residual(st, p, 2) for p in pairings(list(range(6))))
    assert gqa_residual(st, res["best_grouping"], 2) == pytest.approx(best, rel=1e-9)


def test_analyze_tradeoff_points_are_the_dense_truncation_errors():
    """Figure 4's points (layer sums, same ranks in every layer) against dense float64 HOSVD and
    dense Eckart-Young on the example model."""
    from pathlib import Path

    from tuckerctl import pareto
    from tuckerctl.adapters import detect
    from tuckerctl.analysis import analyze
    from tuckerctl.loader import open_checkpoint

    path = Path(__file__).resolve().parent.parent / "examples" / "tiny-gqa"
    doc = analyze(path, device="cpu")
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt)
    dense = [adapter.layer(ckpt, spec, i).pre.to(dtype=torch.float64).dense() for i in range(spec.layers)]
    norm_sq = sum(float((W ** 2).sum()) for W in dense)
    t = pareto.tradeoff(doc, "pre")
    assert t.exact
    picks = [0, len(t.tucker.params) // 2, len(t.tucker.params) - 2]
    for i in picks:
        ranks = tuple(int(x) for x in t.tucker.ranks[i])
        want = (sum(dense_hosvd_residual(W, ranks) for W in dense) / norm_sq) ** 0.5
        assert t.tucker.errors[i] == pytest.approx(want, rel=1e-7, abs=1e-6)
    H = spec.heads
    for k, lab in enumerate(t.gqa.labels):
        g = int(lab[2:])
        contiguous = sum(dense_gqa_residual(W, contiguous_groups(H, g), spec.head_dim) for W in dense)
        assert (t.gqa_contiguous or t.gqa).errors[k] == pytest.approx((contiguous / norm_sq) ** 0.5, rel=1e-7,
                                                                        abs=1e-7)
        assert t.gqa.errors[k] <= (t.gqa_contiguous or t.gqa).errors[k] + 1e-12


def test_report_rejects_a_residual_table_that_does_not_match_its_grid():
    from pathlib import Path

    from tuckerctl.analysis import analyze
    from tuckerctl.errors import InputError
    from tuckerctl.report import validate_analysis

    doc = analyze(Path(__file__).resolve().parent.parent / "examples" / "tiny-gqa", layers="0", device="cpu")
    validate_analysis(doc)
    doc["summary"]["tradeoff"]["pre"]["hosvd"]["residual_sq"] = [[[1.0]]]
    with pytest.raises(InputError, match="summary.tradeoff.pre.hosvd.residual_sq"):
        validate_analysis(doc)
