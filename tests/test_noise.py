"""Rounding-noise tolerances and method floors (tuckerctl.noise) against dense float64 oracles,
gguf's reference quantiser, and planted exact ranks."""

import numpy as np
import pytest
import torch

from tuckerctl.analysis import analyze_tensor
from tuckerctl.multilinear import HeadStack, reduce
from tuckerctl.noise import GGUF_EPS, mode_noise, relative_rms_error

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
