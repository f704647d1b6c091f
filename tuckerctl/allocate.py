"""Choosing Tucker ranks: fixed triples, per-mode energy, or a global parameter budget.

Pure functions of spectra and shapes. The budget allocation minimises the summed
truncated-HOSVD tail bounds (relative, squared) of all tensors under a parameter
budget, greedily by error decrease per added parameter.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from .ranks import energy_rank, tucker_params


@dataclass
class TensorSpectra:
    """What the allocator needs of one tensor (one layer's pre or post)."""

    shape: tuple[int, int, int]
    sigmas: tuple[list[float], list[float], list[float]]  # head, left, right; descending

    @property
    def limits(self) -> tuple[int, int, int]:
        return tuple(max(1, len(s)) for s in self.sigmas)

    @property
    def norm_sq(self) -> float:
        return sum(s * s for s in self.sigmas[0])


def rank_step(limit: int) -> int:
    """Granularity of rank changes: 1 for small modes, ~1/64 of the mode for big ones."""
    return max(1, limit // 64)


def energy_ranks(t: TensorSpectra, tau: float) -> tuple[int, int, int]:
    return tuple(max(1, energy_rank(s, tau)) for s in t.sigmas)


def _tails(sig: list[float]) -> list[float]:
    """tails[r] = sum_{i >= r} sigma_i^2."""
    out = [0.0] * (len(sig) + 1)
    for i in range(len(sig) - 1, -1, -1):
        out[i] = out[i + 1] + sig[i] * sig[i]
    return out


def allocate_budget(tensors: Sequence[TensorSpectra], budget: int) -> list[tuple[int, int, int]]:
    """Ranks for every tensor with total Tucker parameters <= ``budget``.

    Starts from (1, 1, 1) and repeatedly takes the single-mode rank step with the
    largest drop in relative tail bound per added parameter, among steps that still
    fit; stops when no step fits. So no mode can grow by one step within budget."""
    ranks = [[1, 1, 1] for _ in tensors]
    tails = [[_tails(s) for s in t.sigmas] for t in tensors]
    norms = [t.norm_sq or 1.0 for t in tensors]
    used = sum(tucker_params(t.shape, r) for t, r in zip(tensors, ranks))
    if used > budget:
        raise ValueError(f"budget {budget} is below the minimum of {used} parameters (all ranks 1)")

    def candidate(k: int, mode: int):
        t, r = tensors[k], ranks[k]
        lim = t.limits[mode]
        if r[mode] >= lim:
            return None
        new = list(r)
        new[mode] = min(lim, r[mode] + rank_step(lim))
        cost = tucker_params(t.shape, new) - tucker_params(t.shape, r)
        gain = (tails[k][mode][r[mode]] - tails[k][mode][new[mode]]) / norms[k]
        return (-gain / max(cost, 1), k, mode, new[mode], cost)

    heap = [c for k in range(len(tensors)) for m in range(3) if (c := candidate(k, m))]
    heapq.heapify(heap)
    while heap:
        score, k, mode, value, cost = heapq.heappop(heap)
        if ranks[k][mode] >= value:
            continue  # stale
        fresh = candidate(k, mode)
        if fresh is None or fresh[3] != value or fresh[4] != cost:
            if fresh:
                heapq.heappush(heap, fresh)
            continue
        if used + cost > budget:
            continue  # costs only grow as ranks grow: this step will never fit
        ranks[k][mode] = value
        used += cost
        # Growing one mode changes the cost of growing the other two modes of this tensor.
        for m in range(3):
            if (c := candidate(k, m)):
                heapq.heappush(heap, c)
    return [tuple(r) for r in ranks]
