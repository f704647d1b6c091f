"""Run a compressed checkpoint inside a loaded transformers model (``tuckerctl.patch``).

Each compressed layer keeps its transformers attention module and forward (masks,
RoPE, qk-norm, KV cache, ``generate``); only its projections are swapped for the
factorised ones and its attention function for one that reads a shared latent value:

* query/key, ``qk_input`` structure: ``q_proj`` becomes ``[x,1] U2`` followed by the
  per-head coordinates ``Q_h`` (r2 -> H d_h), ``k_proj`` likewise with ``U3``, ``K_g``.
  The model's own qk-norm and RoPE then act on the d_h coordinates exactly as before.
* query/key, ``tucker`` structure (models without RoPE only): ``q_proj`` gives every head's
  latent query ``[x,1] U2 M_h`` (r3 wide), ``k_proj`` the shared latent key ``[x,1] U3``.
* value/output: ``v_proj`` gives the latent value ``[x,1] Ut3`` (s3 numbers, one for all
  heads), ``o_proj`` maps each head's attention-mixed latent value through
  ``Mt_h^T Ut2^T`` (H s3 -> d) plus the output bias.

Latent widths are zero-padded to a multiple of the head width so that the family's
``view(..., -1, head_dim)`` reshapes still apply; the attention function (registered
in transformers' ``AttentionInterface`` as ``"tuckerctl"``) undoes the padding. The
transformers cache stores what the family's forward hands it: rotated per-group keys
(qk_input) or the latent key (tucker) and the latent value.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .errors import InputError, arg
from .families import FAMILIES
from .tucker_format import QK_INPUT, TUCKER, TuckerLayer, load

ATTENTION_NAME = "tuckerctl"
# family -> (layout, query/key/value leaf names, output leaf name): the rows of tuckerctl.families
LAYOUTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    f.model_type: (f.hf_layout, f.hf_qkv, f.hf_out) for f in FAMILIES.values() if f.hf_layout}


def _pad_to(width: int, multiple: int) -> int:
    return multiple * math.ceil(width / multiple)


def _affine(U: Tensor, d: int, cols: int) -> tuple[Tensor, Tensor | None]:
    """``[x,1] U`` as (weight (cols, d), bias (cols,) or None), zero-padded to ``cols``."""
    W = torch.zeros(cols, d, dtype=U.dtype)
    W[:U.shape[1]] = U[:d].T
    if U.shape[0] == d + 1:
        b = torch.zeros(cols, dtype=U.dtype)
        b[:U.shape[1]] = U[d]
        return W, b
    return W, None


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class Factored(nn.Module):
    """``up(down(x))``: an input-side projection to a latent, then per-head coordinates."""

    def __init__(self, down: nn.Module, up: nn.Module | None):
        super().__init__()
        self.down, self.up = down, up

    def forward(self, x: Tensor) -> Tensor:
        z = self.down(x)
        return z if self.up is None else self.up(z)


class Concat(nn.Module):
    """A fused q/k/v projection: the parts' outputs side by side (or per head interleaved)."""

    def __init__(self, parts: list[nn.Module], interleave_heads: int | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.interleave_heads = interleave_heads

    def forward(self, x: Tensor) -> Tensor:
        outs = [p(x) for p in self.parts]
        if self.interleave_heads is None:
            return torch.cat(outs, dim=-1)
        n = self.interleave_heads  # (..., n, w) per part -> (..., n, 3 w) -> (..., n 3 w)
        return torch.cat([o.reshape(*o.shape[:-1], n, -1) for o in outs], dim=-1).flatten(-2)


def _projections(layer: TuckerLayer, d: int, dh: int, dtype, value_cols: int | None = None
                 ) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, dict]:
    """(query, key, value, output) modules of one layer and the layout record.
    ``value_cols``: pad the latent value to this width (default: a multiple of d_h)."""
    f = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    V1, V2, V3 = (f(t) for t in layer.post_factors)
    post = torch.einsum("hj,jab->hab", V1, f(layer.post_core))  # Mt_h (H, s2, s3)
    H, s3 = post.shape[0], post.shape[2]
    s3p = value_cols or _pad_to(s3, dh)
    if s3p < s3 or s3p % dh:
        raise InputError(f"layer {layer.index}: latent value width {s3} does not fit {s3p} columns")
    if layer.structure == QK_INPUT:
        U2, U3 = f(layer.pre_factors[1]), f(layer.pre_factors[2])
        Q, K = f(layer.query_heads), f(layer.key_groups)
        G = K.shape[0]
        q = Factored(_linear(*_affine(U2, d, U2.shape[1])),
                     _linear(Q.permute(0, 2, 1).reshape(H * dh, -1), None))
        k = Factored(_linear(*_affine(U3, d, U3.shape[1])),
                     _linear(K.permute(0, 2, 1).reshape(G * dh, -1), None))
        widths = (H * dh, G * dh)
    else:
        _, U2, U3 = (f(t) for t in layer.pre_factors)
        M = torch.einsum("hj,jab->hab", f(layer.pre_factors[0]), f(layer.pre_core))  # (H, r2, r3)
        r3 = M.shape[2]
        r3p = _pad_to(r3, dh)
        Mp = torch.zeros(H, M.shape[1], r3p, dtype=M.dtype)
        Mp[:, :, :r3] = M
        q = Factored(_linear(*_affine(U2, d, U2.shape[1])), _linear(Mp.permute(0, 2, 1).reshape(H * r3p, -1), None))
        k = Factored(_linear(*_affine(U3, d, r3p)), None)
        widths = (H * r3p, r3p)
    v = Factored(_linear(*_affine(V3, d, s3p)), None)
    # y = sum_h out_h Mt_h^T Ut2^T: weight[:, (h, c)] = (Ut2 Mt_h)[:, c], zero on the padding.
    Wo = torch.zeros(d, H, s3p, dtype=post.dtype)
    Wo[:, :, :s3] = torch.einsum("da,hab->dhb", V2, post)
    o = _linear(Wo.reshape(d, H * s3p), None if layer.out_bias is None else f(layer.out_bias))
    mods = [m.to(dtype) for m in (q, k, v, o)]
    return (*mods, {"structure": layer.structure, "widths": (*widths, s3p), "heads": H, "value_width": s3})


def _eager_logits_mask(logits: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
    N, T = logits.shape[-2:]
    if attention_mask is not None:
        mask = attention_mask[..., :T]
        if mask.dtype == torch.bool:
            return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        return logits + mask
    if causal and N > 1:
        allowed = torch.ones(N, T, dtype=torch.bool, device=logits.device).tril(T - N)
        return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    return logits


def tucker_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None, **kwargs):
    """transformers attention function for patched layers (see the module docstring).

    ``query`` (B, *, N, w), ``key`` (B, *, T, w), ``value`` (B, *, T, w): the family's
    reshapes of the factorised projections; ``module._tuckerctl`` says how to read them."""
    info = module._tuckerctl
    B, N, T = query.shape[0], query.shape[2], key.shape[2]
    H = info["heads"]
    if info["structure"] == QK_INPUT:  # real per-head queries, per-group keys
        G = key.shape[1]
        q, k = query, key.repeat_interleave(H // G, dim=1) if G != H else key
    else:  # latent queries per head, one latent key
        q = query.transpose(1, 2).reshape(B, N, H, -1).transpose(1, 2)
        k = key.transpose(1, 2).reshape(B, 1, T, -1)
    v = value.transpose(1, 2).reshape(B, 1, T, -1)  # the shared latent value (padded)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = (q @ k.transpose(-1, -2)) * scaling
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = _eager_logits_mask(logits, attention_mask, getattr(module, "is_causal", True))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        probs = nn.functional.dropout(probs, p=dropout, training=True)
    out = probs @ v  # (B, H, N, s3p)
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, tucker_attention)


def _find(modules: dict[str, nn.Module], tensor_name: str) -> tuple[str, nn.Module]:
    """The model module a checkpoint tensor belongs to, matching the longest name suffix
    (checkpoints and model classes differ in leading prefixes such as ``model.``)."""
    parts = tensor_name.rsplit(".", 1)[0].split(".")
    for k in range(len(parts)):
        name = ".".join(parts[k:])
        if name in modules:
            return name, modules[name]
    raise InputError(f"the model has no module for checkpoint tensor {tensor_name!r}")


# transformers renames some families' modules on load (checkpoint names -> model names).
_MODEL_NAMES = {f: (r"(^|\.)layers\.{i}\.attention$", ("q_proj", "k_proj", "v_proj"), "o_proj")
                for f in ("vit", "deit")}


def _locate(modules: dict[str, nn.Module], family: str, i: int, by_leaf: dict, qkv_leaves, out_leaf):
    """(q module path, output module path, q/k/v leaf names) of layer ``i`` in the model."""
    try:
        q_path, _ = _find(modules, by_leaf[qkv_leaves[0]])
        o_path, _ = _find(modules, by_leaf[out_leaf])
        return q_path, o_path, qkv_leaves
    except InputError:
        if family not in _MODEL_NAMES:
            raise
    import re

    pattern, leaves, out = _MODEL_NAMES[family]
    rx = re.compile(pattern.replace("{i}", str(i)))
    found = [n for n in modules if rx.search(n) and hasattr(modules[n], leaves[0])]
    if len(found) != 1:
        raise InputError(f"cannot find layer {i}'s attention module in the model")
    return f"{found[0]}.{leaves[0]}", f"{found[0]}.{out}", leaves


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _model_family(config) -> str:
    text = getattr(config, "text_config", None)
    family = getattr(config, "model_type", None)
    if family not in LAYOUTS and text is not None:
        family = getattr(text, "model_type", family)
    return family


def patch(model: nn.Module, path, layers=None) -> nn.Module:
    """Replace the attention of every compressed layer of ``model`` (a loaded transformers
    model of the checkpoint's family) by the factorised one from the compressed checkpoint
    ``path``; returns ``model`` (modified in place). ``layers``: a subset of layer indices.

    Forward, masks, KV cache and ``generate`` stay transformers' own. At the ceiling
    ranks the patched model reproduces the original to float rounding. Raises
    :class:`~tuckerctl.errors.InputError` for a mismatched model or an unsupported case."""
    tk = load(path)
    spec = tk.spec
    family = spec.get("family")
    if family not in LAYOUTS:
        raise InputError(f"{path}: tuckerctl.patch does not support family {family!r} "
                         f"(supported: {', '.join(sorted(LAYOUTS))})")
    model_family = _model_family(model.config)
    if model_family != family and not {model_family, family} <= {"gemma3", "gemma3_text"}:
        raise InputError(f"{path} was compressed from a {family!r} model, but the model is {model_family!r}")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa", ATTENTION_NAME):
        raise InputError(f"tuckerctl.patch needs attn_implementation 'eager' or 'sdpa' (the model uses {impl!r})")
    flags = tk.info.get("flags", {})
    if flags.get("clip_qkv"):
        raise InputError(f"{path}: clip_qkv clamps q/k/v elementwise, which the latent projections cannot "
                         f"reproduce; not supported by patch")
    if flags.get("alibi"):
        raise InputError(f"{path}: ALiBi families are not supported by patch")
    layout, qkv_leaves, out_leaf = LAYOUTS[family]
    _register()
    modules = dict(model.named_modules())
    param = next(model.parameters())
    dh = spec["head_dim"]
    wanted = tk.layers if layers is None else list(layers)
    for i in wanted:
        layer = tk.layer(i)
        if layer.structure == TUCKER and spec.get("rope"):
            raise InputError(f"{path}: layer {i} uses the tucker structure on a RoPE model, which the model's own "
                             f"RoPE cannot run (latent RoPE is an approximation: tuckerctl.nn.TuckerAttention); "
                             f"compress with {arg('structure', 'qk-input')}")
        names = layer.info["source_tensors"]
        by_leaf = {n.rsplit(".", 2)[-2]: n for n in names if n.endswith(".weight")}
        missing = [leaf for leaf in (*qkv_leaves, out_leaf) if leaf not in by_leaf]
        if missing:
            raise InputError(f"{path}: layer {i} records no {missing[0]!r} tensor")
        q_path, o_path, leaves = _locate(modules, family, i, by_leaf, qkv_leaves, out_leaf)
        attn_path = q_path.rpartition(".")[0]
        attn = modules[attn_path]
        # GPT-NeoX interleaves [q_h, k_h, v_h] per head, all of width d_h: the value is padded to H d_h.
        fixed = layout in ("interleaved", "fixed")
        if fixed and layer.structure != QK_INPUT:
            raise InputError(f"{path}: layer {i}: {family} reshapes q/k/v with a fixed head count, which only the "
                             f"qk_input structure fits; compress with {arg('structure', 'qk-input')}")
        q, k, v, o, info = _projections(layer, spec["d"], dh, param.dtype, spec["heads"] * dh if fixed else None)
        if fixed and info["widths"][:2] != (spec["heads"] * dh,) * 2:
            raise InputError(f"{path}: layer {i}: {family} needs as many key heads as query heads")
        if layout in ("separate", "fixed"):
            for leaf, mod in zip(leaves, (q, k, v)):
                _set(model, f"{attn_path}.{leaf}", mod)
        elif layout == "contiguous":
            _set(model, q_path, Concat([q, k, v]))
        elif layout == "split":
            _set(model, q_path, Concat([q, k, v]))
            attn.split_size = list(info["widths"])
        elif layout == "interleaved":
            _set(model, q_path, Concat([q, k, v], interleave_heads=info["heads"]))
        _set(model, o_path, o)
        attn.config = copy.copy(attn.config)
        attn.config._attn_implementation = ATTENTION_NAME
        attn._tuckerctl = {**info, "layer": i}
    model.to(param.device)
    return model


__all__ = ["ATTENTION_NAME", "LAYOUTS", "patch", "tucker_attention"]
