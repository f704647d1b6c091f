"""``tuckerctl analyze --cross-check``: the structured spectra against TensorLy's dense HOSVD.

``analyze`` computes every mode spectrum from the per-head factors without forming the
heads x m x n tensor. For tensors small enough to form (at most :data:`MAX_ELEMENTS`
numbers), this module forms them densely in float64, unfolds them along each mode and
takes the singular values with TensorLy's SVD interface, the step TensorLy's HOSVD
(``partial_tucker``) performs per mode. Per layer and mode it reports the largest deviation
``max_i |sigma_i - sigma_i^TL| / sigma_1^TL``; values the structured path omits
(structurally zero, beyond the reduced width) count as 0.

RoPE models analysed offset-averaged (docs/mathematics.md, "RoPE"): the dense object is the
query-key tensor at every offset t = 0..T-1, ``W_t[h] = A_h R(t) B_g^T``, stacked along a
fourth mode; its head/query/key singular values divided by sqrt(T) are what ``analyze``
reports. ``R(t)`` is built here from the config (rotate_half pairs, ``rope_theta``,
``partial_rotary_factor``), not taken from the structured code.

TensorLy runs with the PyTorch backend, on the analysis device, set for this thread only.
"""

from __future__ import annotations

import time

import torch

from .analysis import rope_setting
from .device import resolve_device
from .loader import open_model
from .rope import DEFAULT_OFFSETS
from .schema import MODE_NAMES
from .verify import worst as worst_of

MAX_ELEMENTS = 1 << 24  # 16 Mi numbers = 128 MB per dense float64 tensor (all offsets together)
TOLERANCE = 1e-6  # relative to sigma_1; the structured float64 paths agree to ~1e-12


def rotations(head_dim: int, theta: float, partial: float, offsets: int) -> torch.Tensor:
    """R(t) for t = 0..offsets-1, (T, d_h, d_h), acting on row vectors as transformers'
    rotate_half RoPE does: pairs (j, j + rot/2) turn by t * theta^(-2j/rot); coordinates from
    rot = 2 floor(d_h * partial / 2) on are left alone."""
    rot = int(head_dim * partial) // 2 * 2
    half = rot // 2
    freq = theta ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(offsets, dtype=torch.float64)[:, None] * freq  # (T, half)
    R = torch.eye(head_dim, dtype=torch.float64).repeat(offsets, 1, 1)
    j = torch.arange(half)
    R[:, j, j] = R[:, j + half, j + half] = ang.cos()
    R[:, j, j + half] = ang.sin()
    R[:, j + half, j] = -ang.sin()
    return R


def dense_spectra(X: torch.Tensor, offsets: int = 1) -> list[torch.Tensor]:
    """Singular values (descending) of the head, query and key unfoldings of ``X`` (H, T, m, n),
    T offsets merged into the other modes, divided by sqrt(T); by TensorLy (``tl.unfold`` +
    ``svd_interface``) under the PyTorch backend."""
    import tensorly as tl  # lazy: only --cross-check pays for the import
    from tensorly.tenalg import svd_interface

    with tl.backend_context("pytorch", local_threadsafe=True):
        out = []
        for mode in (0, 2, 3):
            M = tl.unfold(X, mode)
            out.append(svd_interface(M, n_eigenvecs=min(M.shape))[1] / offsets ** 0.5)
        return out


def dense_tensor(stack, rotation: torch.Tensor | None) -> torch.Tensor:
    """(H, T, m, n): W[h] (T = 1), or W_t[h] = A_h R(t) B_g^T for every rotation R(t)."""
    if rotation is None:
        return stack.dense()[:, None]
    A = stack.left if stack.left_basis is None else stack.left_basis @ stack.left  # (H, m, d_h)
    B = stack.right if stack.right_basis is None else stack.right_basis @ stack.right  # (G, n, d_h)
    return torch.einsum("hmi,tij,hnj->htmn", A, rotation.to(A), B[stack.group_of])


def deviation(structured, dense: torch.Tensor) -> float:
    """max_i |s_i - d_i| / d_1, with the structured list padded by zeros."""
    d = dense.to(torch.float64).cpu()
    if not len(d):
        return 0.0
    s = torch.zeros_like(d)
    vals = torch.as_tensor(structured, dtype=torch.float64)[: len(d)]
    s[: len(vals)] = vals
    top = float(d[0]) if d[0] > 0 else 1.0
    return float((s - d).abs().max()) / top


def cross_check(path, doc: dict, *, config=None, heads=None, kv_heads=None, head_dim=None, family=None,
                rope_offsets: int = DEFAULT_OFFSETS, device: str = "auto", revision: str | None = None,
                tolerance: float = TOLERANCE, max_elements: int = MAX_ELEMENTS) -> dict:
    """Compare ``doc`` (an analysis of ``path`` with these options) with TensorLy's dense spectra
    of every tensor of at most ``max_elements`` numbers (over all offsets); larger ones are
    listed under ``skipped``, and layers with nothing to check are never read."""
    start = time.perf_counter()
    dev = resolve_device(device)
    ckpt, adapter, spec = open_model(path, config, revision=revision, heads=heads, kv_heads=kv_heads,
                                     head_dim=head_dim, family=family)
    averaged = rope_setting(spec, rope_offsets)[0] is not None  # as analyze decided for the pre tensor
    model = spec.as_dict()
    offsets = {"pre": rope_offsets if averaged else 1, "post": 1}
    rows, skipped = [], []
    for rec in doc["layers"]:
        todo = []
        for key in MODE_NAMES:
            H, m, n = rec[key]["shape"]
            size = offsets[key] * H * m * n
            (todo if size <= max_elements else skipped).append(
                key if size <= max_elements else {"index": rec["index"], "tensor": key, "elements": size})
        if not todo:
            continue
        layer = adapter.layer(ckpt, spec, rec["index"])
        row = {"index": rec["index"]}
        for key in todo:
            R = None
            if offsets[key] > 1:
                R = rotations(spec.head_dim, float(model.get("rope_theta") or 10000.0),
                              float(model.get("partial_rotary_factor") or 1.0), offsets[key])
            X = dense_tensor(getattr(layer, key).to(device=dev, dtype=torch.float64), R)
            row[key] = {name: deviation(rec[key]["modes"][name]["singular_values"], sv)
                        for name, sv in zip(MODE_NAMES[key], dense_spectra(X, offsets[key]))}
        rows.append(row)
    worst = worst_of(v for r in rows for key in MODE_NAMES if key in r for v in r[key].values())  # NaN counts
    return {"engine": "tensorly", "max_elements": max_elements, "tolerance": tolerance,
            "rope_offsets": offsets["pre"], "layers": rows, "skipped": skipped, "max_deviation": worst,
            "passed": worst <= tolerance, "seconds": round(time.perf_counter() - start, 3)}
