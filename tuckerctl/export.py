"""``tuckerctl export``: a compressed checkpoint materialised back into the family's own
projection weights, as a plain transformers directory (no tuckerctl needed to load it).

Per layer the compressed tensors are turned back into per-head factors:

* ``qk_input``: ``A_h = U2 Q_h``, ``B_g = U3 K_g`` exactly (qk-norm gains stay in the
  model's own norm tensors, which the compressed checkpoint kept).
* ``tucker`` (models without RoPE): ``W_hat[h] = U2 M_h U3^T``; per group g the stacked
  ``[M_h]_{h in g}`` is split by an SVD into ``A_h`` and a shared ``B_g`` of width d_h.
* value/output (always Tucker): ``Wt_hat[h] = Ut2 Mt_h Ut3^T = O_h^T V_g^T`` the same way.

The SVD split is exact when the stacked group matrix has rank <= d_h (always at the
ceiling ranks); otherwise the smallest singular values are dropped, and the extra
relative error is reported per layer (``export_error``). The result has the original
architecture, so it saves neither parameters nor KV cache: it is for tools that need the
stock architecture (serving engines, fine-tuning, quantisers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import InputError, arg
from .outputs import claim
from .tucker_format import AUX_FILES, QK_INPUT, TENSOR_PREFIX, TuckerLayer, load

SCHEMA = "tuckerctl.export/1"
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _group_split(mix: torch.Tensor, groups: int, width: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Split per-head matrices ``mix`` (H, a, b) as ``mix[h] ~= L[h] R[g(h)]^T`` with
    L (H, a, width), R (G, b, width): per group an SVD of the heads stacked on top of
    each other. Returns (L, R, relative Frobenius error of the dropped part)."""
    H, a, b = mix.shape
    n = H // groups
    L = torch.zeros(H, a, width, dtype=mix.dtype)
    R = torch.zeros(groups, b, width, dtype=mix.dtype)
    dropped = 0.0
    for g in range(groups):
        stacked = mix[g * n:(g + 1) * n].reshape(n * a, b)
        P, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
        k = min(width, S.shape[0])
        dropped += float((S[k:] ** 2).sum())
        L[g * n:(g + 1) * n, :, :k] = (P[:, :k] * S[:k]).reshape(n, a, k)
        R[g, :, :k] = Vh[:k].T
    total = float((mix ** 2).sum())
    return L, R, (dropped / total) ** 0.5 if total > 0 else 0.0


def materialise(layer: TuckerLayer, spec: dict) -> dict:
    """Per-head factors of one compressed layer in float64: ``A`` (H, m, d_h), ``B``
    (G, n, d_h), ``V`` (G, n', d_v), ``O_t`` (H, d, d_v) (= O_h^T), ``out_bias`` and the
    relative errors added by the split (``pre``/``post``)."""
    f = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    G, dh, dv = spec["kv_heads"], spec["head_dim"], spec.get("value_dim") or spec["head_dim"]
    if layer.structure == QK_INPUT:
        A = f(layer.pre_factors[1]) @ f(layer.query_heads)
        B = f(layer.pre_factors[2]) @ f(layer.key_groups)
        pre_err = 0.0
    else:
        if spec.get("rope") or spec.get("qk_norm"):
            raise InputError(f"layer {layer.index}: the tucker structure of a RoPE/qk-norm model has no exact "
                             f"per-head form; compress with {arg('structure', 'qk-input')} to export")
        U1, U2, U3 = (f(t) for t in layer.pre_factors)
        M = torch.einsum("hj,jab->hab", U1, f(layer.pre_core))
        Lc, Rc, pre_err = _group_split(M, G, dh)
        A, B = U2 @ Lc, U3 @ Rc
    V1, V2, V3 = (f(t) for t in layer.post_factors)
    Mt = torch.einsum("hj,jab->hab", V1, f(layer.post_core))  # Wt_hat[h] = V2 Mt_h V3^T = O_h^T V_g^T
    Lo, Rv, post_err = _group_split(Mt, G, dv)
    return {"A": A, "B": B, "V": V3 @ Rv, "O_t": V2 @ Lo, "out_bias": f(layer.out_bias),
            "errors": {"pre": pre_err, "post": post_err}}


def _linear(factors: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(k, d or d+1, w) per-head factors -> nn.Linear weight (k w, d) and bias (k w,) or None."""
    k, rows, w = factors.shape
    weight = factors[:, :d].permute(0, 2, 1).reshape(k * w, d)
    bias = factors[:, d].reshape(k * w) if rows == d + 1 else None
    return weight, bias


def _fuse_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows [Q; K; V] (Phi-3, GPT-2): the inverse of the adapters' ``split_contiguous``."""
    return torch.cat([q, k, v], 0)


def _fuse_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows per KV group [q_{g,0..r-1}; k_g; v_g] (GPT-NeoX, Bloom, Falcon): the inverse of
    the adapters' ``split_grouped``; works for weights (rows, d) and biases (rows,)."""
    rest = q.shape[1:]
    view = lambda t: t.reshape(groups, -1, k.shape[0] // groups, *rest)  # noqa: E731  (G, heads of g, d_h, ...)
    return torch.cat([view(q), view(k), view(v)], 1).reshape(-1, *rest)


def _projection_tensors(layer: TuckerLayer, spec: dict, family: str) -> tuple[dict[str, torch.Tensor], dict]:
    """{tensor name: value} for one layer in the family's own layout (names from the
    record of the tensors the layer was compressed from)."""
    from .adapters import family_adapter

    d = spec["d"]
    parts = materialise(layer, spec)
    (wq, bq), (wk, bk), (wv, bv) = (_linear(parts[x], d) for x in ("A", "B", "V"))
    wo = parts["O_t"].permute(1, 0, 2).reshape(d, -1)  # o[:, h block] = O_h^T
    names = layer.info["source_tensors"]
    weights = [n for n in names if n.endswith(".weight") and not n.endswith(("norm.weight",))]
    adapter = family_adapter(family)
    out: dict[str, torch.Tensor] = {}
    unplaced = []

    def bias(name: str, value: torch.Tensor | None):
        if value is None:
            return
        if name in names:
            out[name] = value
        elif float(value.abs().max()) > 1e-6 * max(1.0, float(wq.abs().max())):
            unplaced.append(name)

    qkv = getattr(adapter, "qkv", "")
    if qkv:  # one fused tensor
        fuse = _fuse_grouped if getattr(adapter, "layout", "grouped") == "grouped" else _fuse_contiguous
        G = spec["kv_heads"]
        fused_name = next(n for n in weights if n.endswith(f"{qkv}.weight"))
        out_name = next(n for n in weights if n != fused_name)
        w = fuse(wq, wk, wv, G)
        o = wo
        if getattr(adapter, "conv1d", False):
            w, o = w.T.contiguous(), o.T.contiguous()
        out[fused_name], out[out_name] = w, o
        if any(b is not None for b in (bq, bk, bv)):
            zeros = lambda n: torch.zeros(n, dtype=wq.dtype)  # noqa: E731
            bias(fused_name[:-len("weight")] + "bias",
                 fuse(*(b if b is not None else zeros(x.shape[0]) for b, x in ((bq, wq), (bk, wk), (bv, wv))), G))
        bias(out_name[:-len("weight")] + "bias", parts["out_bias"])
    else:
        if len(weights) != 4:
            raise InputError(f"export: layer {layer.index} records {len(weights)} projection weights, expected 4")
        for name, w, b in zip(weights, (wq, wk, wv, wo), (bq, bk, bv, parts["out_bias"])):
            out[name] = w
            bias(name[:-len("weight")] + "bias", b)
    if unplaced:
        raise InputError(f"export: layer {layer.index} has a bias the {family!r} model has no tensor for "
                         f"({unplaced[0]!r})")
    return out, parts["errors"]


def export(compressed, out, *, overwrite: bool = False, progress=None) -> dict:
    """Write ``out``: a transformers directory (config.json, model.safetensors, tokenizer
    and generation files) with the compressed attention materialised into the family's
    own projections. Returns the export record (per-layer split errors)."""
    from safetensors.torch import save_file

    src = Path(compressed)
    src_dir = src if src.is_dir() else src.parent
    # refuse before any work: never over, into or around the input; replace only an earlier export
    target = claim(out, "export", inputs=[src_dir], overwrite=overwrite)
    tk = load(compressed)
    out = Path(out)
    config = tk.source_config
    if not config:
        raise InputError(f"{tk.path}: no source config.json recorded; cannot build a transformers directory")
    spec, family = tk.spec, tk.spec.get("family")
    state: dict[str, torch.Tensor] = {}
    store = None
    for name in tk.ckpt.names():
        if name.startswith(TENSOR_PREFIX + "."):
            continue
        dt = _TORCH.get(tk.ckpt.dtype(name))
        state[name] = tk.ckpt.get(name, dt) if dt is not None else tk.ckpt.get(name)
        if store is None and dt is not None and dt.is_floating_point:
            store = dt
    if not state:
        raise InputError(f"{tk.path}: holds only the attention factors (made by an older tuckerctl from a GGUF "
                         f"file?); compress again to export")
    store = store or torch.float32
    layers, notes = [], []
    for k, i in enumerate(tk.layers):
        tensors, errors = _projection_tensors(tk.layer(i, dtype=torch.float64), spec, family)
        state.update({n: t.to(store).contiguous() for n, t in tensors.items()})
        layers.append({"index": i, "export_error": errors})
        if progress:
            progress(k + 1, len(tk.layers))
    with target.staging() as tmp:
        save_file(state, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "tuckerctl_export": json.dumps({"schema": SCHEMA, "family": family})})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname in AUX_FILES:
            if (src_dir / fname).is_file():
                shutil.copyfile(src_dir / fname, tmp / fname)
        notes += _gguf_tokenizer(tk.info.get("source", {}), tmp)
    worst = max((max(r["export_error"].values()) for r in layers), default=0.0)
    return {"schema": SCHEMA, "compressed": str(compressed), "out": str(out), "family": family,
            "layers": layers, "max_export_error": worst,
            "notes": ["the exported model has the original architecture: no parameter or KV-cache saving", *notes]}


def _gguf_tokenizer(source: dict, target: Path) -> list[str]:
    """A GGUF source keeps its tokenizer inside the GGUF: convert it with transformers when
    both are available; otherwise say how."""
    if source.get("format") != "gguf":
        return []
    gguf = Path(source.get("path", ""))
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
        return [f"tokenizer converted from {gguf}"]
    except Exception as e:  # optional: the weights are complete without it
        return [f"no tokenizer written ({type(e).__name__}); load it with AutoTokenizer.from_pretrained("
                f"DIR, gguf_file=...) from the source GGUF {gguf}"]
