"""``tuckerctl verify``: reconstruction checks of a compressed checkpoint against its source.

Independent of the structured error formula used while compressing:

(a) weights: per layer, the relative Frobenius error of both tensors, computed per
    head densely on the device (float64) in batches, from the files, with the Tucker side
    rebuilt by TensorLy;
(b) function: attention logits and attention output of the original per-head weights
    vs. :class:`tuckerctl.nn.TuckerAttention` on random token inputs (fixed seed).

Both sides of (b) are the bilinear-form attention: per-token qk-norm scalars, softcap,
RoPE and ALiBi lie outside both, so they are left out of both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from . import __version__
from .adapters import detect
from .device import resolve_device
from .errors import InputError, arg
from .loader import iter_layers, open_checkpoint
from .multilinear import HeadStack
from .nn import TuckerAttention
from .options import non_negative
from .tucker_format import content_hash, load

SCHEMA = "tuckerctl.verify/1"
_BATCH_ELEMENTS = 1 << 24  # 128 MB of float64 per batch of dense head slices


def weight_error(stack: HeadStack, core: torch.Tensor, factors: list[torch.Tensor]) -> float:
    """||W - W_hat||_F / ||W||_F, forming W[h] and W_hat[h] densely a few heads at a time.
    ``core`` (r1, r2, r3) with ``factors`` [U1, U2, U3]; ``U1`` None means ``core`` already
    holds the per-head mixers M_h (H, r2, r3) (the qk_input structure: U1 = identity).

    W_hat[h] is rebuilt by TensorLy's ``tucker_to_tensor`` (PyTorch backend, on the
    factors' device): an implementation independent of the structured code that produced
    the factors. The backend is set for this thread only and restored afterwards."""
    import tensorly as tl  # lazy: only verify pays for the import

    U1, U2, U3 = factors
    H, m, n = stack.shape
    if U1 is None:
        U1 = torch.eye(core.shape[0], dtype=core.dtype, device=core.device)
    step = max(1, _BATCH_ELEMENTS // (m * n))
    num = torch.zeros((), dtype=torch.float64, device=core.device)
    den = torch.zeros((), dtype=torch.float64, device=core.device)
    with tl.backend_context("pytorch", local_threadsafe=True):
        for s in range(0, H, step):
            heads = slice(s, min(H, s + step))
            W = stack.head_slices(heads)
            # In place, in W_hat's own memory layout (multi_mode_dot returns a permuted view
            # order): a strided W - W_hat would cost a third more time.
            diff = tl.tucker_to_tensor((core, [U1[heads], U2, U3])).sub_(W)
            num += (diff * diff).sum()
            den += (W * W).sum()
    return float((num / den).sqrt()) if den > 0 else 0.0


def _homog(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[:, :1])], 1) if rows == x.shape[1] + 1 else x


def _side(stack: HeadStack, left: bool) -> torch.Tensor:
    """Per-head (left) or per-group (right) factors in the embedding coordinates."""
    f, basis = (stack.left, stack.left_basis) if left else (stack.right, stack.right_basis)
    return f if basis is None else basis @ f


def original_attention(pre: HeadStack, post: HeadStack, x: torch.Tensor, scale: float, causal: bool,
                       out_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (H, N, N), output (N, d)) of the original weights, from the per-head factors."""
    A, B = _side(pre, True), _side(pre, False)[pre.group_of]
    xq = _homog(x, A.shape[1])
    logits = scale * (xq @ A) @ (xq @ B).transpose(1, 2)
    probs = logits
    if causal:
        n = x.shape[0]
        probs = logits.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    probs = probs.softmax(-1)
    O_t, V = _side(post, True), _side(post, False)[post.group_of]
    xv = _homog(x, V.shape[1])
    y = torch.einsum("hij,hjv,hdv->id", probs, xv @ V, O_t)
    return logits, (y + out_bias if out_bias is not None else y)


def tucker_logits(core, factors, x, scale) -> torch.Tensor:
    U1, U2, U3 = factors
    P, K = _homog(x, U2.shape[0]) @ U2, _homog(x, U3.shape[0]) @ U3
    M = core if U1 is None else torch.einsum("hj,jab->hab", U1, core)
    return scale * (P @ M) @ K.T


def worst(values) -> float:
    """The largest value, NaN counting as the largest (``max`` keeps or drops NaN by position)."""
    vals = [float(v) for v in values]
    return float("nan") if any(math.isnan(v) for v in vals) else max(vals, default=0.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("nan")  # reported as corruption by the caller
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def _open_source(against, config, info: dict, path, check_hash: bool):
    """Open and detect ``against`` as the source of the compressed checkpoint ``path`` whose
    metadata is ``info``: (checkpoint, adapter, spec), or an InputError when it is another
    model (structure), lacks a tensor ``path`` was made from, or holds other weights (hash)."""
    stored = info.get("model") or {}
    ckpt = open_checkpoint(against, config)
    overrides = {} if ckpt.config else {k: stored.get(k) for k in ("heads", "kv_heads", "head_dim")}
    adapter, spec = detect(ckpt, family=stored.get("family"), **overrides)
    for key in ("family", "layers", "d", "heads", "kv_heads", "head_dim"):
        if stored.get(key) != getattr(spec, key):
            raise InputError(f"{path} was compressed from a different model than {against}: "
                             f"{key} {stored.get(key)} vs {getattr(spec, key)}")
    names = sorted({n for rec in info["layers"] for n in rec["source_tensors"]})
    missing = [n for n in names if n not in ckpt]
    if missing:
        raise InputError(f"{against}: missing tensor {missing[0]!r} that {path} was compressed from")
    sha = (info.get("source") or {}).get("sha256")
    if check_hash and sha and content_hash(ckpt, names) != sha:
        raise InputError(f"{path} was compressed from different weights than {against} (content hash mismatch)")
    return ckpt, adapter, spec


def verify(compressed, against, *, max_error: float | None = None, tokens: int = 64, seed: int = 0,
           device: str = "auto", config=None, progress: Callable[[int, int], None] | None = None,
           check_hash: bool = True) -> dict:
    """Check every layer of ``compressed`` against the ``against`` checkpoint."""
    if tokens < 1:
        raise InputError(f"{arg('tokens')}: {tokens} must be positive")
    non_negative(max_error, "max_error")  # NaN too: a check against NaN could never fail
    dev = resolve_device(device)
    start = time.perf_counter()
    from .lowrank import is_lowrank

    if is_lowrank(compressed):
        return _verify_lowrank(compressed, against, max_error=max_error, tokens=tokens, seed=seed, dev=dev,
                               config=config, progress=progress, check_hash=check_hash, start=start)
    tk = load(compressed)
    ckpt, adapter, spec = _open_source(against, config, tk.info, tk.path, check_hash)
    causal = bool(spec.extras.get("causal", True))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, spec.d, generator=gen, dtype=torch.float64).to(dev)
    rows = []
    for k, layer in enumerate(iter_layers(adapter, ckpt, spec, tk.layers, dev)):
        t = tk.layer(layer.index, dev, torch.float64)
        rec = tk._layers[layer.index]
        pre, post = (getattr(layer, key).to(device=dev, dtype=torch.float64) for key in ("pre", "post"))
        # Both structures as W_hat[h] = U2 M_h U3^T (qk_input: M_h from the per-head
        # coordinates and gains, head factor None), so one dense check covers both.
        pre_core, pre_factors = t.pre_core, t.pre_factors
        if t.structure != "tucker":
            pre_core, pre_factors = t.pre_mixers(), [None, *t.pre_factors[1:]]
        heads_of = lambda fs, core: core.shape[0] if fs[0] is None else fs[0].shape[0]  # noqa: E731
        for key, stack, fs, core in (("pre", pre, pre_factors, pre_core),
                                     ("post", post, t.post_factors, t.post_core)):
            want = (stack.heads, stack.shape[1], stack.shape[2])
            got = (heads_of(fs, core), fs[1].shape[0], fs[2].shape[0])
            if want != got:
                raise InputError(f"{tk.path}: layer {layer.index} {key} factors have mode sizes {list(got)}, "
                                 f"but {against} gives {list(want)}")
        bias = None if layer.out_bias is None else layer.out_bias.to(device=dev, dtype=torch.float64)
        scale = spec.layer_scale(layer.index)
        logits, y = original_attention(pre, post, x, scale, causal, bias)
        eye = torch.eye(pre_core.shape[0], dtype=pre_core.dtype, device=dev)
        attn = TuckerAttention(pre_core, [eye if pre_factors[0] is None else pre_factors[0], *pre_factors[1:]],
                               t.post_core, t.post_factors, scale, out_bias=t.out_bias, causal=causal)
        with torch.no_grad():
            y_hat = attn(x)
        row = {
            "index": layer.index,
            "pre": {"ranks": rec["pre"]["ranks"], "structure": t.structure,
                    "rel_error": weight_error(pre, pre_core, pre_factors),
                    "reported_error": rec["pre"]["rel_error"]},
            "post": {"ranks": list(t.post_core.shape),
                     "rel_error": weight_error(post, t.post_core, t.post_factors),
                     "reported_error": rec["post"]["rel_error"]},
            "logits_rel_error": _rel(tucker_logits(pre_core, pre_factors, x, scale), logits),
            "output_rel_error": _rel(y_hat, y),
        }
        for what, v in (("pre weight", row["pre"]["rel_error"]), ("post weight", row["post"]["rel_error"]),
                        ("logits", row["logits_rel_error"]), ("output", row["output_rel_error"])):
            if not math.isfinite(v):
                raise InputError(f"{tk.path}: layer {layer.index}: the {what} error is not finite "
                                 f"(corrupted checkpoint or source)")
        layer_worst = worst([row["pre"]["rel_error"], row["post"]["rel_error"]])
        row["ok"] = None if max_error is None else layer_worst <= max_error  # None: nothing was checked
        rows.append(row)
        if progress:
            progress(k + 1, len(tk.layers))
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "compressed": str(compressed),
        "against": str(against),
        "settings": {"max_error": max_error, "tokens": tokens, "seed": seed, "device": str(dev),
                     "causal": causal},
        "layers": rows,
        "passed": None if max_error is None else all(r["ok"] for r in rows),
        "max_rel_error": worst(e for r in rows for e in (r["pre"]["rel_error"], r["post"]["rel_error"])),
        "seconds": round(time.perf_counter() - start, 3),
    }


# ------------------------------------------------------------------ per-matrix (--method svd) checkpoints

def _stacks_of(mats: dict[str, torch.Tensor], like) -> tuple[HeadStack, HeadStack]:
    """The pre/post head stacks of four y = [x, 1] W projections: the inverse of
    :func:`tuckerctl.lowrank.layer_matrices`, shaped like the original ``like`` layer."""
    H, G = like.pre.heads, like.pre.groups
    q, k, v, o = (mats[r] for r in ("q", "k", "v", "o"))
    pre = HeadStack(q.reshape(q.shape[0], H, -1).permute(1, 0, 2), k.reshape(k.shape[0], G, -1).permute(1, 0, 2))
    post = HeadStack(o.reshape(H, -1, o.shape[1]).transpose(1, 2), v.reshape(v.shape[0], G, -1).permute(1, 0, 2))
    return pre, post


def _dense_error(stack: HeadStack, approx: HeadStack) -> float:
    """||W - W_hat||_F / ||W||_F over the heads × m × n tensors, a few heads at a time."""
    H, m, n = stack.shape
    step = max(1, _BATCH_ELEMENTS // (m * n))
    num = den = 0.0
    for s in range(0, H, step):
        heads = slice(s, min(H, s + step))
        W = stack.head_slices(heads)
        num += float(((approx.head_slices(heads) - W) ** 2).sum())
        den += float((W * W).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _verify_lowrank(compressed, against, *, max_error, tokens, seed, dev, config, progress, check_hash,
                    start) -> dict:
    """:func:`verify` of a ``tuckerctl.lowrank/1`` checkpoint: every stored tensor against its
    digest; per layer and projection the relative error of ``down @ up`` (or the kept matrix)
    against the source's own matrix, densely in float64; the two head tensors rebuilt from
    those matrices against the source's; attention logits and output on random tokens."""
    import json
    from pathlib import Path

    from .lowrank import PREFIX, ROLES, layer_matrices
    from .tucker_format import check_digest, digests_of

    path = Path(compressed)
    ck = open_checkpoint(path)
    info = json.loads(ck.metadata["tuckerctl"])
    digests = digests_of(path, info)
    ckpt, adapter, spec = _open_source(against, config, info, path, check_hash)
    records = {rec["index"]: rec for rec in info["layers"]}

    def stored(name: str) -> torch.Tensor:
        check_digest(ck, digests, name)
        return ck.get(name).to(device=dev, dtype=torch.float64)

    causal = bool(spec.extras.get("causal", True))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, spec.d, generator=gen, dtype=torch.float64).to(dev)
    rows = []
    for k, layer in enumerate(iter_layers(adapter, ckpt, spec, sorted(records), dev)):
        i, rec = layer.index, records[layer.index]
        pre = layer.pre.to(device=dev, dtype=torch.float64)
        post = layer.post.to(device=dev, dtype=torch.float64)
        original = layer_matrices(type(layer)(i, pre, post, None, layer.tensors, layer.params))
        approx, matrices = {}, {}
        for role in ROLES:
            name = f"{PREFIX}.{i}.{role}"
            kept = f"{name}.weight" in ck
            W_hat = stored(f"{name}.weight") if kept else stored(f"{name}.down") @ stored(f"{name}.up")
            if W_hat.shape != original[role].shape:
                raise InputError(f"{path}: layer {i} projection {role} has shape {list(W_hat.shape)}, "
                                 f"but {against} gives {list(original[role].shape)}")
            approx[role] = W_hat
            matrices[role] = {"rank": rec[role]["rank"], "rel_error": _rel(W_hat, original[role]),
                              "reported_error": rec[role]["rel_error"]}
        pre_hat, post_hat = _stacks_of(approx, layer)
        bias = None if layer.out_bias is None else layer.out_bias.to(device=dev, dtype=torch.float64)
        if f"{PREFIX}.{i}.o.bias" in ck:
            stored_bias = stored(f"{PREFIX}.{i}.o.bias")
            if bias is None or not _rel(stored_bias, bias) <= 1e-2:  # NaN fails too
                raise InputError(f"{path}: layer {i} output bias does not match {against}")
        scale = spec.layer_scale(i)
        logits, y = original_attention(pre, post, x, scale, causal, bias)
        logits_hat, y_hat = original_attention(pre_hat, post_hat, x, scale, causal, bias)
        row = {
            "index": i,
            "matrices": matrices,
            "pre": {"ranks": [matrices["q"]["rank"], matrices["k"]["rank"]], "rel_error": _dense_error(pre, pre_hat)},
            "post": {"ranks": [matrices["v"]["rank"], matrices["o"]["rank"]],
                     "rel_error": _dense_error(post, post_hat)},
            "logits_rel_error": _rel(logits_hat, logits),
            "output_rel_error": _rel(y_hat, y),
        }
        values = [m["rel_error"] for m in matrices.values()] + [row["logits_rel_error"], row["output_rel_error"],
                                                                row["pre"]["rel_error"], row["post"]["rel_error"]]
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"{path}: layer {i}: an error is not finite (corrupted checkpoint or source)")
        layer_worst = worst(m["rel_error"] for m in matrices.values())
        row["ok"] = None if max_error is None else layer_worst <= max_error
        rows.append(row)
        if progress:
            progress(k + 1, len(records))
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "method": "svd",
        "compressed": str(compressed),
        "against": str(against),
        "settings": {"max_error": max_error, "tokens": tokens, "seed": seed, "device": str(dev), "causal": causal},
        "layers": rows,
        "passed": None if max_error is None else all(r["ok"] for r in rows),
        "max_rel_error": worst(m["rel_error"] for r in rows for m in r["matrices"].values()),
        "seconds": round(time.perf_counter() - start, 3),
    }
