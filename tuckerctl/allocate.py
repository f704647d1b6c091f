"""Choosing Tucker ranks: fixed triples, per-mode energy, or a global parameter budget.

Pure functions of spectra, exact error tables and shapes. The budget allocation minimises the
sum over tensors of the relative squared error of each tensor's truncation:

* the **exact** truncated-HOSVD error when the tensor carries a residual table on its rank
  grid (:func:`tuckerctl.exact.hosvd_residuals`; compress computes it for tensors of moderate
  size), else the HOSVD tail bound ``sum_n sum_{i > r_n} sigma_i^2`` (an upper bound, 8-15%
  above the exact error on real attention, which made the tail-bound optimum up to 27% worse
  in true error than the best allocation on tiny cases);
* over **feasible** triples only: a Tucker core of ranks (r1, r2, r3) has each rank at most
  the product of the other two (r3 > r1 r2 buys parameters the core cannot use).

It grows ranks greedily by error decrease per added parameter (a step that would break
feasibility also raises the cheaper of the ranks it needs), then refines by exchanges: one
rank step taken away somewhere and one given elsewhere, while that lowers the objective and
fits the budget; then fills the budget greedily again.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from .ranks import energy_rank, tucker_params


@dataclass
class TensorSpectra:
    """What the allocator needs of one tensor (one layer's pre or post).

    ``residual_sq`` (optional): exact ``||W - W_hat||^2`` of the truncated HOSVD at every triple
    of ``grid`` (three ascending rank lists; see :func:`allocation_grid`). ``tucker``: ranks are
    a Tucker triple (feasibility applies); False for structures that keep the head mode whole."""

    shape: tuple[int, int, int]
    sigmas: tuple[list[float], list[float], list[float]]  # head, left, right; descending
    residual_sq: object | None = None  # nested lists or array, indexed like the grid
    grid: tuple[list[int], list[int], list[int]] | None = None
    tucker: bool = True

    @property
    def limits(self) -> tuple[int, int, int]:
        return tuple(max(1, len(s)) for s in self.sigmas)

    @property
    def norm_sq(self) -> float:
        return sum(s * s for s in self.sigmas[0])


def rank_step(limit: int) -> int:
    """Granularity of rank changes: 1 for small modes, ~1/64 of the mode for big ones."""
    return max(1, limit // 64)


def allocation_grid(limits: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """The ranks the allocator may choose per mode: 1, then multiples of the rank step, and the limit."""
    out = []
    for lim in limits:
        step = rank_step(lim)
        out.append(sorted({1, lim, *range(step, lim + 1, step)}))
    return tuple(out)


def energy_ranks(t: TensorSpectra, tau: float) -> tuple[int, int, int]:
    return tuple(max(1, energy_rank(s, tau)) for s in t.sigmas)


def _tails(sig: list[float]) -> list[float]:
    """tails[r] = sum_{i >= r} sigma_i^2."""
    out = [0.0] * (len(sig) + 1)
    for i in range(len(sig) - 1, -1, -1):
        out[i] = out[i + 1] + sig[i] * sig[i]
    return out


def feasible(r: Sequence[int]) -> bool:
    """Each Tucker rank at most the product of the other two."""
    return r[0] <= r[1] * r[2] and r[1] <= r[0] * r[2] and r[2] <= r[0] * r[1]


class _Problem:
    """Objective and moves on grid indices for every tensor."""

    def __init__(self, tensors: Sequence[TensorSpectra]):
        self.tensors = tensors
        self.grids = [t.grid if t.grid is not None and t.residual_sq is not None else allocation_grid(t.limits)
                      for t in tensors]
        self.tails = [[_tails(s) for s in t.sigmas] for t in tensors]
        self.norms = [t.norm_sq or 1.0 for t in tensors]

    def ranks(self, k: int, idx) -> tuple[int, int, int]:
        return tuple(self.grids[k][m][i] for m, i in enumerate(idx))

    def error(self, k: int, idx) -> float:
        """Relative squared error of tensor k at grid indices ``idx``."""
        t = self.tensors[k]
        if t.residual_sq is not None and t.grid is not None:
            a, b, c = idx
            return float(t.residual_sq[a][b][c]) / self.norms[k]
        r = self.ranks(k, idx)
        tails = self.tails[k]
        return min(1.0, sum(tails[m][min(r[m], len(tails[m]) - 1)] for m in range(3)) / self.norms[k])

    def params(self, k: int, idx) -> int:
        return tucker_params(self.tensors[k].shape, self.ranks(k, idx))

    def ok(self, k: int, idx) -> bool:
        return not self.tensors[k].tucker or feasible(self.ranks(k, idx))

    def grow(self, k: int, idx, mode: int):
        """Indices after one step up in ``mode``, raising the cheapest other rank as needed to
        stay feasible; None at the top."""
        g = self.grids[k]
        if idx[mode] + 1 >= len(g[mode]):
            return None
        new = list(idx)
        new[mode] += 1
        while not self.ok(k, new):
            options = []
            for m in range(3):
                if m != mode and new[m] + 1 < len(g[m]):
                    cand = list(new)
                    cand[m] += 1
                    options.append((self.params(k, cand), cand))
            if not options:
                return None
            new = min(options)[1]
        return tuple(new)

    def shrink(self, k: int, idx, mode: int):
        """Indices after one step down in ``mode`` if that stays feasible, else None."""
        if idx[mode] == 0:
            return None
        new = list(idx)
        new[mode] -= 1
        return tuple(new) if self.ok(k, new) else None


def _greedy(prob: _Problem, state: list, used: int, budget: int) -> int:
    """Grow ranks by error decrease per added parameter while steps fit; returns params used."""

    def candidate(k: int, mode: int):
        new = prob.grow(k, state[k], mode)
        if new is None:
            return None
        cost = prob.params(k, new) - prob.params(k, state[k])
        gain = prob.error(k, state[k]) - prob.error(k, new)
        return (-gain / max(cost, 1), k, mode, new, cost, state[k])

    heap = [c for k in range(len(state)) for m in range(3) if (c := candidate(k, m))]
    heapq.heapify(heap)
    while heap:
        _, k, mode, new, cost, base = heapq.heappop(heap)
        if state[k] != base:
            continue  # stale: this tensor moved since
        if used + cost > budget:
            continue  # bigger steps of the same mode cost more: skip it for good
        state[k] = new
        used += cost
        for m in range(3):
            if (c := candidate(k, m)):
                heapq.heappush(heap, c)
    return used


def _exchange(prob: _Problem, state: list, used: int, budget: int, rounds: int = 200) -> int:
    """Best improving pair (one step down somewhere, one step up elsewhere) within budget,
    repeated while the objective drops."""
    K = len(state)
    for _ in range(rounds):
        downs = []
        for k in range(K):
            for m in range(3):
                new = prob.shrink(k, state[k], m)
                if new is not None:
                    downs.append((prob.error(k, new) - prob.error(k, state[k]),
                                  prob.params(k, state[k]) - prob.params(k, new), k, new))
        ups = []
        for k in range(K):
            for m in range(3):
                new = prob.grow(k, state[k], m)
                if new is not None:
                    ups.append((prob.error(k, state[k]) - prob.error(k, new),
                                prob.params(k, new) - prob.params(k, state[k]), k, new))
        best = None
        for loss, freed, kd, nd in downs:
            for gain, cost, ku, nu in ups:
                if kd == ku:
                    continue  # moves of one tensor interact; single-tensor changes come from the greedy
                if used - freed + cost <= budget and gain - loss > 1e-15 and (best is None or gain - loss > best[0]):
                    best = (gain - loss, kd, nd, ku, nu, cost - freed)
        for k in range(K):  # within one tensor: a step down in one mode, up in another
            for a in range(3):
                down = prob.shrink(k, state[k], a)
                for b in range(3):
                    if down is None or b == a or (both := prob.grow(k, down, b)) is None:
                        continue
                    delta = prob.params(k, both) - prob.params(k, state[k])
                    gain = prob.error(k, state[k]) - prob.error(k, both)
                    if used + delta <= budget and gain > 1e-15 and (best is None or gain > best[0]):
                        best = (gain, k, both, k, both, delta)
        if best is None:
            break
        _, kd, nd, ku, nu, delta = best
        state[kd], state[ku] = nd, nu
        used += delta
        used = _greedy(prob, state, used, budget)
    return used


def allocate_budget(tensors: Sequence[TensorSpectra], budget: int) -> list[tuple[int, int, int]]:
    """Ranks for every tensor with total Tucker parameters <= ``budget`` (module docstring):
    feasible triples, exact errors where tables are given, greedy growth then exchanges."""
    prob = _Problem(tensors)
    state = [(0, 0, 0) for _ in tensors]
    used = sum(prob.params(k, s) for k, s in enumerate(state))
    if used > budget:
        raise ValueError(f"budget {budget} is below the minimum of {used} parameters (all ranks 1)")
    used = _greedy(prob, state, used, budget)
    _exchange(prob, state, used, budget)
    return [prob.ranks(k, s) for k, s in enumerate(state)]


def objective(tensors: Sequence[TensorSpectra], ranks: Sequence[Sequence[int]]) -> float:
    """Sum of relative squared errors of the given ranks (exact where tables are given); for tests
    and reports. Ranks must lie on each tensor's grid when it has a table."""
    prob = _Problem(tensors)
    total = 0.0
    for k, r in enumerate(ranks):
        idx = tuple(prob.grids[k][m].index(int(r[m])) for m in range(3))
        total += prob.error(k, idx)
    return total
