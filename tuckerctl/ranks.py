"""Effective ranks, ceilings and parameter counts (docs/mathematics.md sections 2, 3 and 6).

Pure functions of singular values and shapes (numpy; torch only inside :func:`mode_summary`),
no I/O: ``report`` and ``pareto`` use them without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_ENERGY = (0.9, 0.99, 0.999)


def _values(sigma) -> np.ndarray:
    """float64 numpy copy of a list, array or (any-device) torch tensor of singular values."""
    if hasattr(sigma, "detach"):
        sigma = sigma.detach().cpu().double().numpy()
    return np.asarray(sigma, dtype=np.float64)


def energy_rank(sigma: Sequence[float], tau: float) -> int:
    """Smallest r with sum_{i<=r} sigma_i^2 >= tau * sum sigma_i^2 (0 for an all-zero spectrum).

    The relative slack of 1e-12 keeps tau = 1 at the last nonzero value despite rounding."""
    s = _values(sigma)
    cum = np.cumsum(s * s)
    if not len(cum) or cum[-1] <= 0:
        return 0
    return min(len(s), int(np.searchsorted(cum, tau * float(cum[-1]) * (1 - 1e-12))) + 1)


def numerical_rank(sigma: Sequence[float], tol: float) -> int:
    """Count of sigma_i > tol * sigma_1 (sigma in decreasing order)."""
    s = _values(sigma)
    if not len(s) or s[0] <= 0:
        return 0
    return int((s > tol * s[0]).sum())


def mode_summary(sigma: Sequence[float], size: int, ceiling: int,
                 energies: Sequence[float], tol: float, floor: float = 0.0) -> dict:
    """The per-mode record of the analysis JSON (``M`` in the README): energy and
    numerical ranks as defined above, entropy rank exp(-sum p_i log p_i) with
    p_i = sigma_i / sum sigma, and stable rank sum sigma_i^2 / sigma_1^2. Vectorised:
    thousands of values per mode, six modes per layer, every layer. ``tol``: relative tolerance of
    the numerical rank (recorded as ``tol``); ``floor``: relative level below which the computation
    does not resolve values: the structural rank counts the values above it."""
    import torch

    s = torch.as_tensor(sigma, dtype=torch.float64).cpu()
    out = {"size": size, "ceiling": ceiling, "numerical_rank": 0, "structural_rank": 0, "tol": tol,
           "energy_ranks": {f"{t:g}": 0 for t in energies}, "entropy_rank": 0.0, "stable_rank": 0.0,
           "singular_values": s.tolist()}
    if not len(s) or s[0] <= 0:
        return out
    sq = s * s
    total = float(torch.cumsum(sq, 0)[-1])  # summed in order, as energy_rank does
    p = s[s > 0] / s.sum()
    out.update(
        numerical_rank=numerical_rank(s, tol),
        structural_rank=numerical_rank(s, floor),
        energy_ranks={f"{t:g}": energy_rank(s, t) for t in energies},
        entropy_rank=float(torch.exp(-(p * torch.log(p)).sum())),
        stable_rank=total / float(sq[0]),
    )
    return out


def tucker_params(shape: Sequence[int], ranks: Sequence) -> int:
    """Parameters of one Tucker tensor: r1 r2 r3 + H r1 + m r2 + n r3 (elementwise when the
    ranks are numpy arrays)."""
    (H, m, n), (r1, r2, r3) = shape, ranks
    return r1 * r2 * r3 + H * r1 + m * r2 + n * r3


def family_ceilings(attention: str, d: int, heads: int, kv_heads: int, head_dim: int,
                    value_dim: int | None = None, q_lora_rank: int | None = None,
                    kv_lora_rank: int | None = None, rope_dim: int = 0) -> dict:
    """docs/mathematics.md section 2: (head, query, key) and (head, output, value) rank ceilings."""
    dv = value_dim or head_dim
    if attention == "MLA":
        q = min(d, q_lora_rank) if q_lora_rank else min(d, heads * head_dim)
        return {"pre": (heads, q, min(d, kv_lora_rank + rope_dim)),
                "post": (heads, min(d, heads * dv), min(d, kv_lora_rank))}
    return {"pre": (heads, min(d, heads * head_dim), min(d, kv_heads * head_dim)),
            "post": (heads, min(d, heads * dv), min(d, kv_heads * dv))}
