"""Tucker decomposition in the activation metric (docs/mathematics.md section 9).

With the second moment C = E[x^T x] of what multiplies a mode and S its symmetric
square root, the error of a layer's *outputs* on those inputs is the Frobenius error of
the tensor with that mode multiplied by S. For the query-key tensor both embedding modes
see the normed hidden states:

    E (x (W[h] - W_hat[h]) y^T)^2 = || S (W[h] - W_hat[h]) S ||_F^2,

so the decomposition runs on W' = W x2 S x3 S, which in factor form is A_h -> S A_h,
B_g -> S B_g (or the shared bases of MLA), with the structured routines of
:mod:`tuckerctl.multilinear` unchanged; the factors are mapped back with S^-1. For the
value-output tensor the value side is weighted by the input moment (the first
approximation of the attention-mixed inputs' moment) and the output side is left in
the weight metric.

Small eigenvalues of C are floored at ``floor`` x the largest (a direction the
calibration text never excites must not be inflated without bound by S^-1); the
condition number of the floored C is reported. Pure math: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .multilinear import HeadStack, Tucker, tucker

DEFAULT_FLOOR = 1e-6


@dataclass
class Whitener:
    """S = C^(1/2) and S^-1 of a floored second moment, both symmetric (float64)."""

    S: Tensor
    S_inv: Tensor
    condition: float  # eigenvalue ratio of the floored C
    floored: int  # eigenvalues raised to the floor


def whitener(C: Tensor, floor: float = DEFAULT_FLOOR) -> Whitener:
    C = C.double()
    vals, vecs = torch.linalg.eigh((C + C.T) / 2)
    top = float(vals.max())
    if not top > 0:
        raise ValueError("second moment is zero (no calibration signal)")
    low = floor * top
    floored = int((vals < low).sum())
    vals = vals.clamp_min(low)
    root = vals.sqrt()
    return Whitener((vecs * root) @ vecs.T, (vecs / root) @ vecs.T, top / float(vals.min()), floored)


def _apply(S: Tensor | None, factors: Tensor, basis: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if S is None:
        return factors, basis
    S = S.to(factors)
    return (factors, S @ basis) if basis is not None else (S @ factors, None)


def whiten_stack(stack: HeadStack, left: Tensor | None, right: Tensor | None) -> HeadStack:
    """W' = W x2 left x3 right, by transforming the factors (None = identity)."""
    lf, lb = _apply(left, stack.left, stack.left_basis)
    rf, rb = _apply(right, stack.right, stack.right_basis)
    return HeadStack(lf, rf, lb, rb)


def _dense_factors(stack: HeadStack) -> tuple[Tensor, Tensor]:
    A = stack.left if stack.left_basis is None else stack.left_basis @ stack.left
    B = stack.right if stack.right_basis is None else stack.right_basis @ stack.right
    return A, B


def relative_error(stack: HeadStack, t: Tucker) -> float:
    """||W - W_hat||_F / ||W||_F from the factors, in float64, for any (not necessarily
    orthonormal) Tucker factors: ||W||^2 - 2 <W, W_hat> + ||W_hat||^2 from r x r products.
    Accurate to ~1e-8 relative (cancellation); use dense errors below that."""
    A, B = (x.double() for x in _dense_factors(stack))
    U1, U2, U3 = (f.double() for f in t.factors)
    B = B[stack.group_of]
    M = torch.einsum("hj,jab->hab", U1, t.core.double())  # (H, r2, r3)
    a, b = U2.T @ A, U3.T @ B  # (H, r2, r), (H, r3, r)
    norm_w = ((A.transpose(1, 2) @ A) * (B.transpose(1, 2) @ B)).sum()
    inner = (a * (M @ b)).sum()
    norm_hat = ((M.transpose(1, 2) @ (U2.T @ U2) @ M) * (U3.T @ U3)).sum()
    resid = (norm_w - 2 * inner + norm_hat).clamp_min(0)
    return float((resid / norm_w).sqrt()) if norm_w > 0 else 0.0


@dataclass
class WeightedTucker:
    """A Tucker decomposition fitted in an activation metric, in original coordinates."""

    tucker: Tucker  # factors mapped back; ``tucker.rel_error`` is the weight-space error
    weighted_error: float  # relative error in the activation metric
    weight_error: float  # relative Frobenius error of the weights


def weighted_tucker(stack: HeadStack, ranks, left: Whitener | None, right: Whitener | None,
                    hooi_iters: int = 0) -> WeightedTucker:
    """Truncated HOSVD (+ HOOI) of ``stack`` minimising the error weighted by the
    whiteners of its embedding modes (None = weight metric), mapped back."""
    white = whiten_stack(stack, left.S if left else None, right.S if right else None)
    t = tucker(white, ranks, hooi_iters=hooi_iters)
    U1, V2, V3 = t.factors
    U2 = left.S_inv.to(V2) @ V2 if left else V2
    U3 = right.S_inv.to(V3) @ V3 if right else V3
    back = Tucker(t.core, [U1, U2, U3], 0.0, t.errors)
    back.rel_error = relative_error(stack, back)
    return WeightedTucker(back, t.rel_error, back.rel_error)
