"""RoPE-faithful spectra of the query-key tensor: mode Grams averaged over a range of offsets.

With RoPE the logit of head h between positions i and j is ``x_i A_h R(i - j) B_g^T x_j^T``:
the pre-softmax object is the family ``W_t[h] = A_h R(t) B_g^T`` over offsets t. Spans (and so
ranks and ceilings) do not depend on t, energies do. Averaged over ``t = 0 .. T-1``:

* query mode: ``(1/T) sum_t sum_h W_t[h] W_t[h]^T = sum_h A_h Mbar_g A_h^T`` with
  ``Mbar = (1/T) sum_t R(t) (B_g^T B_g) R(t)^T``;
* key mode: the same with the roles swapped and ``R(t)^T``;
* head mode: ``(1/T) sum_t <W_t[h], W_t[h']> = <A_h^T A_h', (1/T) sum_t R(t) (B_g^T B_g') R(t)^T>``.

Their eigenvalues are the squared singular values of the unfoldings stacked over all T offsets,
divided by T; the leading eigenvectors are the subspaces that minimise the offset-averaged
error of projecting that side (:func:`averaged_side_bases`). ``R(t)`` is transformers'
``rotate_half`` convention (coordinate j pairs with j + rot/2, frequency ``inv_freq[j]``;
coordinates beyond the rotary width are not rotated), and the average of ``R M R^T`` has a
closed form per entry: only cos/sin products of the two coordinates' frequencies enter.
Pure functions of the factors; no I/O.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .multilinear import (
    HeadStack,
    ModeSpectra,
    Reduced,
    SpectrumProblem,
    _sandwich_sum,
    _top_eigvecs,
    group_sums,
    reduce,
)

DEFAULT_OFFSETS = 2048
_HEAD_BLOCK_ELEMENTS = 1 << 22  # the averaged head Gram is built a block of heads at a time


@dataclass(frozen=True)
class Rotation:
    """RoPE on one head of width ``head_dim``: pairs (j, j + rot/2) rotate at ``inv_freq[j]``,
    ``rot = 2 len(inv_freq)``; coordinates from ``rot`` on are not rotated."""

    head_dim: int
    inv_freq: Tensor

    @classmethod
    def from_theta(cls, head_dim: int, theta: float, partial: float = 1.0) -> Rotation:
        """The default RoPE schedule ``theta^(-2j/rot)`` (no frequency scaling)."""
        rot = int(head_dim * partial) // 2 * 2
        return cls(head_dim, 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)))

    @classmethod
    def from_model(cls, model: dict) -> Rotation:
        """From an analysis ``model`` record (or ``ModelSpec.as_dict()``): head_dim, rope_theta,
        partial_rotary_factor."""
        return cls.from_theta(int(model["head_dim"]), float(model.get("rope_theta") or 10000.0),
                              float(model.get("partial_rotary_factor") or 1.0))

    def _parts(self, offsets: int, device, dtype) -> tuple[Tensor, Tensor, Tensor]:
        """a(t), b(t) (T, d_h) with R(t)[i, i] = a_i(t), R(t)[i, p(i)] = b_i(t); and p."""
        half = len(self.inv_freq)
        t = torch.arange(offsets, dtype=torch.float64)[:, None]
        ang = t * self.inv_freq.to(torch.float64)[None, :]
        ones = torch.ones(offsets, self.head_dim - 2 * half, dtype=torch.float64)
        a = torch.cat([ang.cos(), ang.cos(), ones], dim=1)
        b = torch.cat([ang.sin(), -ang.sin(), torch.zeros_like(ones)], dim=1)
        idx = torch.arange(self.head_dim)
        p = torch.cat([idx[half:2 * half], idx[:half], idx[2 * half:]])
        return a.to(device, dtype), b.to(device, dtype), p.to(device)

    def averager(self, offsets: int, device=None, dtype=torch.float64) -> Averager:
        """The offset averages (same for every layer of a model: cached)."""
        return _averager(self.head_dim, tuple(self.inv_freq.tolist()), offsets, str(device or "cpu"), dtype)


@functools.lru_cache(maxsize=8)
def _averager(head_dim: int, inv_freq: tuple, offsets: int, device: str, dtype) -> Averager:
    a, b, p = Rotation(head_dim, torch.tensor(inv_freq, dtype=torch.float64))._parts(offsets, device, dtype)
    T = float(offsets)
    avg = Averager(a.T @ a / T, a.T @ b / T, b.T @ b / T, p)
    if a.is_cuda:  # cached for every thread: done before another thread's stream reads it
        torch.cuda.current_stream(a.device).synchronize()
    return avg


@dataclass(frozen=True)
class Averager:
    """``mean_t R(t) M R(t)^T`` (``sign=+1``) or ``mean_t R(t)^T M R(t)`` (``sign=-1``) for
    batches of d_h x d_h matrices M, from the offset averages of the rotation's entries."""

    aa: Tensor
    ab: Tensor
    bb: Tensor
    partner: Tensor

    def __call__(self, M: Tensor, sign: int = 1) -> Tensor:
        p = self.partner
        ab = sign * self.ab
        return (self.aa * M + ab * M[..., :, p] + ab.T * M[..., p, :] + self.bb * M[..., p, :][..., :, p])


def _head_gram(red: Reduced, avg: Averager) -> Tensor:
    """Offset-averaged head Gram: G[h, h'] = <lc_h^T lc_h', avg(rc_g^T rc_g')>."""
    H, p, r = red.lc.shape
    rr = torch.einsum("gqi,kqj->gkij", red.rc, red.rc)  # (G, G, r, r)
    pbar = avg(rr)
    lcat = red.lc.permute(1, 0, 2).reshape(p, H * r)
    out = torch.empty(H, H, dtype=red.lc.dtype, device=red.lc.device)
    step = max(1, _HEAD_BLOCK_ELEMENTS // max(1, H * r * r))
    # G is symmetric (avg(M^T) = avg(M)^T): each block of rows is computed from its diagonal
    # block on and mirrored below it, half the flops of the full products.
    for s in range(0, H, step):
        e = min(H, s + step)
        n = (lcat[:, s * r:e * r].T @ lcat[:, s * r:]).reshape(e - s, r, H - s, r).permute(0, 2, 1, 3)
        pb = pbar[red.group[s:e]][:, red.group[s:]]  # (c, H - s, r, r)
        out[s:e, s:] = (n * pb).sum(dim=(2, 3))
        out[e:, s:e] = out[s:e, e:].T
    return out


def _side_grams(red: Reduced, avg: Averager) -> tuple[Tensor, Tensor]:
    """Offset-averaged Grams of the left (query) and right (key) unfoldings, reduced coordinates."""
    G = red.rc.shape[0]
    mbar = avg(red.right_grams)  # (G, r, r)
    left = _sandwich_sum(red.lc, mbar[red.group])
    nbar = avg(red.left_grams, sign=-1)  # (H, r, r)
    right = _sandwich_sum(red.rc, group_sums(nbar, G))
    return left, right


def averaged_problems(red: Reduced, rotation: Rotation,
                      offsets: int = DEFAULT_OFFSETS) -> tuple[Tensor, list[SpectrumProblem]]:
    """The averaged head Gram and the three eigenvalue problems (head, query, key) of
    :func:`averaged_spectra`, built but not solved (the caller may solve them concurrently)."""
    if red.lc.shape[2] != rotation.head_dim:
        raise ValueError(f"head width {red.lc.shape[2]} does not match the rotation's {rotation.head_dim}")
    avg = rotation.averager(offsets, red.lc.device, red.lc.dtype)
    g1 = _head_gram(red, avg)
    left, right = _side_grams(red, avg)
    return g1, [SpectrumProblem(g, True) for g in (g1, left, right)]


def averaged_spectra(stack: HeadStack | Reduced, rotation: Rotation, offsets: int = DEFAULT_OFFSETS) -> ModeSpectra:
    """Mode "singular values" of the query-key tensor averaged over offsets 0..offsets-1: square
    roots of the eigenvalues of the offset-averaged mode Grams (their squares sum to the mean
    over offsets of ||W_t||_F^2). ``head_gram`` is the averaged head Gram. Float64 recommended."""
    red = stack if isinstance(stack, Reduced) else reduce(stack)
    g1, problems = averaged_problems(red, rotation, offsets)
    return ModeSpectra(*(pb.solve() for pb in problems), g1)


def averaged_side_bases(stack: HeadStack, rotation: Rotation, r2: int, r3: int,
                        offsets: int = DEFAULT_OFFSETS) -> tuple[Tensor, Tensor]:
    """Orthonormal query-side (m x r2) and key-side (n x r3) bases: leading eigenvectors of the
    offset-averaged query and key mode Grams. ``U2`` minimises the mean over offsets 0..offsets-1
    of ``||W_t - U2 U2^T W_t||_F^2`` (likewise ``U3`` on the key side): the subspaces for
    truncating the input sides of a RoPE model (``q_h = x U2 U2^T A_h``, ``k_g = x U3 U3^T B_g``),
    where the rotation between the factors is kept exact."""
    red = reduce(stack)
    avg = rotation.averager(offsets, red.lc.device, red.lc.dtype)
    left, right = _side_grams(red, avg)
    U2 = red.lift_left(_top_eigvecs(left, min(r2, left.shape[0]))[1])
    U3 = red.lift_right(_top_eigvecs(right, min(r3, right.shape[0]))[1])
    return U2, U3
