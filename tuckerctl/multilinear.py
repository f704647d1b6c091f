"""Structured multilinear algebra on stacks of per-head bilinear forms.

The object is an order-3 tensor ``W`` (heads x m x n) given by factors,

    W[h] = Lb @ left[h] @ right[g(h)].T @ Rb.T,      g(h) = h // (H // G),

with optional shared bases ``Lb`` (m x p) and ``Rb`` (n x q) (MLA's latent
projections) and per-head/per-group coefficients. Everything here works on the
factors: mode spectra, truncated HOSVD, HOOI, core and errors, without forming
``W`` (docs/mathematics.md section 4). ``dense`` exists for small tensors and tests.

All routines take and return torch tensors on the stack's device; callers pick
float64 (recommended; the reductions are cheap) or float32. No I/O here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Elements of scratch space per chunk in the chunked Gram products.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class HeadStack:
    """``W[h] = left_basis @ left[h] @ right[g(h)].T @ right_basis.T``.

    ``left``: (H, p, r) per-head factors; ``right``: (G, q, r) per-group factors;
    ``left_basis`` (m, p) and ``right_basis`` (n, q) are optional shared bases
    (identity when None). Mode 1 is the head, mode 2 the left (query/output),
    mode 3 the right (key/value) embedding side.
    """

    left: Tensor
    right: Tensor
    left_basis: Tensor | None = None
    right_basis: Tensor | None = None

    def __post_init__(self):
        H, p, r = self.left.shape
        G, q, r2 = self.right.shape
        if r != r2 or G == 0 or H % G:
            raise ValueError(f"incompatible head stack: left {tuple(self.left.shape)}, "
                             f"right {tuple(self.right.shape)}")
        if self.left_basis is not None and self.left_basis.shape[1] != p:
            raise ValueError("left_basis does not match left factors")
        if self.right_basis is not None and self.right_basis.shape[1] != q:
            raise ValueError("right_basis does not match right factors")

    @property
    def heads(self) -> int:
        return self.left.shape[0]

    @property
    def groups(self) -> int:
        return self.right.shape[0]

    @property
    def group_of(self) -> Tensor:
        """g(h) = h // (H // G) for every head."""
        return torch.arange(self.heads, device=self.left.device) // (self.heads // self.groups)

    @property
    def shape(self) -> tuple[int, int, int]:
        m = self.left.shape[1] if self.left_basis is None else self.left_basis.shape[0]
        n = self.right.shape[1] if self.right_basis is None else self.right_basis.shape[0]
        return (self.heads, m, n)

    @property
    def ceilings(self) -> tuple[int, int, int]:
        """Rank bounds implied by the factor shapes (docs/mathematics.md section 2):
        left/right modes are bounded by the width of what spans them."""
        H, m, n = self.shape
        r = self.left.shape[2]
        left = min(m, self.left.shape[1] if self.left_basis is not None else H * r)
        right = min(n, self.right.shape[1] if self.right_basis is not None else self.groups * r)
        return (min(H, left * right), min(left, H * r), min(right, H * r))

    def to(self, device=None, dtype=None) -> HeadStack:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return HeadStack(move(self.left), move(self.right), move(self.left_basis), move(self.right_basis))

    def head_slices(self, heads: slice | Tensor | None = None) -> Tensor:
        """Dense slices W[h] for the selected heads: (k, m, n). O(k m n) memory."""
        idx = torch.arange(self.heads, device=self.left.device)[heads if heads is not None else slice(None)]
        L = self.left[idx]
        R = self.right[self.group_of[idx]]
        if self.left_basis is not None:
            L = self.left_basis @ L
        if self.right_basis is not None:
            R = self.right_basis @ R
        return L @ R.transpose(1, 2)

    def dense(self) -> Tensor:
        """The full tensor (H, m, n). Only for small models and tests."""
        return self.head_slices()


@dataclass
class Reduced:
    """A head stack rewritten with orthonormal bases: W[h] = QL lc[h] rc[g].T QR.T.

    ``QL`` (m x p) and ``QR`` (n x q) have orthonormal columns (None = identity), so
    every mode spectrum of ``W`` equals that of the small coefficient tensor.
    """

    lc: Tensor  # (H, p, r)
    rc: Tensor  # (G, q, r)
    QL: Tensor | None
    QR: Tensor | None
    group: Tensor

    @property
    def rc_heads(self) -> Tensor:
        """Right coefficients expanded to one per head: (H, q, r)."""
        return self.rc[self.group]

    # The r x r Grams of the coefficients, computed once per tensor: the norm, the mode Grams,
    # the RoPE averages and the GQA errors all start from them.
    @functools.cached_property
    def left_grams(self) -> Tensor:
        """lc_h^T lc_h: (H, r, r)."""
        return self.lc.transpose(1, 2) @ self.lc

    @functools.cached_property
    def right_grams(self) -> Tensor:
        """rc_g^T rc_g: (G, r, r)."""
        return self.rc.transpose(1, 2) @ self.rc

    def lift_left(self, U: Tensor) -> Tensor:
        return U if self.QL is None else self.QL @ U

    def lift_right(self, U: Tensor) -> Tensor:
        return U if self.QR is None else self.QR @ U


def _orthonormal_side(factors: Tensor, basis: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Return (coefficients, Q) with factors_k = Q @ coefficients_k, Q orthonormal."""
    if basis is not None:
        Q, R = torch.linalg.qr(basis)
        return R @ factors, Q
    k, m, r = factors.shape
    if m <= k * r:
        return factors, None
    stacked = factors.permute(1, 0, 2).reshape(m, k * r)
    Q, R = torch.linalg.qr(stacked)
    return R.reshape(k * r, k, r).permute(1, 0, 2), Q


def reduce(stack: HeadStack) -> Reduced:
    """Orthonormalise the spans of both embedding sides (thin QR), shrinking GQA/MLA
    key and value modes to G*d_h or the latent width before any SVD."""
    lc, QL = _orthonormal_side(stack.left, stack.left_basis)
    rc, QR = _orthonormal_side(stack.right, stack.right_basis)
    return Reduced(lc, rc, QL, QR, stack.group_of)


def _r_factors(x: Tensor) -> Tensor:
    """Triangular factors of per-block thin QRs: x_k = P_k T_k, returns T (k, min, r)."""
    return torch.linalg.qr(x, mode="r")[1]


def _left_unfolding_core(red: Reduced) -> Tensor:
    """Matrix with the same singular values and left singular vectors as the
    mode-2 unfolding [W'_1, ..., W'_H]: [lc_h T_g(h)^T]_h, p x (H k)."""
    T = _r_factors(red.rc)[red.group]  # (H, k, r)
    X = red.lc @ T.transpose(1, 2)  # (H, p, k)
    return X.permute(1, 0, 2).reshape(X.shape[1], -1)


def _right_unfolding_core(red: Reduced) -> Tensor:
    """Same for the mode-3 unfolding: [rc_g(h) S_h^T]_h, q x (H k)."""
    S = _r_factors(red.lc)  # (H, k, r)
    X = red.rc_heads @ S.transpose(1, 2)  # (H, q, k)
    return X.permute(1, 0, 2).reshape(X.shape[1], -1)


def head_gram(a: Tensor, b: Tensor, group: Tensor) -> Tensor:
    """Gram of the head-mode unfolding: G[h, h'] = <a_h b_g^T, a_h' b_g'^T>_F for
    a: (H, x, r), b: (G, y, r).

    Two evaluations, whichever needs fewer flops: from the r x r products,
    sum((a_h^T a_h') * (b_g^T b_g')), about H^2 r^2 (x + y); or from the x x y slices
    a_h b_g^T formed a block of rows at a time, about H x y (H + r)."""
    H, x, r = a.shape
    y = b.shape[1]
    if H * x * y * (H + r) < H * H * r * r * (x + y):
        return _head_gram_from_slices(a, b, group)
    return _head_gram_from_products(a, b, group)


def _head_gram_from_products(a: Tensor, b: Tensor, group: Tensor) -> Tensor:
    """G[h, h'] = sum((a_h^T a_h') * (b_g^T b_g')), in blocks of heads."""
    H, x, r = a.shape
    y = b.shape[1]
    acat = a.permute(1, 0, 2).reshape(x, H * r)
    bcat = b[group].permute(1, 0, 2).reshape(y, H * r)
    out = torch.empty(H, H, dtype=a.dtype, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, H * r * r))
    for s in range(0, H, step):
        e = min(H, s + step)
        aa = (acat[:, s * r:e * r].T @ acat).reshape(e - s, r, H, r)
        bb = (bcat[:, s * r:e * r].T @ bcat).reshape(e - s, r, H, r)
        out[s:e] = (aa * bb).sum(dim=(1, 3))
    return out


def _head_gram_from_slices(a: Tensor, b: Tensor, group: Tensor) -> Tensor:
    """G = M M^T for the head unfolding M, accumulated over blocks of rows of the
    slices a_h b_g^T (only H x rows x y numbers in memory at a time)."""
    H, x, r = a.shape
    bh = b[group].transpose(1, 2)  # (H, r, y)
    out = torch.zeros(H, H, dtype=a.dtype, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, H * b.shape[1]))
    for s in range(0, x, step):
        block = (a[:, s:s + step] @ bh).reshape(H, -1)  # rows s.. of every slice
        out += block @ block.T
    return out


def _weighted_side_gram(X: Tensor, Y: Tensor, weights: Tensor) -> Tensor:
    """sum_{h,h'} w[h,h'] X_h (Y_h^T Y_h') X_h'^T for X: (H, x, r), Y: (H, y, r).

    This is Z Z^T for the mode unfolding of W contracted with the other factors
    (the HOOI update), evaluated from the factors in head chunks."""
    H, x, r = X.shape
    xcat = X.permute(1, 0, 2).reshape(x, H * r)
    ycat = Y.permute(1, 0, 2).reshape(Y.shape[1], H * r)
    K = torch.zeros(x, x, dtype=X.dtype, device=X.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, H * r * max(r, x // 8 + 1)))
    for s in range(0, H, step):
        e = min(H, s + step)
        yy = (ycat[:, s * r:e * r].T @ ycat).reshape(e - s, r, H, r) * weights[s:e, None, :, None]
        K += xcat[:, s * r:e * r] @ (yy.reshape((e - s) * r, H * r) @ xcat.T)
    return K


# Above this short side, a mode's singular values come from its float64 Gram, summed
# from the factors a block of heads at a time: eigvalsh is 4-10x faster than an SVD at
# d = 4096 and agrees to ~1e-12 sigma_1 there; only values below ~sqrt(n eps) sigma_1
# (~1e-6 sigma_1) are then at rounding level. Below it, an exact SVD of a small matrix.
_GRAM_ABOVE = 512
_SYMMETRIC_ROW_BLOCKS = 8


def _sandwich_sum(c: Tensor, w: Tensor) -> Tensor:
    """sum_j c_j w_j c_j^T for c: (J, x, r), w: (J, r, r) symmetric, a block of j at a time.

    The sum is symmetric: for large x only the blocks of rows from the diagonal rightwards are
    multiplied (``_SYMMETRIC_ROW_BLOCKS`` of them, 56% of the flops) and the upper triangle is
    mirrored."""
    J, x, r = c.shape
    out = torch.zeros(x, x, dtype=c.dtype, device=c.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, x * r))
    n = _SYMMETRIC_ROW_BLOCKS if x >= _GRAM_ABOVE else 1
    edges = [x * i // n for i in range(n + 1)]
    for s in range(0, J, step):
        block = c[s:s + step]
        cw = (block @ w[s:s + step]).permute(1, 0, 2).reshape(x, -1)
        cb = block.permute(1, 0, 2).reshape(x, -1)
        for a, b in zip(edges, edges[1:]):
            out[a:b, a:] += cw[a:b] @ cb[a:].T
    out.triu_()
    out += out.triu(1).T
    return out


def _side_singular(red: Reduced, left: bool, k: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Singular values of the mode-2 (``left``) or mode-3 unfolding of W' and, if ``k``,
    its k leading left singular vectors."""
    pb = _side_problem(red, left)
    if k is None:
        return pb.solve(), None
    if pb.gram:
        vals, vecs = _top_eigvecs(pb.matrix, k)
        return vals.sqrt(), vecs
    U, S = _thin_svd(pb.matrix)
    return S, U[:, :k]


def _thin_svd(X: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values of X (thin). LAPACK (MKL) was 3-20x faster on
    the tall orientation (512 x 2048: 2.9 s wide, 0.7 s tall, 2 cores), so a wide X is
    decomposed as X^T, whose right singular vectors are X's left ones."""
    if X.shape[0] < X.shape[1]:
        _, S, Vh = torch.linalg.svd(X.T, full_matrices=False)
        return Vh.T, S
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return U, S


def _svdvals(X: Tensor) -> Tensor:
    """Singular values of X, from the tall orientation (see ``_thin_svd``)."""
    return torch.linalg.svdvals(X.T if X.shape[0] < X.shape[1] else X)


def _left_side(red: Reduced, k: int | None = None) -> tuple[Tensor, Tensor | None]:
    return _side_singular(red, True, k)


def _right_side(red: Reduced, k: int | None = None) -> tuple[Tensor, Tensor | None]:
    return _side_singular(red, False, k)


def _side_vectors(red: Reduced, left: bool, k: int, eig_dtype: torch.dtype | None = None) -> Tensor:
    """The k leading left singular vectors of the mode-2 (``left``) or mode-3 unfolding of W'."""
    pb = _side_problem(red, left)
    if pb.gram:
        return _top_eigvecs(pb.matrix, k, eig_dtype)[1]
    return _thin_svd(pb.matrix)[0][:, :k]


def _top_eigvecs(gram: Tensor, k: int, eig_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Leading eigenpairs of a symmetric PSD matrix, descending. With a lower ``eig_dtype``
    the eigensolver runs in it and the vectors are re-orthonormalised in the Gram's dtype
    (thin QR, signs kept), so projections stay orthogonal and errors computed from the
    core stay exact; only the subspace's optimality is at that precision."""
    if eig_dtype is None or eig_dtype == gram.dtype:
        vals, vecs = torch.linalg.eigh(gram)
        return vals.flip(0)[:k].clamp_min(0), vecs.flip(1)[:, :k]
    vals, vecs = torch.linalg.eigh(gram.to(eig_dtype))
    q, r = torch.linalg.qr(vecs.flip(1)[:, :k].to(gram.dtype))
    return vals.flip(0)[:k].clamp_min(0).to(gram.dtype), q * torch.sign(r.diagonal()).where(r.diagonal() != 0, 1)


@dataclass
class ModeSpectra:
    """Singular values of the three mode unfoldings (descending; structurally zero
    values beyond the reduced widths are omitted)."""

    head: Tensor
    left: Tensor
    right: Tensor
    head_gram: Tensor | None = None  # <W[h], W[h']>_F, for head-similarity plots

    def __iter__(self):
        return iter((self.head, self.left, self.right))


@dataclass
class SpectrumProblem:
    """A matrix whose spectrum gives one mode's singular values: the eigenvalues of a
    symmetric PSD Gram (``gram``, then square roots) or the singular values of a small
    matrix. Built with GEMMs from the factors; solving it is the expensive, separate step
    (so callers can run several solves concurrently, e.g. one CUDA stream each)."""

    matrix: Tensor
    gram: bool

    def solve(self, eig_dtype: torch.dtype | None = None) -> Tensor:
        """Singular values, descending, in the matrix's dtype. ``eig_dtype`` (e.g. float32
        for a bf16 checkpoint) runs a Gram's eigensolver in that precision: its error is
        about sqrt(eps) sigma_1 for the smallest values (3.5e-4 sigma_1 in float32)."""
        if not self.gram:
            return _svdvals(self.matrix)
        g = self.matrix if eig_dtype is None else self.matrix.to(eig_dtype)
        return torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt().to(self.matrix.dtype)


def group_sums(x: Tensor, groups: int) -> Tensor:
    """(H, ...) -> (groups, ...): the sum over the heads of each group (h // (H / groups), as
    ``HeadStack.group_of``), in a fixed order. (``index_add_`` sums with atomics on CUDA, in an
    order that varies from run to run: documents differed in the last bits.)"""
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:]).sum(1)


def _side_problem(red: Reduced, left: bool) -> SpectrumProblem:
    H, p, r = red.lc.shape
    G, q, _ = red.rc.shape
    if left:
        if min(p, H * min(q, r)) <= _GRAM_ABOVE:
            return SpectrumProblem(_left_unfolding_core(red), False)
        return SpectrumProblem(_sandwich_sum(red.lc, red.right_grams[red.group]), True)
    if min(q, H * min(p, r)) <= _GRAM_ABOVE:
        return SpectrumProblem(_right_unfolding_core(red), False)
    return SpectrumProblem(_sandwich_sum(red.rc, group_sums(red.left_grams, G)), True)


def spectrum_problems(red: Reduced) -> tuple[Tensor, list[SpectrumProblem]]:
    """The head Gram and the three per-mode problems (head, left, right) of ``W``."""
    g1 = head_gram(red.lc, red.rc, red.group)
    return g1, [SpectrumProblem(g1, True), _side_problem(red, True), _side_problem(red, False)]


def mode_spectra(stack: HeadStack | Reduced, eig_dtype: torch.dtype | None = None) -> ModeSpectra:
    """Singular values of the head, left and right unfoldings of ``W``.

    Left/right: the SVD of a small matrix sharing the unfolding's singular values (thin
    QR of the other side: p x (H k) instead of d x H d), or for big modes the float64
    Gram summed from the factors.
    Head: eigenvalues of the H x H Gram. ``eig_dtype``: see ``SpectrumProblem.solve``."""
    red = stack if isinstance(stack, Reduced) else reduce(stack)
    g1, problems = spectrum_problems(red)
    return ModeSpectra(*(pb.solve(eig_dtype) for pb in problems), g1)


def mode_spectra_with_bases(red: Reduced) -> tuple[ModeSpectra, tuple[Tensor, Tensor, Tensor]]:
    """``mode_spectra`` and, from the same decompositions (eigh / SVD with vectors instead of
    values only), the full HOSVD bases U1 (H x H), V2 (p x c2), V3 (q x c3) of the reduced
    tensor, ``c`` the structural widths: one solve per mode when both are needed."""
    H, p, r = red.lc.shape
    q = red.rc.shape[1]
    widths = (H, min(p, H * min(q, r)), min(q, H * min(p, r)))
    g1, problems = spectrum_problems(red)
    values, bases = [], []
    for pb, k in zip(problems, widths):
        if pb.gram:
            vals, vecs = torch.linalg.eigh(pb.matrix)
            values.append(vals.flip(0).clamp_min(0).sqrt())
            bases.append(vecs.flip(1)[:, :k])
        else:
            U, S = _thin_svd(pb.matrix)
            values.append(S)
            bases.append(U[:, :k])
    return ModeSpectra(*values, g1), tuple(bases)


def frobenius_norm_sq(red: Reduced) -> Tensor:
    """||W||_F^2 from the factors (trace of the head Gram)."""
    return (red.left_grams * red.right_grams[red.group]).sum()


@dataclass
class Tucker:
    """Tucker factors of ``W``: core (r1, r2, r3), U1 (H, r1), U2 (m, r2), U3 (n, r3).
    ``rel_error`` is ||W - W_hat||_F / ||W||_F, accumulated in the stack's dtype.

    Unpacks like TensorLy's ``TuckerTensor`` (``core, factors = t``), so TensorLy's
    functions apply directly: ``tl.tucker_to_tensor(t)`` under the PyTorch backend equals
    ``t.to_tensor()`` (docs/mathematics.md, "Tucker values")."""

    core: Tensor
    factors: list[Tensor]
    rel_error: float
    errors: list[float] = field(default_factory=list)  # after HOSVD and each HOOI sweep

    def __iter__(self):
        return iter((self.core, self.factors))

    @property
    def ranks(self) -> tuple[int, int, int]:
        return tuple(self.core.shape)

    def to_tensor(self) -> Tensor:
        """The dense tensor (H, m, n). Only for small tensors and tests."""
        U1, U2, U3 = self.factors
        return torch.einsum("abc,ha,ib,jc->hij", self.core, U1, U2, U3)

    def to_tensorly(self):
        """The same tensors as a ``tensorly.tucker_tensor.TuckerTensor`` (shapes validated by
        TensorLy; no copy). TensorLy is imported here, not at start-up."""
        from tensorly.tucker_tensor import TuckerTensor

        return TuckerTensor((self.core, list(self.factors)))


def _core_reduced(red: Reduced, U1: Tensor, V2: Tensor, V3: Tensor) -> Tensor:
    """C[j] = sum_h U1[h, j] (V2^T lc_h)(V3^T rc_g)^T in reduced coordinates."""
    a = V2.T @ red.lc  # (H, r2, r)
    b = V3.T @ red.rc  # (G, r3, r)
    r1, r2, r3 = U1.shape[1], V2.shape[1], V3.shape[1]
    core = torch.zeros(r1, r2, r3, dtype=red.lc.dtype, device=red.lc.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, r2 * r3))
    if 2 * r1 >= a.shape[0]:  # the core is about as big as all heads' blocks: one pass, not
        step = a.shape[0]     # a read-modify-write of the whole core per chunk of heads
    for s in range(0, a.shape[0], step):
        y = a[s:s + step] @ b[red.group[s:s + step]].transpose(1, 2)  # (c, r2, r3)
        core += (U1[s:s + step].T @ y.reshape(y.shape[0], -1)).reshape(r1, r2, r3)  # a GEMM, not einsum
    return core


def _rel_error(norm_sq: Tensor, core: Tensor) -> float:
    # Projections are orthogonal, so ||W - W_hat||^2 = ||W||^2 - ||C||^2; accurate to
    # ~1e-8 relative in float64 (never use it in float32: it cancels).
    c = core.to(torch.float64)
    resid = (norm_sq.to(torch.float64) - (c * c).sum()).clamp_min(0)
    return float((resid / norm_sq.to(torch.float64)).sqrt())


def clamp_ranks(stack_or_red: HeadStack | Reduced, ranks) -> tuple[int, int, int]:
    """Clamp a rank triple to what the (reduced) mode sizes allow."""
    red = stack_or_red if isinstance(stack_or_red, Reduced) else reduce(stack_or_red)
    p, q = red.lc.shape[1], red.rc.shape[1]
    H, r = red.lc.shape[0], red.lc.shape[2]
    limits = (H, min(p, H * r), min(q, H * r))
    return tuple(max(1, min(int(k), lim)) for k, lim in zip(ranks, limits))


def tucker(stack: HeadStack, ranks, hooi_iters: int = 0, eig_dtype: torch.dtype | None = None) -> Tucker:
    """Truncated HOSVD of ``W`` at ``ranks`` (clamped), then ``hooi_iters`` HOOI sweeps,
    all from the factors. Returns factors in the original (m, n) coordinates.
    ``eig_dtype``: precision of the eigensolvers (see ``_top_eigvecs``)."""
    red = reduce(stack)
    r1, r2, r3 = clamp_ranks(red, ranks)
    norm_sq = frobenius_norm_sq(red)
    _, U1 = _top_eigvecs(head_gram(red.lc, red.rc, red.group), r1, eig_dtype)
    V2 = _side_vectors(red, True, r2, eig_dtype)
    V3 = _side_vectors(red, False, r3, eig_dtype)
    core = _core_reduced(red, U1, V2, V3)
    errors = [_rel_error(norm_sq, core)]
    rc_h = red.rc_heads
    for _ in range(hooi_iters):  # mode order head, left, right, as TensorLy's HOOI
        U1 = _top_eigvecs(head_gram(V2.T @ red.lc, V3.T @ red.rc, red.group), r1, eig_dtype)[1]
        w = U1 @ U1.T
        V2 = _top_eigvecs(_weighted_side_gram(red.lc, V3.T @ rc_h, w), r2, eig_dtype)[1]
        V3 = _top_eigvecs(_weighted_side_gram(rc_h, V2.T @ red.lc, w), r3, eig_dtype)[1]
        core = _core_reduced(red, U1, V2, V3)
        errors.append(_rel_error(norm_sq, core))
    return Tucker(core, [U1, red.lift_left(V2), red.lift_right(V3)], errors[-1], errors)
