"""How far down a mode spectrum the stored weights are resolved: rounding noise and method floor.

**Rounding model.** A stored factor ``F`` carries an error ``dF`` with independent entries of
standard deviation ``s = eps * rms(F)``, where ``eps`` is the relative rms error of the storage:

* floats with p significand bits (round to nearest): ``eps = 2^-p / sqrt(8 ln 2)`` (the mean
  of ``(ulp/2)^2 / 3 / x^2`` over a binade, x log-uniform): BF16 1.7e-3, F16 2.1e-4, F32 2.5e-8;
* GGUF block quantisers: ``eps = step / sqrt(12)`` relative to the rms of Gaussian weights, with
  the step of each type (symmetric b bits: block absmax / 2^(b-1); asymmetric: block range /
  (2^b - 1)); :data:`GGUF_EPS` (checked against gguf's reference quantiser where it has one).

**Noise of a mode unfolding.** With ``W[h] = L_h R_g^T``, the rounding moves each unfolding by
a sum of random matrices ``X = [dL_h R_g^T + L_h dR_g^T]``; its spectral norm is about
``sqrt(||E[X X^T]||) + sqrt(||E[X^T X]||)`` (exact for i.i.d. matrices, s (sqrt(m) + sqrt(n))).
For the right (key/value) mode that is (``||.||_2`` spectral norms of the factors laid side by side,
``L_(g)`` the heads of group g, ``K_g`` the Gram of the vectorised ``L_h`` of group g)::

    nu_3 = sqrt(s_R^2 ||L||_F^2 + s_L^2 m (H/G) ||R||_2^2) + sqrt(s_R^2 n max_g ||L_(g)||_2^2 + s_L^2 max_g ||R_g||_F^2)
    nu_2 = sqrt(s_L^2 (H/G) ||R||_F^2 + s_R^2 n ||L||_2^2) + sqrt(s_L^2 m max_g ||R_g||_2^2 + s_R^2 max_g ||K_g||_2)
    nu_1 = sqrt(s_L^2 m max_h ||R_g(h)||_F^2 + s_R^2 n max_g ||K_g||_2) + sqrt(s_L^2 (H/G) ||R||_2^2 + s_R^2 ||L||_2^2)

By Weyl's inequality a singular value below ``nu`` cannot be told from one that rounding created
or destroyed: the numerical rank counts ``sigma_i > nu``, i.e. ``tol = nu / sigma_1``.

**Method floor.** Modes whose spectra come from a float64 Gram (wide modes, the head mode, RoPE
averages) resolve singular values down to about ``sqrt(eps_64) sigma_1`` only; an SVD of the
small reduced matrix to about ``max(dims) eps_64 sigma_1``. Tolerances are clamped to the floor,
and the *structural* rank (the rank the stored weights have in exact arithmetic, as far as the
method resolves it) counts the values above the floor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .multilinear import _GRAM_ABOVE, Reduced

FLOAT_BITS = {"F64": 53, "F32": 24, "F16": 11, "BF16": 8, "F8_E4M3": 4, "F8_E5M2": 3}
GGUF_EPS = {"Q8_0": 5.4e-3, "Q4_0": 8.6e-2, "Q4_1": 8.1e-2, "Q5_0": 4.3e-2, "Q5_1": 3.9e-2,
            "Q2_K": 3.5e-1, "Q3_K": 1.5e-1, "Q4_K": 8.1e-2, "Q5_K": 3.9e-2, "Q6_K": 1.9e-2,
            "F16": None, "BF16": None, "F32": None, "F64": None}
EPS64 = 2.0 ** -52
GRAM_FLOOR = 10 * math.sqrt(EPS64)  # 1.5e-7: eigvalsh of a float64 Gram, square-rooted


def relative_rms_error(dtype: str) -> float:
    """Relative rms storage error of a tensor stored as ``dtype`` (safetensors or GGUF type name)."""
    if dtype in FLOAT_BITS:
        return 2.0 ** -FLOAT_BITS[dtype] / math.sqrt(8 * math.log(2))
    eps = GGUF_EPS.get(dtype)
    if eps is None:
        raise ValueError(f"no rounding model for dtype {dtype}")
    return eps


# Largest eigenvalues of small Grams from 2^SQUARINGS-th powers (below): biased up by at most
# ln(k) 2^-32 relative (2e-9 at k = 8192). Above SMALL_SIDE, power iteration on the factors.
SQUARINGS = 32
SMALL_SIDE = 256


def largest_eigenvalues(grams: Tensor) -> Tensor:
    """Largest eigenvalue of each PSD matrix of a batch (B, k, k), from traces of powers:
    lambda_1 <= tr(A^(2^J))^(2^-J) <= k^(2^-J) lambda_1. Each step squares the trace-normalised
    matrix (one batched GEMM, no host sync, no eigensolver: a loop of cuSOLVER calls on small
    matrices costs ~2 ms each on a GPU, 394 of them per DeepSeek-V3 tensor with a group per head)."""
    traces = grams.diagonal(dim1=-2, dim2=-1).sum(-1)
    scale = traces.clamp_min(1e-300)
    X = grams / scale[:, None, None]
    log_mu = torch.zeros_like(traces)
    for j in range(SQUARINGS):
        X = X @ X
        t = X.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)
        log_mu += t.log() / 2 ** (j + 1)
        X = X / t[:, None, None]
    # A zero matrix reads 0; a NaN stays NaN (never masked as 0).
    return torch.where(traces != 0, scale * log_mu.exp(), torch.zeros_like(traces))


def largest_sq_singular(blocks: Tensor, iters: int = 40) -> float:
    """max over a batch (B, a, b) of the squared largest singular values: from the small side's
    Grams when min(a, b) <= SMALL_SIDE, else by ``iters`` steps of batched power iteration."""
    a, b = blocks.shape[-2:]
    if min(a, b) <= SMALL_SIDE:
        grams = blocks.mT @ blocks if b <= a else blocks @ blocks.mT
        return float(largest_eigenvalues(grams).max())
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(b, 1, generator=g, dtype=blocks.dtype).to(blocks.device).expand(blocks.shape[0], b, 1)
    for _ in range(iters):
        v = blocks.mT @ (blocks @ v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return float((blocks @ v).norm(dim=1).max()) ** 2


def _side(x: Tensor) -> Tensor:
    """(k, p, r) -> p x (k r): the factors laid side by side."""
    return x.permute(1, 0, 2).reshape(x.shape[1], -1)


def mode_noise(red: Reduced, m: int, n: int, eps_left: float, eps_right: float) -> tuple[float, float, float]:
    """Estimated spectral norm of the rounding perturbation of the head, left and right
    unfoldings (module docstring). ``m``, ``n``: stored rows of the left/right factors."""
    L, R = red.lc, red.rc
    H, p, r = L.shape
    G = R.shape[0]
    per = H // G
    fl2, fr2 = float((L * L).sum()), float((R * R).sum())
    sL2 = eps_left ** 2 * fl2 / max(1, H * m * r)
    sR2 = eps_right ** 2 * fr2 / max(1, G * n * r)
    L2 = largest_sq_singular(_side(L)[None])
    R2 = largest_sq_singular(_side(R)[None])
    # One stored group (MQA, MLA): the per-group sides are the whole sides, already measured.
    # Otherwise every group at once (a batch): MLA-like stacks have a group per head.
    Lg2 = L2 if G == 1 else largest_sq_singular(L.reshape(G, per, p, r).permute(0, 2, 1, 3).reshape(G, p, per * r))
    Rg2 = R2 if G == 1 else largest_sq_singular(R)
    RgF = float((R * R).sum(dim=(1, 2)).max())
    flat = L.reshape(G, per, -1)
    K = float(largest_eigenvalues(flat @ flat.mT).max())
    nu3 = math.sqrt(sR2 * fl2 + sL2 * m * per * R2) + math.sqrt(sR2 * n * Lg2 + sL2 * RgF)
    nu2 = math.sqrt(sL2 * per * fr2 + sR2 * n * L2) + math.sqrt(sL2 * m * Rg2 + sR2 * K)
    nu1 = math.sqrt(sL2 * m * RgF + sR2 * n * K) + math.sqrt(sL2 * per * R2 + sR2 * L2)
    return nu1, nu2, nu3


def resolution(red: Reduced, averaged: bool = False) -> tuple[float, float, float]:
    """Relative floor (of sigma_1) below which each mode's computed singular values are
    rounding of the computation itself (module docstring)."""
    H, p, r = red.lc.shape
    q = red.rc.shape[1]
    if averaged:
        return GRAM_FLOOR, GRAM_FLOOR, GRAM_FLOOR
    svd = lambda rows, cols: max(rows, cols) * EPS64 * 4  # noqa: E731
    left = GRAM_FLOOR if min(p, H * min(q, r)) > _GRAM_ABOVE else svd(p, H * min(q, r))
    right = GRAM_FLOOR if min(q, H * min(p, r)) > _GRAM_ABOVE else svd(q, H * min(p, r))
    return GRAM_FLOOR, left, right
