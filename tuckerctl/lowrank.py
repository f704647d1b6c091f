"""The per-matrix baseline (``compress --method svd``): SVD-LLM-style whitened truncated
SVD of each projection W_Q, W_K, W_V, W_O separately, beside Tucker's shared subspaces.

Each projection, written y = [x, 1] W (the bias as a last row when present), is
factored W ~ D U with D = S^-1 U_r (m x r) and U = Sigma_r V_r^T (r x n) from the SVD
of S W, S the square root of the input's second moment (identity when uncalibrated),
so the error minimised is that of the projection's outputs on the calibration inputs.
The q/k/v inputs are the normed hidden states; o's input is the attention output.
A factored projection keeps RoPE, qk-norm-free GQA and the KV cache layout intact:
the model runs it exactly (two Linear layers), and a matrix whose rank would not
save parameters is kept dense.

Checkpoint layout (a sibling of the Tucker format, schema ``tuckerctl.lowrank/1``)::

    lowrank.layers.{i}.{q,k,v,o}.down   (m, r)   m = d + 1 when biased (last row: bias of x D)
    lowrank.layers.{i}.{q,k,v,o}.up     (r, n)
    lowrank.layers.{i}.{q,k,v,o}.weight (m, n)   instead, for a matrix kept dense
    lowrank.layers.{i}.o.bias           (d,)     the output bias, when o_proj has one
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import InputError, arg
from .ranks import energy_rank

SCHEMA = "tuckerctl.lowrank/1"
PREFIX = "lowrank.layers"
ROLES = ("q", "k", "v", "o")
TENSOR_ROLES = {"pre": ("q", "k"), "post": ("v", "o"), "both": ROLES}


def layer_matrices(layer) -> dict[str, Tensor]:
    """The four projections of a :class:`LayerWeights` as y = [x, 1] W matrices."""
    pre, post = layer.pre, layer.post
    if any(b is not None for b in (pre.left_basis, pre.right_basis, post.left_basis, post.right_basis)):
        raise InputError(f"{arg('method', 'svd')}: MLA layers (shared latent bases) are not supported")

    def cat(f: Tensor) -> Tensor:  # (k, m, w) per-head columns -> (m, k w)
        return f.permute(1, 0, 2).reshape(f.shape[1], -1)

    out_rows = post.left.transpose(1, 2).reshape(-1, post.left.shape[1])  # rows of head h: O_h (d_v x d)
    return {"q": cat(pre.left), "k": cat(pre.right), "v": cat(post.right), "o": out_rows}


@dataclass
class Factored:
    """One projection, factored (down, up) or kept dense (weight)."""

    down: Tensor | None
    up: Tensor | None
    weight: Tensor | None
    weighted_error: float
    weight_error: float

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[1]


@dataclass
class Spectrum:
    """What the allocator needs of one matrix: its whitened SVD."""

    W: Tensor  # (m, n) float64
    U: Tensor  # left singular vectors of S W
    sigma: Tensor
    Vh: Tensor
    S_inv: Tensor | None
    params_dense: int  # m' n, biases excluded
    step_cost: int  # m' + n per rank

    @property
    def break_even(self) -> int:
        """Smallest rank whose factors cost at least the dense matrix."""
        return -(-self.params_dense // self.step_cost)


def spectrum(W: Tensor, S: Tensor | None, S_inv: Tensor | None, biased: bool) -> Spectrum:
    W = W.double()
    U, sig, Vh = torch.linalg.svd(W if S is None else S.to(W) @ W, full_matrices=False)
    m, n = W.shape
    rows = m - biased
    return Spectrum(W, U, sig, Vh, None if S_inv is None else S_inv.to(W), rows * n, rows + n)


def factor(sp: Spectrum, rank: int | None) -> Factored:
    """Rank-``rank`` factors (None: keep dense) with both errors."""
    total = float((sp.sigma ** 2).sum())
    if rank is None:
        return Factored(None, None, sp.W, 0.0, 0.0)
    down = sp.U[:, :rank] if sp.S_inv is None else sp.S_inv @ sp.U[:, :rank]
    up = sp.sigma[:rank, None] * sp.Vh[:rank]
    tail = float((sp.sigma[rank:] ** 2).sum())
    weighted = (tail / total) ** 0.5 if total > 0 else 0.0
    norm = float(sp.W.norm())
    weight = float((sp.W - down @ up).norm()) / norm if norm > 0 else 0.0
    return Factored(down, up, None, weighted, weight)


def energy_rank_or_dense(sp: Spectrum, tau: float) -> int | None:
    """:func:`tuckerctl.ranks.energy_rank` (at least 1), or None (dense) from the break-even rank on."""
    r = max(1, energy_rank(sp.sigma, tau))
    return None if r >= sp.break_even else r


def allocate(spectra: list[Spectrum], budget: int) -> list[int | None]:
    """Ranks (None = dense) with total parameters <= ``budget``, greedily taking the step
    with the largest drop in relative squared (weighted) error per parameter; a step
    that reaches a matrix's break-even rank switches it to dense (zero error)."""
    ranks: list[int | None] = [0] * len(spectra)
    energy = [float((sp.sigma ** 2).sum()) or 1.0 for sp in spectra]
    sq = [(sp.sigma ** 2).tolist() for sp in spectra]
    used = 0

    def candidate(k: int):
        r, sp = ranks[k], spectra[k]
        if r is None:
            return None
        if r + 1 >= min(sp.break_even, len(sq[k]) + 1):
            cost = sp.params_dense - r * sp.step_cost
            gain = sum(sq[k][r:]) / energy[k]
            return (-gain / max(cost, 1), k, r, cost)
        return (-sq[k][r] / energy[k] / sp.step_cost, k, r, sp.step_cost)

    heap = [c for k in range(len(spectra)) if (c := candidate(k))]
    heapq.heapify(heap)
    while heap:
        _, k, r, cost = heapq.heappop(heap)
        if ranks[k] != r or used + cost > budget:
            continue
        used += cost
        ranks[k] = None if r + 1 >= min(spectra[k].break_even, len(sq[k]) + 1) else r + 1
        if (c := candidate(k)):
            heapq.heappush(heap, c)
    return ranks


def params_of(sp: Spectrum, rank: int | None) -> int:
    return sp.params_dense if rank is None else rank * sp.step_cost


# ------------------------------------------------------------------ running

class LowRankLinear(nn.Module):
    """y = (x D[:d] + D[d]) U + b: a factored projection, or a dense one (U None)."""

    def __init__(self, first: Tensor, second: Tensor | None, in_features: int, bias: Tensor | None = None):
        super().__init__()
        self.in_features = in_features
        self.first = nn.Parameter(first[:in_features].float().contiguous(), requires_grad=False)
        hb = first[in_features] if first.shape[0] == in_features + 1 else None
        self.first_bias = None if hb is None else nn.Parameter(hb.float().contiguous(), requires_grad=False)
        self.second = None if second is None else nn.Parameter(second.float().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.first
        if self.first_bias is not None:
            y = y + self.first_bias
        if self.second is not None:
            y = y @ self.second
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        rank = None if self.second is None else self.second.shape[0]
        return f"in={self.in_features}, rank={rank if rank is not None else 'dense'}"


def _worst(values) -> float:
    from .verify import worst  # NaN counts as the largest error

    return worst(values)


def is_lowrank(path) -> bool:
    from .loader import open_checkpoint

    raw = open_checkpoint(Path(path)).metadata.get("tuckerctl")
    try:
        return raw is not None and json.loads(raw).get("schema") == SCHEMA
    except ValueError:
        return False


def patch_lowrank(model, path) -> dict:
    """Replace every projection of ``model`` stored in the low-rank checkpoint ``path``
    with its :class:`LowRankLinear`; returns the checkpoint's metadata record."""
    from .hf import projections
    from .loader import open_checkpoint
    from .tucker_format import check_digest, digests_of

    ckpt = open_checkpoint(Path(path))
    info = json.loads(ckpt.metadata["tuckerctl"])
    digests = digests_of(path, info)

    def get(name: str):
        check_digest(ckpt, digests, name)
        return ckpt.get(name)

    mods = projections(model)
    device = next(model.parameters()).device
    for rec in info["layers"]:
        i = rec["index"]
        if i not in mods:
            raise InputError(f"{path}: layer {i} has no attention projections in the model")
        for role in rec["roles"]:
            parent, attr = mods[i][role]
            old = getattr(parent, attr)
            name = f"{PREFIX}.{i}.{role}"
            if f"{name}.weight" in ckpt:
                first, second = get(f"{name}.weight"), None
            else:
                first, second = get(f"{name}.down"), get(f"{name}.up")
            bias = get(f"{name}.bias") if f"{name}.bias" in ckpt else None
            if first.shape[0] not in (old.in_features, old.in_features + 1):
                raise InputError(f"{path}: tensor {name} has {first.shape[0]} input rows, the model's "
                                 f"{attr} takes {old.in_features}")
            setattr(parent, attr, LowRankLinear(first, second, old.in_features, bias).to(device))
    return info


# ------------------------------------------------------------------ compressing

def _whiteners(calib, index: int, mats: dict[str, Tensor]):
    """{role: Whitener or None}: q/k/v by the layer input moment (homogeneous when
    biased), o by the attention-output moment."""
    if calib is None:
        return dict.fromkeys(mats)
    from .whiten import whitener

    m = calib[index]
    out = {role: m.whitener(mats[role].shape[0]) for role in ("q", "k", "v")}
    out["o"] = whitener(m.attn_out)
    return out


def compress_lowrank(path, out, ckpt, adapter, spec, indices, dev, calib, *, energy, params, tensors, dtype,
                     overwrite, calibrate, start, progress=None) -> dict:
    """Per-matrix (whitened) SVD of every layer, written as a ``tuckerctl.lowrank/1``
    checkpoint; returns its record (called by :func:`tuckerctl.compress.compress`)."""
    import time

    from . import __version__
    from .compress import STORE_DTYPES, calibration_record
    from .loader import iter_layers
    from .tucker_format import source_record, write_checkpoint

    store = STORE_DTYPES[dtype]

    if spec.qk_norm:
        raise InputError(f"{arg('method', 'svd')}: qk-norm layers are not supported (the norm gain sits "
                         f"between the factors); use {arg('method', 'tucker')}")
    roles = TENSOR_ROLES[tensors]
    steps = len(indices) * (2 if params is not None else 1)
    spectra: dict[tuple[int, str], Spectrum] = {}
    layers = {}
    for k, layer in enumerate(iter_layers(adapter, ckpt, spec, indices, dev)):
        mats = layer_matrices(layer)
        white = _whiteners(calib, layer.index, mats)
        for role, W in mats.items():
            biased = W.shape[0] == spec.d + 1
            w = white[role]
            spectra[(layer.index, role)] = spectrum(W, w and w.S, w and w.S_inv, biased)
        layers[layer.index] = (layer, white)
        if progress:
            progress(k + 1, steps)
    keys = list(spectra)
    chosen: dict[tuple[int, str], int | None] = {key: None for key in keys}  # None: dense
    if params is not None:
        original = sum(layer.params for layer, _ in layers.values())
        free = [key for key in keys if key[1] in roles]
        kept = sum(spectra[key].params_dense for key in keys if key[1] not in roles)
        budget = int(params * original) - kept
        if budget < 0:
            raise InputError(f"{arg('params', params)}: the tensors kept as they are already use more than that")
        chosen.update(zip(free, allocate([spectra[key] for key in free], budget)))
    else:
        chosen.update({key: energy_rank_or_dense(spectra[key], energy) for key in keys if key[1] in roles})
    factors: dict[str, Tensor] = {}
    replaced: set[str] = set()
    records = []
    for k, (i, (layer, white)) in enumerate(layers.items()):
        rec = {"index": i, "params_original": layer.params, "source_tensors": layer.tensors, "roles": list(ROLES)}
        replaced.update(layer.tensors)
        total = 0
        for role in ROLES:
            sp = spectra[(i, role)]
            f = factor(sp, chosen[(i, role)])
            name = f"{PREFIX}.{i}.{role}"
            if f.weight is not None:
                factors[f"{name}.weight"] = f.weight.to(store).cpu().contiguous()
            else:
                factors[f"{name}.down"] = f.down.to(store).cpu().contiguous()
                factors[f"{name}.up"] = f.up.to(store).cpu().contiguous()
            w = white[role]
            rec[role] = {"shape": list(sp.W.shape), "rank": f.rank, "rel_error": f.weight_error,
                         "params": params_of(sp, f.rank),
                         **({} if w is None else {"activation_rel_error": f.weighted_error,
                                                  "metric_condition": w.condition})}
            total += params_of(sp, f.rank)
        if layer.out_bias is not None:
            factors[f"{PREFIX}.{i}.o.bias"] = layer.out_bias.to(store).cpu().contiguous()
        rec["params"] = total
        records.append(rec)
        if progress:
            progress(steps - len(layers) + k + 1, steps)
    original = sum(r["params_original"] for r in records)
    compressed = sum(r["params"] for r in records)
    summary = {"params_original": original, "params_compressed": compressed,
               "ratio": compressed / original if original else None,
               "max_rel_error": _worst(r[role]["rel_error"] for r in records for role in ROLES),
               "kv_cache_per_token": {
                   "original": spec.kv_cache_width, "compressed": spec.kv_cache_width}}
    if calib is not None:
        summary["max_activation_rel_error"] = max(r[role].get("activation_rel_error", 0.0)
                                                  for r in records for role in ROLES)
    notes = ["per-matrix SVD: the model runs with its own attention (RoPE exact); the KV cache is unchanged "
             "(keys and values are up-projected before caching)"]
    if ckpt.format != "safetensors":
        notes.append(f"{ckpt.format} source: only the attention factors are written, "
                     "non-attention tensors are not copied")
    info = {
        "schema": SCHEMA,
        "tool_version": __version__,
        "source": source_record(path, ckpt, replaced),
        "model": spec.as_dict(),
        "settings": {"method": "svd", "tensors": tensors, "energy": energy, "params": params, "dtype": dtype,
                     "device": str(dev), "calibration": calibration_record(calibrate, calib)},
        "layers": records,
        "summary": summary,
        "notes": notes,
    }
    write_checkpoint(out, ckpt, replaced, factors, info, overwrite=overwrite)
    info["summary"]["seconds"] = round(time.perf_counter() - start, 3)
    return info
