"""Compression in the activation metric: errors against dense float64 oracles, and
calibrated vs uncalibrated compared by measurement on held-out inputs."""

import pytest
import torch
from textdata import python_docs, save_tiny_lm

from tuckerctl.lowrank import allocate, factor, params_of, spectrum
from tuckerctl.multilinear import HeadStack, tucker
from tuckerctl.whiten import relative_error, weighted_tucker, whitener


def random_moment(d, gen, spread=3.0):
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (Q * torch.logspace(0, -spread, d, dtype=torch.float64)) @ Q.T


def stack(H=6, G=2, d=20, r=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return HeadStack(torch.randn(H, d, r, generator=gen, dtype=torch.float64),
                     torch.randn(G, d, r, generator=gen, dtype=torch.float64)), gen


def test_whitener_is_a_square_root_with_floor():
    gen = torch.Generator().manual_seed(0)
    C = random_moment(12, gen, spread=9)
    w = whitener(C, floor=1e-6)
    assert w.floored > 0 and w.condition == pytest.approx(1e6, rel=1e-9)
    torch.testing.assert_close(w.S @ w.S_inv, torch.eye(12, dtype=torch.float64), atol=1e-8, rtol=0)
    C = random_moment(12, gen, spread=2)
    w = whitener(C)
    torch.testing.assert_close(w.S @ w.S, C, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(w.S, w.S.T)
    assert w.floored == 0 and w.condition == pytest.approx(100, rel=1e-9)


@pytest.mark.parametrize("ranks", [(3, 8, 5), (6, 20, 8)])
def test_weighted_errors_match_dense_float64(ranks):
    st, gen = stack()
    Cl, Cr = random_moment(20, gen), random_moment(20, gen)
    wl, wr = whitener(Cl), whitener(Cr)
    wt = weighted_tucker(st, ranks, wl, wr, hooi_iters=1)
    W = st.dense()
    W_hat = wt.tucker.to_tensor()  # mapped back to the original coordinates
    # E over inputs of the bilinear output error = || Sl (W - W_hat) Sr ||, Sl^2 = Cl, Sr^2 = Cr
    Sl, Sr = wl.S, wr.S
    dense_weighted = float((Sl @ (W - W_hat) @ Sr).norm() / (Sl @ W @ Sr).norm())
    dense_plain = float((W - W_hat).norm() / W.norm())
    assert wt.weighted_error == pytest.approx(dense_weighted, rel=1e-6, abs=1e-9)
    assert wt.weight_error == pytest.approx(dense_plain, rel=1e-6, abs=1e-7)
    assert relative_error(st, wt.tucker) == pytest.approx(dense_plain, rel=1e-6, abs=1e-7)
    if ranks[1] == 20:  # full query rank and key ceiling G r = 8: exact after mapping back
        assert dense_plain < 1e-10 and wt.weighted_error < 1e-7


def test_weighted_fit_wins_in_its_own_metric():
    """At equal ranks, fitting in the activation metric gives a lower activation-weighted
    error than the weight-space fit measured in that same metric (dense oracle)."""
    st, gen = stack(H=8, G=2, d=24, r=6, seed=3)
    wl = wr = whitener(random_moment(24, gen, spread=4))
    ranks = (4, 6, 6)
    plain = tucker(st, ranks, hooi_iters=2).to_tensor()
    weighted = weighted_tucker(st, ranks, wl, wr, hooi_iters=2).tucker.to_tensor()
    W = st.dense()

    def err(W_hat):
        return float((wl.S @ (W - W_hat) @ wr.S).norm() / (wl.S @ W @ wr.S).norm())

    assert err(weighted) < err(plain)


def test_whitened_svd_errors_and_allocation():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(17, 11, generator=gen, dtype=torch.float64)  # 16 inputs + a bias row
    C = random_moment(17, gen)
    w = whitener(C)
    sp = spectrum(W, w.S, w.S_inv, biased=True)
    f = factor(sp, 4)
    approx = f.down @ f.up
    assert f.weighted_error == pytest.approx(float((w.S @ (W - approx)).norm() / (w.S @ W).norm()), rel=1e-9)
    assert f.weight_error == pytest.approx(float((W - approx).norm() / W.norm()), rel=1e-9)
    # Eckart-Young in the metric: no rank-4 matrix does better there, e.g. the plain SVD's
    U, s, Vh = torch.linalg.svd(W)
    plain = (U[:, :4] * s[:4]) @ Vh[:4]
    assert f.weighted_error < float((w.S @ (W - plain)).norm() / (w.S @ W).norm())
    assert sp.params_dense == 16 * 11 and sp.step_cost == 16 + 11
    mats = [spectrum(torch.randn(16, n, generator=gen, dtype=torch.float64), None, None, False) for n in (16, 8, 4)]
    for budget in (50, 200, 400, 1000):
        ranks = allocate(mats, budget)
        assert sum(params_of(m, r) for m, r in zip(mats, ranks)) <= budget
    full = allocate(mats, sum(m.params_dense for m in mats))
    assert full == [None, None, None]  # everything fits dense: nothing is lost


@pytest.mark.slow
def test_calibrated_tucker_beats_uncalibrated_on_held_out_inputs(tmp_path):
    """Equal ranks per tensor; the attention logits and value-output products of every
    layer are compared on held-out text (inputs taken from the original model's own
    normed hidden states), calibrated vs weight-space Tucker."""
    from transformers import AutoTokenizer

    from tuckerctl.calibrate import collect_moments, windows
    from tuckerctl.compress import compress
    from tuckerctl.tucker_format import load

    model = save_tiny_lm(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    calib_ids = torch.tensor(tok(python_docs("calibration"), add_special_tokens=False)["input_ids"][:1200])
    test_ids = torch.tensor(tok(python_docs("evaluation"), add_special_tokens=False)["input_ids"][:600])
    moments = collect_moments(model, windows(calib_ids, 300))
    docs = {}
    for name, m in (("plain", None), ("calibrated", moments)):
        docs[name] = compress(tmp_path / "m", tmp_path / name, ranks="4,24,16", hooi_iters=1, device="cpu",
                              moments=m)
    with torch.no_grad():
        hs = [model(input_ids=w[None], output_hidden_states=True).hidden_states for w in windows(test_ids, 300)]
    from tuckerctl.adapters import detect
    from tuckerctl.loader import open_checkpoint

    ckpt = open_checkpoint(tmp_path / "m")
    adapter, spec = detect(ckpt)
    errs = {}
    for name in docs:
        ck = load(tmp_path / name)
        total = 0.0
        for i, layer in enumerate(model.model.layers):
            with torch.no_grad():
                x = torch.cat([layer.input_layernorm(h[i])[0] for h in hs]).double()
            lw = adapter.layer(ckpt, spec, i)
            t = ck.layer(i, dtype=torch.float64)
            pre_hat = t.pre_factors[1] @ t.pre_mixers() @ t.pre_factors[2].T  # either structure
            post_hat = torch.einsum("abc,ha,ib,jc->hij", t.post_core, *t.post_factors)
            for stack, W_hat in ((lw.pre, pre_hat), (lw.post, post_hat)):
                W = stack.to(dtype=torch.float64).dense()
                total += float((x @ (W - W_hat) @ x.T).norm() ** 2 / (x @ W @ x.T).norm() ** 2)
        errs[name] = total
    assert errs["calibrated"] < errs["plain"]
    assert docs["calibrated"]["summary"]["max_rel_error"] >= docs["plain"]["summary"]["max_rel_error"] * 0.999
