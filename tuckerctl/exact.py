"""Exact errors of the formats a reviewer compares: truncated HOSVD at every rank triple of a
grid, and GQA-shaped formats for a given grouping of the heads.

Pure functions of a head stack (torch, no I/O), computed from the factors like everything in
:mod:`tuckerctl.multilinear`:

* **Truncated HOSVD at a grid of triples.** With the full HOSVD bases ``U1, U2, U3`` (leading
  eigenvectors of the three mode Grams) the full core ``C = W x1 U1^T x2 U2^T x3 U3^T`` is
  all-orthogonal, and truncating to ``(r1, r2, r3)`` keeps exactly the block ``C[:r1, :r2, :r3]``:
  ``||W - W_hat||^2 = ||W||^2 - sum_{i<r1, j<r2, k<r3} C[i, j, k]^2``. So one pass over the
  full core, binned on the grid, gives the exact truncated-HOSVD error of every grid triple
  (:func:`hosvd_residuals`); MLA-shaped truncations are the triples with ``r1 = H``.
* **GQA-shaped with a grouping.** Heads of a group share one key (value) matrix of width
  ``d_h``; each keeps its own query (output) side. For a fixed shared basis ``Y`` (n x d_h,
  orthonormal) the best per-head factor is ``W[h] Y``, so the optimum is Eckart-Young on the
  group's stacked key side ``[W[h]^T]_{h in g}``: the error is the tail beyond ``d_h`` of its
  singular values (:func:`gqa_residual`), a small SVD per group in reduced coordinates.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .multilinear import (
    HeadStack,
    Reduced,
    _r_factors,
    frobenius_norm_sq,
    head_gram,
    mode_spectra_with_bases,
    reduce,
)

# Above this many multiply-adds for the full core (H c2 c3 (r + H)), analyze skips the exact
# trade-off table and says so (Llama-3-8B shapes: 2e10, about 20 s per tensor on 2 CPU cores).
EXACT_TABLE_MAX_FLOPS = 4e9


ROUNDING_FLOOR = 1e-13


def full_widths(red: Reduced) -> tuple[int, int, int]:
    """Number of (structurally) nonzero singular values each mode can have: H, min(p, H k), min(q, H k)."""
    H, p, r = red.lc.shape
    q = red.rc.shape[1]
    return H, min(p, H * min(q, r)), min(q, H * min(p, r))


def table_flops(red: Reduced) -> float:
    H, c2, c3 = full_widths(red)
    return float(H) * c2 * c3 * (red.lc.shape[2] + H)


def _bins(grid: Sequence[int], width: int, device) -> tuple[Tensor, int]:
    """Index i (0-based) is kept by every grid rank g > i: bin = number of grid ranks <= i."""
    g = torch.as_tensor(sorted(set(int(x) for x in grid)), device=device)
    idx = torch.arange(width, device=device)
    return torch.searchsorted(g, idx, right=True), len(g)


def hosvd_bases(red: Reduced) -> tuple[Tensor, Tensor, Tensor]:
    """Full HOSVD bases of the reduced tensor: the head mode's eigenvectors (H x H) and the
    leading left singular vectors of the mode-2 and mode-3 unfoldings, ``full_widths`` of them."""
    return mode_spectra_with_bases(red)[1]


def hosvd_residuals(stack: HeadStack | Reduced, grids: Sequence[Sequence[int]],
                    bases: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, float]:
    """``R[a, b, c] = ||W - W_hat||_F^2`` of the truncated HOSVD at ranks
    ``(grids[0][a], grids[1][b], grids[2][c])`` (grids sorted ascending, deduplicated), and
    ``||W||_F^2``. Computed in the stack's dtype (use float64) from the full core, a block of
    mode-2 indices at a time. Residuals below ``ROUNDING_FLOOR * ||W||^2`` (relative errors
    below 3e-7) are rounding of the subtraction and are returned as 0. ``bases``: the
    :func:`hosvd_bases` of the stack when the caller has them already (analyze gets them with
    the spectra)."""
    red = stack if isinstance(stack, Reduced) else reduce(stack)
    H = red.lc.shape[0]
    dev = red.lc.device
    U1, V2, V3 = bases if bases is not None else hosvd_bases(red)
    c2, c3 = V2.shape[1], V3.shape[1]
    p, r = red.lc.shape[1:]
    dt = red.lc.dtype
    # Bins as 0/1 matrices, so binning the squared core is three GEMMs (index_add_ is not BLAS).
    def onehot(grid, width):
        bins, n = _bins(grid, width, dev)
        return torch.nn.functional.one_hot(bins, n + 1).to(dt)

    B1, B2, B3 = onehot(grids[0], H).T, onehot(grids[1], c2), onehot(grids[2], c3)
    lcat = red.lc.permute(1, 0, 2).reshape(p, H * r)
    rb = (V3.T @ red.rc)[red.group].transpose(1, 2)  # (H, r, c3)
    table = torch.zeros(B1.shape[0], B2.shape[1], B3.shape[1], dtype=dt, device=dev)
    step = max(1, (1 << 22) // max(1, H * c3))
    for s in range(0, c2, step):
        e = min(c2, s + step)
        # (H, e - s, c3): per-head slices in the mode-2/3 bases; then the head mode's basis.
        y = (V2[:, s:e].T @ lcat).reshape(e - s, H, r).transpose(0, 1) @ rb
        core = U1.T @ y.reshape(H, -1)
        binned = (B1 @ (core * core)).reshape(B1.shape[0], e - s, c3)
        table += B2[s:e].T @ binned @ B3
    kept = table.cumsum(0).cumsum(1).cumsum(2)[:-1, :-1, :-1]
    norm_sq = float(frobenius_norm_sq(red))
    resid = norm_sq - kept
    # ||W||^2 - kept cancels: below ROUNDING_FLOOR ||W||^2 the residual is rounding, i.e. exact.
    return torch.where(resid > ROUNDING_FLOOR * norm_sq, resid, torch.zeros_like(resid)), norm_sq


def _key_side_blocks(red: Reduced) -> Tensor:
    """Z_h = rc_g(h) S_h^T (H, q, k): [Z_h]_{h in S} has the singular values of the stacked
    right (key/value) side [W[h]^T]_{h in S}, for any S_h with S_h^T S_h = lc_h^T lc_h: the
    (transposed) Cholesky factors of the r x r Grams (one batched call; a loop of H thin QRs of d x r on a
    GPU), or the QRs' R when a Gram is singular (a zero or rank-deficient head)."""
    H, p, r = red.lc.shape
    if p >= r:
        L, info = torch.linalg.cholesky_ex(red.left_grams)
        if not bool(info.any()):
            return red.rc_heads @ L
    return red.rc_heads @ _r_factors(red.lc).transpose(1, 2)


def gqa_residual(stack: HeadStack | Reduced, groups: Sequence[Sequence[int]], width: int) -> float:
    """``min ||W - W_gqa||_F^2`` over GQA-shaped tensors whose heads in each group share one
    right-side (key/value) matrix of ``width`` columns: sum over groups of the tail beyond
    ``width`` of the singular values of the group's stacked right side."""
    red = stack if isinstance(stack, Reduced) else reduce(stack)
    return _gqa_residual(_key_side_blocks(red), groups, width, red)


def _gqa_residual(Z: Tensor, groups: Sequence[Sequence[int]], width: int, red: Reduced) -> float:
    """The tails from eigenvalues of symmetric matrices no larger than the block's rank bound
    (an SVD of each q x |S| d_h block was 5-50x slower on CPU, far more on CUDA).

    The block's Gram is ``sum_{h in S} rc_g lc_h^T lc_h rc_g^T = R D R^T`` with ``R = [rc_g]``
    over the stored groups g met in S and ``D`` block-diagonal (``M_g``: sum of ``lc_h^T lc_h``
    over the heads of S in g), so its nonzero eigenvalues are those of ``D^1/2 R^T R D^1/2``
    (t r square, t the number of such g): a block whose heads share one stored key matrix has
    rank <= r and, when r <= ``width``, a tail of exactly 0 (the SVD returned ~1e-32 ||W||^2)."""
    H, q, k = Z.shape
    r = red.rc.shape[2]
    # Grams of equal size are solved in one batched call and the tails summed on the device:
    # one solve and one host sync per group would leave a GPU mostly idle (hundreds per tensor).
    grams: dict[int, list[Tensor]] = {}
    owner = red.group.tolist()  # once: per group it was a host sync each
    for heads in groups:
        heads = list(heads)
        sources = sorted({owner[h] for h in heads})
        t = len(sources)
        if min(q, len(heads) * k, t * r) <= width:
            continue
        if t * r < min(q, len(heads) * k):  # smaller than the block itself: worth t small eighs
            idx = torch.as_tensor(heads, device=Z.device)
            src = torch.as_tensor(sources, device=Z.device)
            pos = torch.searchsorted(src, red.group[idx])
            # Summed per stored group by a 0/1 GEMM: a fixed order (index_add_'s CUDA atomics vary).
            onehot = (pos[None, :] == torch.arange(t, device=Z.device)[:, None]).to(Z.dtype)
            M = (onehot @ red.left_grams[idx].reshape(len(heads), r * r)).reshape(t, r, r)
            vals, vecs = torch.linalg.eigh(M)
            X = vecs * vals.clamp_min(0).sqrt()[:, None, :] @ vecs.transpose(1, 2)  # M_g^1/2
            Rs = red.rc[src].permute(1, 0, 2).reshape(q, t * r) @ torch.block_diag(*X)
            gram = Rs.T @ Rs
        else:
            block = Z[heads].permute(1, 0, 2).reshape(q, -1)
            gram = block.T @ block if block.shape[1] <= q else block @ block.T
        grams.setdefault(gram.shape[0], []).append(gram)
    total = torch.zeros((), dtype=Z.dtype, device=Z.device)
    for n, same in grams.items():
        ev = torch.linalg.eigvalsh(torch.stack(same))  # ascending: the tail is the smallest n - width
        total += ev[:, :max(0, n - width)].clamp_min(0).sum()
    return float(total)


def contiguous_groups(heads: int, groups: int) -> list[list[int]]:
    """Heads h with h // (H / G) = g, the grouping GQA checkpoints use."""
    size = heads // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]


def greedy_groups(stack: HeadStack | Reduced, groups: int) -> list[list[int]]:
    """A grouping of the heads into ``groups`` equal groups whose right (key/value) sides are
    alike: seeds the heaviest unassigned head, then adds the unassigned head most similar to
    the group (cosine of the heads' right-side Grams ``Z_h Z_h^T``, from an H x H Gram)."""
    red = stack if isinstance(stack, Reduced) else reduce(stack)
    return _greedy_groups(_key_side_similarity(_key_side_blocks(red)), groups)


def _key_side_similarity(Z: Tensor) -> Tensor:
    """The H x H Gram <Z_h Z_h^T, Z_h' Z_h'^T>-style similarity of the heads' key sides (float64, CPU)."""
    H = Z.shape[0]
    return head_gram(Z, Z, torch.arange(H, device=Z.device)).double().cpu()


def _greedy_groups(sim: Tensor, groups: int) -> list[list[int]]:
    # Ties go to the lowest head index. Each step scores every free head at once: a Python
    # loop over heads held the GIL ~0.5 s per tensor at 64 heads, 2 s at 128.
    H = sim.shape[0]
    diag = sim.diagonal().clamp_min(1e-300).sqrt()
    cos = sim / diag[:, None] / diag[None, :]
    weight = sim.diagonal()
    taken = torch.full((H,), -torch.inf, dtype=cos.dtype)
    size = H // groups
    free = torch.ones(H, dtype=torch.bool)
    out = []
    while bool(free.any()):
        seed = int(torch.where(free, weight, taken).argmax())
        group = [seed]
        free[seed] = False
        while len(group) < size:
            best = int(torch.where(free, cos[:, group].sum(dim=1), taken).argmax())
            group.append(best)
            free[best] = False
        out.append(sorted(group))
    return sorted(out)


def gqa_errors(stack: HeadStack | Reduced, groups: int | Sequence[int], width: int) -> dict | list[dict]:
    """Exact relative errors of the GQA-shaped format with ``groups`` groups: contiguous
    grouping, and the greedy regrouping (with the grouping when it is better). With a list of
    group counts, a list of results (the key-side blocks are computed once for all)."""
    red = stack if isinstance(stack, Reduced) else reduce(stack)
    norm_sq = float(frobenius_norm_sq(red))
    Z = _key_side_blocks(red)
    similarity = functools.cache(lambda: _key_side_similarity(Z))  # once for every regrouping

    if isinstance(groups, int):
        return _gqa_errors(Z, norm_sq, groups, width, red, similarity)
    return [_gqa_errors(Z, norm_sq, g, width, red, similarity) for g in groups]


def _gqa_errors(Z: Tensor, norm_sq: float, groups: int, width: int, red: Reduced, similarity) -> dict:
    rel = lambda x: (x / norm_sq) ** 0.5 if norm_sq > 0 else 0.0  # noqa: E731
    H = Z.shape[0]
    contiguous = _gqa_residual(Z, contiguous_groups(H, groups), width, red)
    if groups in (1, H):
        return {"groups": groups, "error_contiguous": rel(contiguous), "error_best": rel(contiguous),
                "best_grouping": None}
    regroup = _greedy_groups(similarity(), groups)
    same = regroup == contiguous_groups(H, groups)  # greedy_groups returns sorted groups
    other = contiguous if same else _gqa_residual(Z, regroup, width, red)
    better = other < contiguous * (1 - 1e-9)
    return {"groups": groups, "error_contiguous": rel(contiguous), "error_best": rel(min(contiguous, other)),
            "best_grouping": regroup if better else None}
