"""Error against parameters for Tucker-, MLA- and GQA-shaped formats (docs/mathematics.md sections 3 and 5).

Pure functions of an analysis document's spectra: no I/O, no plotting, numpy only.

When the analysis carries ``summary.tradeoff`` (analyze computes it), Tucker and MLA-shaped
points are at their exact truncated-HOSVD errors and GQA-shaped points at their exact errors for
the best grouping found (:func:`exact_curves`, :func:`exact_gqa`; :mod:`tuckerctl.exact`). Without
it (tensors too large for the exact table), every format below is a truncation of the Tucker
picture, scored by the truncated-HOSVD tail bound of its rank triple (docs/mathematics.md section 5)::

    err(r1, r2, r3)^2 = sum_layers sum_n sum_{i > r_n} (sigma_i^(n))^2 / sum_layers ||W||^2

(the same triple in every layer), capped at 1: truncated HOSVD is an orthogonal projection,
so its error never exceeds ||W|| even where the summed tails do. What differs between the
families is which triples are allowed and how many parameters a format storing that
truncation needs ("native" count):

* **Tucker** (r1 <= H, any r2, r3): ``r1 r2 r3 + H r1 + m r2 + n r3`` per layer
  (:func:`tuckerctl.ranks.tucker_params`, vectorised here); the error is an upper bound on
  what HOSVD reaches.
* **MLA-shaped** (r1 = H; pre: query rank r2 and key rank r3, post: full output rank,
  value rank r3): the projected slices ``P2 W[h] P3`` keep per-head rank <= d_h, so they
  are stored as latent down-projections plus per-head up-projections: a side of rank r
  costs ``min(d H d_h, r (d + H d_h))``. The error is achievable (upper bound).
* **GQA-shaped** with G' groups (r1 = H, full query/output rank, key/value rank G' d_h):
  stored as GQA, ``d H d_h + d G' d_h`` per tensor. The key-mode tail is the best error
  of *any* format with key rank <= G' d_h. It is exact (0) when G' is a multiple of the
  model's own G (a finer grouping of a GQA model); otherwise it is only a lower bound on
  the true GQA error (optimistic for GQA: heads of a group must also share one d_h-wide
  key space), and ``Curve.lower`` marks it.

Counted in Tucker parameters instead (``count="tucker"``), MLA- and GQA-shaped triples are
plain Tucker triples and never beat the Tucker frontier; counted natively they can, because
GQA and MLA factor each head's slice at rank d_h, which a Tucker core does not exploit.
Per tensor, a shared latent projection (MLA's KV latent) is counted in each tensor that uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .ranks import tucker_params
from .schema import MODE_NAMES

GQA_ALTERNATIVES = (1, 2, 4, 8)


# ----------------------------------------------------------------------------- tail sums

def tail_sums(sigma: Sequence[float]) -> np.ndarray:
    """``T[r] = sum_{i > r} sigma_i^2`` for r = 0..len(sigma) (1-based i); ``T[len] = 0`` exactly.

    Summed from the small end, so tails of tiny values are not lost to cancellation."""
    sq = np.asarray(sigma, dtype=np.float64) ** 2
    out = np.zeros(len(sq) + 1)
    out[:-1] = np.cumsum(sq[::-1])[::-1]
    return out


def tail_at(tails: np.ndarray, r) -> np.ndarray:
    """``tails[r]`` with ranks beyond the list clamped (structurally zero values)."""
    return tails[np.minimum(np.asarray(r, dtype=np.int64), len(tails) - 1)]


def tail_error(spectra: Sequence[Sequence[float]], ranks: Sequence[int], norm_sq: float | None = None) -> float:
    """Relative HOSVD tail bound of one tensor: sqrt(sum_n sum_{i > r_n} sigma_i^2) / ||W||, capped at 1.

    ``spectra``: the three mode spectra (head, left, right); ``norm_sq``: ||W||^2 (default:
    the head-mode energy, equal to it up to rounding)."""
    total = float(np.sum(np.asarray(spectra[0], dtype=np.float64) ** 2)) if norm_sq is None else float(norm_sq)
    if total <= 0:
        return 0.0
    tail = sum(float(tail_at(tail_sums(s), r)) for s, r in zip(spectra, ranks))
    return min(1.0, math.sqrt(max(tail, 0.0) / total))


# ----------------------------------------------------------------------------- one tensor, all layers

@dataclass(frozen=True)
class TensorTails:
    """One tensor kind (pre or post) over all analysed layers: per-mode tail sums added
    over layers, total energy, layer count and shape (the largest mode sizes)."""

    tails: tuple[np.ndarray, np.ndarray, np.ndarray]
    norm_sq: float
    layers: int
    shape: tuple[int, int, int]
    ceilings: tuple[int, int, int]

    def error(self, r1, r2, r3) -> np.ndarray:
        """Relative tail bound for (broadcastable arrays of) rank triples, same ranks in every layer."""
        t = tail_at(self.tails[0], r1) + tail_at(self.tails[1], r2) + tail_at(self.tails[2], r3)
        if self.norm_sq <= 0:
            return np.zeros_like(t, dtype=float)
        return np.minimum(1.0, np.sqrt(np.maximum(t, 0.0) / self.norm_sq))

    @property
    def widths(self) -> tuple[int, int, int]:
        """Longest stored spectrum per mode: beyond it, raising a rank changes no error."""
        return tuple(len(t) - 1 for t in self.tails)


def tensor_tails(layers: Sequence[dict], key: str) -> TensorTails:
    """Collect the ``key`` ("pre" or "post") spectra of analysis layers into summed tails."""
    if not layers:
        raise ValueError("no layers")
    names = MODE_NAMES[key]
    width = [max(len(layer[key]["modes"][m]["singular_values"]) for layer in layers) for m in names]
    tails = [np.zeros(w + 1) for w in width]
    norm_sq = 0.0
    for layer in layers:
        for k, m in enumerate(names):
            t = tail_sums(layer[key]["modes"][m]["singular_values"])
            tails[k][:len(t)] += t
        # The spectra's own energy (offset-averaged for RoPE models, where it differs from ||W||^2).
        norm_sq += float(np.sum(np.asarray(layer[key]["modes"][names[0]]["singular_values"], dtype=np.float64) ** 2))
    shape = tuple(max(int(layer[key]["shape"][k]) for layer in layers) for k in range(3))
    ceil = tuple(max(int(layer[key]["modes"][m]["ceiling"]) for layer in layers) for m in names)
    return TensorTails(tuple(tails), norm_sq, len(layers), shape, ceil)


# ----------------------------------------------------------------------------- frontiers

def pareto_front(params: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Indices of the Pareto-optimal points, by increasing parameters: each kept point has
    strictly lower error than every cheaper (or equally cheap) point."""
    params = np.asarray(params)
    errors = np.asarray(errors, dtype=np.float64)
    order = np.lexsort((errors, params))
    keep, best = [], np.inf
    for i in order:
        if errors[i] < best:
            keep.append(i)
            best = errors[i]
    return np.asarray(keep, dtype=np.int64)


def rank_grid(limit: int, points: int = 24, extra: Sequence[int] = ()) -> np.ndarray:
    """About ``points`` geometrically spaced ranks in [1, limit], always with 1 and
    ``limit``, plus the ``extra`` ranks that fall in range."""
    limit = max(1, int(limit))
    geo = np.unique(np.round(np.geomspace(1, limit, num=max(2, points))).astype(np.int64))
    more = [int(e) for e in extra if 1 <= int(e) <= limit]
    return np.unique(np.concatenate([geo, [1, limit], more]).astype(np.int64))


@dataclass(frozen=True)
class Curve:
    """Points of one format family: total parameters, relative error, rank triples (k, 3)."""

    params: np.ndarray
    errors: np.ndarray
    ranks: np.ndarray
    labels: tuple[str, ...] = ()
    lower: tuple[bool, ...] = ()  # per point: the error is a lower bound, not achievable

    def front(self) -> Curve:
        """The Pareto frontier of these points (error non-increasing in parameters)."""
        idx = pareto_front(self.params, self.errors)
        pick = lambda t: tuple(t[i] for i in idx) if t else ()  # noqa: E731
        return Curve(self.params[idx], self.errors[idx], self.ranks[idx], pick(self.labels), pick(self.lower))


def _tucker_count(tt: TensorTails, r1, r2, r3) -> np.ndarray:
    return tt.layers * tucker_params(tt.shape, (np.asarray(r1), np.asarray(r2), np.asarray(r3)))


def tucker_points(tt: TensorTails, points: int = 24, extra: Sequence[Sequence[int]] = ((), (), ())) -> Curve:
    """Every triple of per-mode geometric grids (plus ``extra`` ranks per mode), vectorised."""
    grids = [rank_grid(w, points, e) for w, e in zip(tt.widths, extra)]
    r1, r2, r3 = np.meshgrid(*grids, indexing="ij")
    r1, r2, r3 = r1.ravel(), r2.ravel(), r3.ravel()
    return Curve(_tucker_count(tt, r1, r2, r3).astype(np.float64), tt.error(r1, r2, r3),
                 np.stack([r1, r2, r3], axis=1))


def tucker_frontier(tt: TensorTails, points: int = 24, extra: Sequence[Sequence[int]] = ((), (), ())) -> Curve:
    """Pareto frontier of Tucker formats over a grid of rank triples."""
    return tucker_points(tt, points, extra).front()


def _latent_side(d: int, heads: int, width: int, r) -> np.ndarray:
    """Parameters of one projection side of per-head width ``width`` constrained to rank r:
    a latent (d x r, then r x H width) or the plain d x H width matrix, whichever is cheaper."""
    return np.minimum(d * heads * width, np.asarray(r) * (d + heads * width))


def mla_points(tt: TensorTails, key: str, d: int, head_dim: int, points: int = 24,
               count: str = "native") -> Curve:
    """MLA-shaped truncations: r1 = H; pre (H, r2, r3), post (H, full, r3)."""
    H, m, n = tt.shape
    full2 = tt.widths[1]
    g2 = rank_grid(full2, points) if key == "pre" else np.array([full2])
    g3 = rank_grid(tt.widths[2], points)
    r2, r3 = (a.ravel() for a in np.meshgrid(g2, g3, indexing="ij"))
    r1 = np.full_like(r2, H)
    err = tt.error(r1, r2, r3)
    if count == "tucker":
        params = _tucker_count(tt, r1, r2, r3)
    elif key == "pre":
        params = tt.layers * (_latent_side(d, H, head_dim, r2) + _latent_side(d, H, head_dim, r3))
    else:  # full output projection, value through a latent of width r3
        params = tt.layers * (d * H * head_dim + _latent_side(d, H, head_dim, r3))
    return Curve(np.asarray(params, dtype=np.float64), err, np.stack([r1, r2, r3], axis=1))


def gqa_groups(heads: int, own: int | None = None) -> list[int]:
    """G in {1, 2, 4, 8} dividing H, plus the model's own G."""
    gs = {g for g in GQA_ALTERNATIVES if heads % g == 0}
    if own:
        gs.add(int(own))
    return sorted(gs)


def gqa_points(tt: TensorTails, d: int, head_dim: int, groups: Sequence[int], own: int | None = None,
               count: str = "native") -> Curve:
    """GQA-shaped truncations (H, full, G d_h) for each G in ``groups``; ``own``: the
    model's G (None for a non-GQA-family model), which decides where the error is exact."""
    H = tt.shape[0]
    gs = np.asarray(sorted(groups), dtype=np.int64)
    r3 = np.minimum(gs * head_dim, tt.shape[2])
    r1 = np.full_like(gs, H)
    r2 = np.full_like(gs, tt.widths[1])
    err = tt.error(r1, r2, r3)
    if count == "tucker":
        params = _tucker_count(tt, r1, r2, r3)
    else:
        params = tt.layers * (d * H * head_dim + d * gs * head_dim)
    lower = tuple(not (own and g % own == 0) for g in gs.tolist())
    return Curve(np.asarray(params, dtype=np.float64), err, np.stack([r1, r2, r3], axis=1),
                 tuple(f"G={g}" for g in gs), lower)


def native_params(model: dict, key: str) -> int:
    """Per-layer attention parameters of one tensor in the model's own architecture
    (biases excluded; MLA's KV latent projection counted in both tensors)."""
    d, H, G = int(model["d"]), int(model["heads"]), int(model["kv_heads"])
    dh, dv = int(model["head_dim"]), int(model.get("value_dim") or model["head_dim"])
    if model["attention"] == "MLA":
        rq, rkv = model.get("q_lora_rank"), int(model["kv_lora_rank"])
        dr = int(model.get("qk_rope_head_dim") or 0)
        if key == "pre":
            q = d * rq + rq * H * dh if rq else d * H * dh
            return q + d * (rkv + dr) + rkv * H * (dh - dr)
        return d * rkv + rkv * H * dv + H * dv * d
    width = dh if key == "pre" else dv
    return d * H * width + d * G * width


@dataclass(frozen=True)
class ModelPoint:
    params: float
    error: float
    ranks: tuple[int, int, int]


def model_point(analysis: dict, key: str, tt: TensorTails | None = None) -> ModelPoint:
    """The model's own architecture: native parameter count and the tail bound at its
    ceilings (0 up to rounding: nothing is stored beyond a ceiling)."""
    tt = tt or tensor_tails(analysis["layers"], key)
    layers = analysis["layers"]
    names = MODE_NAMES[key]
    tail = 0.0
    for layer in layers:
        for m in names:
            M = layer[key]["modes"][m]
            tail += float(tail_at(tail_sums(M["singular_values"]), int(M["ceiling"])))
    err = math.sqrt(tail / tt.norm_sq) if tt.norm_sq > 0 else 0.0
    return ModelPoint(float(len(layers) * native_params(analysis["model"], key)), err, tt.ceilings)


@dataclass(frozen=True)
class Tradeoff:
    """Everything figure 4 draws for one tensor of one analysis. ``exact``: Tucker and
    MLA-shaped errors are exact truncated-HOSVD errors (else HOSVD tail bounds, an upper
    bound on them); ``gqa_contiguous``: the exact GQA errors of the contiguous grouping
    when ``gqa`` holds a better regrouping's."""

    key: str
    tucker: Curve
    mla: Curve
    gqa: Curve
    model: ModelPoint
    exact: bool = False
    gqa_contiguous: Curve | None = None


def exact_curves(analysis: dict, key: str, count: str = "native") -> tuple[Curve, Curve] | None:
    """Tucker and MLA-shaped points at their exact truncated-HOSVD errors, from the layer-summed
    residual table that analyze stores (``summary.tradeoff[key].hosvd``); None without it."""
    rec = ((analysis.get("summary") or {}).get("tradeoff") or {}).get(key) or {}
    table = rec.get("hosvd")
    if not table:
        return None
    model = analysis["model"]
    layers = len(analysis["layers"])
    H = int(model["heads"])
    d = int(model["d"])
    shape = tuple(max(int(layer[key]["shape"][k]) for layer in analysis["layers"]) for k in range(3))
    g1, g2, g3 = (np.asarray(g, dtype=np.int64) for g in table["grid"])
    res = np.asarray(table["residual_sq"], dtype=np.float64)
    norm_sq = float(table["norm_sq"])
    err = np.minimum(1.0, np.sqrt(np.maximum(res, 0.0) / norm_sq)) if norm_sq > 0 else np.zeros_like(res)
    r1, r2, r3 = (a.ravel() for a in np.meshgrid(g1, g2, g3, indexing="ij"))
    # Only feasible triples (each rank at most the product of the other two): beyond that the
    # core cannot use the extra columns, and the same error is reached for fewer parameters.
    ok = (r1 <= r2 * r3) & (r2 <= r1 * r3) & (r3 <= r1 * r2)
    tucker_params_ = layers * tucker_params(shape, (r1, r2, r3))
    tucker = Curve(tucker_params_[ok].astype(np.float64), err.ravel()[ok], np.stack([r1, r2, r3], 1)[ok])
    width = int(model["head_dim"]) if key == "pre" else int(model.get("value_dim") or model["head_dim"])
    mla_ok = r1 == H if key == "pre" else (r1 == H) & (r2 == g2.max())
    if count == "tucker":
        mla_params = tucker_params_
    elif key == "pre":
        mla_params = layers * (_latent_side(d, H, width, r2) + _latent_side(d, H, width, r3))
    else:
        mla_params = layers * (d * H * width + _latent_side(d, H, width, r3))
    mla = Curve(np.asarray(mla_params, dtype=np.float64)[mla_ok], err.ravel()[mla_ok],
                np.stack([r1, r2, r3], 1)[mla_ok])
    return tucker.front(), mla.front()


def exact_gqa(analysis: dict, key: str, count: str = "native") -> tuple[Curve, Curve] | None:
    """GQA-shaped points at their exact errors (best grouping found, and contiguous), from
    ``summary.tradeoff[key].gqa``; None without it."""
    rec = ((analysis.get("summary") or {}).get("tradeoff") or {}).get(key) or {}
    if not rec.get("gqa"):
        return None
    model = analysis["model"]
    layers = len(analysis["layers"])
    H, d = int(model["heads"]), int(model["d"])
    width = int(model["head_dim"]) if key == "pre" else int(model.get("value_dim") or model["head_dim"])
    tt = tensor_tails(analysis["layers"], key)
    gs = np.asarray([int(x["groups"]) for x in rec["gqa"]], dtype=np.int64)
    r3 = np.minimum(gs * width, tt.shape[2])
    ranks = np.stack([np.full_like(gs, H), np.full_like(gs, tt.widths[1]), r3], axis=1)
    if count == "tucker":
        params = _tucker_count(tt, ranks[:, 0], ranks[:, 1], ranks[:, 2])
    else:
        params = layers * (d * H * width + d * gs * width)
    labels = tuple(f"G={g}" for g in gs.tolist())
    make = lambda field: Curve(np.asarray(params, dtype=np.float64),  # noqa: E731
                               np.asarray([float(x[field]) for x in rec["gqa"]]), ranks, labels,
                               (False,) * len(gs))
    return make("error_best"), make("error_contiguous")


def tradeoff(analysis: dict, key: str, points: int = 24, count: str = "native") -> Tradeoff:
    """Tucker frontier, MLA-shaped frontier, GQA-shaped points and the model's own point
    for tensor ``key`` of an analysis document. ``count``: "native" (each format's own
    storage, what figure 4 shows) or "tucker" (every triple priced as a Tucker format)."""
    if count not in ("native", "tucker"):
        raise ValueError(f"count must be 'native' or 'tucker', not {count!r}")
    model = analysis["model"]
    tt = tensor_tails(analysis["layers"], key)
    width = int(model["head_dim"]) if key == "pre" else int(model.get("value_dim") or model["head_dim"])
    own = int(model["kv_heads"]) if model["attention"] != "MLA" else None
    groups = gqa_groups(int(model["heads"]), own)
    special = [g * width for g in groups] + list(tt.ceilings[2:])
    extra = ((tt.shape[0],), (tt.ceilings[1],), tuple(special))
    curves = exact_curves(analysis, key, count)
    gqa = exact_gqa(analysis, key, count)
    if curves is not None:
        tucker, mla = curves
    else:
        tucker = tucker_frontier(tt, points, extra)
        mla = mla_points(tt, key, int(model["d"]), width, points, count).front()
    if gqa is not None:
        best, contiguous = gqa
        gqa_contiguous = contiguous if np.any(contiguous.errors > best.errors * (1 + 1e-9)) else None
    else:
        best, gqa_contiguous = gqa_points(tt, int(model["d"]), width, groups, own, count), None
    return Tradeoff(key, tucker, mla, best, model_point(analysis, key, tt), curves is not None, gqa_contiguous)



def best_error(curve: Curve, budget: float) -> float:
    """Lowest error of the curve's points with at most ``budget`` parameters (nan: none)."""
    ok = curve.params <= budget
    return float(curve.errors[ok].min()) if ok.any() else float("nan")


def params_for(curve: Curve, error: float) -> float:
    """Fewest parameters of the curve's points with error at most ``error`` (nan: none)."""
    ok = curve.errors <= error
    return float(curve.params[ok].min()) if ok.any() else float("nan")
