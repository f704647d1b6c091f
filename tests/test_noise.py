"""Rounding-noise tolerances and method floors (tuckerctl.noise) against dense float64 oracles,
gguf's reference quantiser, and planted exact ranks."""

import numpy as np
import pytest
import torch

from tuckerctl.analysis import analyze_tensor
from tuckerctl.multilinear import HeadStack, reduce
from tuckerctl.noise import GGUF_EPS, largest_eigenvalues, largest_sq_singular, mode_noise, relative_rms_error

f64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("H,G,d,r", [(8, 2, 64, 8), (6, 6, 48, 8), (4, 1, 40, 10)])
@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_noise_estimate_matches_the_actual_rounding_perturbation(H, G, d, r, dtype, name):
    g = torch.Generator().manual_seed(H + G)
    A = torch.randn(H, d, r, generator=g, **f64) * torch.logspace(0, -1, d, **f64)[:, None]
    B = torch.randn(G, d, r, generator=g, **f64) * 0.1
    exact, stored = HeadStack(A, B), HeadStack(A.to(dtype).double(), B.to(dtype).double())
    E = stored.dense() - exact.dense()
    true = [float(torch.linalg.matrix_norm(E.movedim(k, 0).reshape(E.shape[k], -1), 2)) for k in range(3)]
    eps = relative_rms_error(name)
    est = mode_noise(reduce(stored), d, d, eps, eps)
    for t, e in zip(true, est):
        assert 0.8 * t <= e <= 2.0 * t


def test_largest_eigenvalues_from_powers_match_eigvalsh():
    g = torch.Generator().manual_seed(3)
    for k in (1, 2, 9, 200):
        X = torch.randn(6, k, max(1, k // 2), generator=g, **f64)
        A = X @ X.mT
        A[2] = 0  # a zero matrix reads 0, not NaN
        want = torch.linalg.eigvalsh(A)[:, -1].clamp_min(0)
        got = largest_eigenvalues(A)
        assert got[2] == 0 and torch.allclose(got, want, rtol=1e-12, atol=0)
    bad = A.clone()
    bad[1, 0, 0] = float("nan")
    assert torch.isnan(largest_eigenvalues(bad)[1]) and not torch.isnan(largest_eigenvalues(bad)[0])
    # A repeated top eigenvalue (multiplicity 3): the bound's bias, ln(3) 2^-32, and no more.
    Q = torch.linalg.qr(torch.randn(40, 40, generator=g, **f64))[0]
    d = torch.cat([torch.ones(3, **f64), torch.linspace(0.7, 0, 37, **f64)])
    top = float(largest_eigenvalues(((Q * d) @ Q.T)[None])[0])
    assert 1 <= top <= 1 + 3e-10


def test_largest_singular_values_of_a_batch():
    g = torch.Generator().manual_seed(4)
    small = torch.randn(5, 300, 40, generator=g, **f64)  # Gram route (short side <= 256)
    assert largest_sq_singular(small) == pytest.approx(float(torch.linalg.svdvals(small)[:, 0].max()) ** 2, rel=1e-12)
    assert largest_sq_singular(small.mT) == pytest.approx(largest_sq_singular(small), rel=1e-12)
    big = torch.randn(3, 300, 280, generator=g, **f64) * torch.logspace(0, -2, 280, **f64)  # power iteration
    assert largest_sq_singular(big) == pytest.approx(float(torch.linalg.svdvals(big)[:, 0].max()) ** 2, rel=1e-6)


@pytest.mark.parametrize("H,G,p,r", [(16, 16, 40, 6), (12, 3, 30, 4), (6, 2, 300, 50)])
def test_mode_noise_terms_match_per_group_spectral_norms(H, G, p, r):
    """The batched per-group norms (one batch for MLA's group per head) against each group's
    float64 SVD, through the formulas of the module docstring."""
    g = torch.Generator().manual_seed(H * G)
    L = torch.randn(H, p, r, generator=g, **f64) * torch.logspace(0, -1, r, **f64)
    R = torch.randn(G, p, r, generator=g, **f64) * torch.logspace(0, -2, r, **f64)
    red = reduce(HeadStack(L, R))
    L, R = red.lc, red.rc
    per, m, n, eps = H // G, 2 * p, 3 * p, 1e-3
    norm2 = lambda X: float(torch.linalg.matrix_norm(X, 2)) ** 2  # noqa: E731
    side = lambda X: X.permute(1, 0, 2).reshape(X.shape[1], -1)  # noqa: E731
    fl2, fr2 = float((L * L).sum()), float((R * R).sum())
    sL2, sR2 = eps ** 2 * fl2 / (H * m * r), eps ** 2 * fr2 / (G * n * r)
    L2, R2 = norm2(side(L)), norm2(side(R))
    Lg2 = max(norm2(side(L[k * per:(k + 1) * per])) for k in range(G))
    Rg2 = max(norm2(R[k]) for k in range(G))
    RgF = float((R * R).sum(dim=(1, 2)).max())
    K = max(norm2(L[k * per:(k + 1) * per].reshape(per, -1)) for k in range(G))
    want = (((sL2 * m * RgF + sR2 * n * K) ** 0.5 + (sL2 * per * R2 + sR2 * L2) ** 0.5),
            ((sL2 * per * fr2 + sR2 * n * L2) ** 0.5 + (sL2 * m * Rg2 + sR2 * K) ** 0.5),
            ((sR2 * fl2 + sL2 * m * per * R2) ** 0.5 + (sR2 * n * Lg2 + sL2 * RgF) ** 0.5))
    got = mode_noise(red, m, n, eps, eps)
    rel = 1e-2 if min(p, r * H) > 256 else 1e-10  # 40 power iterations above 256 on the short side
    assert got == pytest.approx(want, rel=rel)


def test_float_rounding_model_matches_measured_relative_error():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0), **f64)
    for dtype, name in [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")]:
        rel = ((x.to(dtype).double() - x) / x)
        assert float(rel.square().mean().sqrt()) == pytest.approx(relative_rms_error(name), rel=0.05)


def test_gguf_step_model_matches_the_reference_quantiser():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        t = gguf.GGMLQuantizationType[name]
        y = dequantize(quantize(x, t), t)
        measured = float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))
        assert GGUF_EPS[name] == pytest.approx(measured, rel=0.06)


def test_gram_path_floor_keeps_the_structural_rank_of_float64_weights():
    """A query mode of exact rank 450 computed through the float64 Gram (p = 600 > 512): a
    tolerance of 1e-12 would count rounding of the Gram; the floor clamps it."""
    g = torch.Generator().manual_seed(1)
    H, d, r = 20, 700, 30
    U = torch.linalg.qr(torch.randn(d, 450, generator=g, **f64))[0]
    A = U @ torch.randn(H, 450, r, generator=g, **f64)
    B = torch.randn(H, d, r, generator=g, **f64)
    out = analyze_tensor(HeadStack(A, B), ("head", "query", "key"), (0.9,), 1e-12, "cpu")
    q = out["modes"]["query"]
    assert len(q["singular_values"]) == 600  # really the Gram path with 150 rounding-level values
    assert q["structural_rank"] == 450 and q["numerical_rank"] == 450 and q["tol"] > 1e-12
    assert out["modes"]["key"]["structural_rank"] == out["modes"]["key"]["ceiling"]


def test_numerical_rank_drops_planted_small_directions_below_bf16_noise():
    """Rank-8 signal plus 8 directions at 1e-5 of it, stored in bf16: the structural rank sees all
    16, the numerical rank only the 8 that stand above bf16 rounding."""
    g = torch.Generator().manual_seed(2)
    H, d, r = 4, 64, 16
    scale = torch.cat([torch.ones(8, **f64), torch.full((8,), 1e-5, **f64)])
    A = torch.randn(H, d, r, generator=g, **f64) * scale
    B = torch.randn(H, d, r, generator=g, **f64)
    stored = HeadStack(A.to(torch.bfloat16).double(), B.to(torch.bfloat16).double())
    out = analyze_tensor(stored, ("head", "query", "key"), (0.9,), None, "cpu", eps=relative_rms_error("BF16"))
    assert out["modes"]["key"]["structural_rank"] == 64
    assert out["modes"]["query"]["numerical_rank"] == 32  # 4 heads x 8 strong directions


def test_qk_norm_gauge_makes_spectra_invariant_to_per_head_rescaling():
    """Per-head qk-norm removes each head's query scale and each group's key scale; after the
    gauge fix the analysis no longer depends on them (without it the query mode does)."""
    from tuckerctl.analysis import gauge_fixed
    from tuckerctl.multilinear import mode_spectra

    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(6, 24, 4, generator=g, **f64), torch.randn(2, 24, 4, generator=g, **f64)
    c = torch.tensor([0.1, 3.0, 1.0, 7.0, 0.5, 2.0], **f64)[:, None, None]
    k = torch.tensor([0.2, 5.0], **f64)[:, None, None]
    base, scaled = HeadStack(A, B), HeadStack(A * c, B * k)
    raw = [mode_spectra(s).left for s in (base, scaled)]
    assert not torch.allclose(raw[0] / raw[0][0], raw[1] / raw[1][0], rtol=1e-3)
    fixed = [mode_spectra(gauge_fixed(s)) for s in (base, scaled)]
    for a, b in zip(fixed[0], fixed[1]):
        assert torch.allclose(a / a[0], b / b[0], rtol=1e-10, atol=1e-12)
