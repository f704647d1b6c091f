"""What every architecture adapter produces, and the helpers they share.

An adapter reads one family's tensors (any name prefix) and config keys and yields,
per layer, the two head stacks of docs/mathematics.md section 1:

* ``pre``:  W[h]  = A_h B_g(h)^T        (head, query, key)
* ``post``: Wt[h] = O_h^T V_g(h)^T      (head, output, value)

with A_h = W_Q^h (d x d_h), B_g = W_K^g, V_g = W_V^g (d x d_h) and O_h = W_O^h
(d_h x d). Biases are appended as a last row (homogeneous coordinates x = [x, 1]):
the query/key modes then have size d + 1, the value mode d + 1 when v has a bias.
Norm gains between projections are folded into the adjacent factor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from ..checkpoint import Checkpoint
from ..errors import InputError, arg
from ..multilinear import HeadStack


@dataclass(kw_only=True)
class ModelSpec:
    """The detected attention structure of a model (everything outside the tensors).
    Keyword-only; :meth:`as_dict` and :meth:`from_dict` convert to and from the ``model``
    record of the JSON documents and of a compressed checkpoint's metadata."""

    family: str  # config model_type, e.g. "llama"
    attention: str  # "MHA" | "GQA" | "MQA" | "MLA"
    layers: int
    d: int
    heads: int
    kv_heads: int
    head_dim: int  # query/key width per head (MLA: nope + rope)
    value_dim: int
    bias: bool  # any q/k/v bias (homogeneous coordinates in use)
    rope: bool
    qk_norm: bool
    scale: float  # logit = scale * x^T W[h] x
    extras: dict = field(default_factory=dict)  # softcap, alibi, clip_qkv, MLA ranks, ...
    notes: list[str] = field(default_factory=list)  # guesses and caveats, shown to the user
    prefix: str = ""  # tensor-name prefix in front of the layer stack

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "family", "attention", "layers", "d", "heads", "kv_heads", "head_dim",
            "value_dim", "bias", "rope", "qk_norm", "scale")}
        out.update(self.extras)
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, doc: dict) -> ModelSpec:
        """The inverse of :meth:`as_dict`: top-level fields by name, every other key (except
        ``notes``) into ``extras``. ``prefix`` is not in the dict and comes back empty."""
        top = [f.name for f in fields(cls) if f.name not in ("extras", "notes", "prefix")]
        missing = [k for k in top if k not in doc]
        if missing:
            raise ValueError(f"model record lacks {', '.join(missing)}")
        return cls(**{k: doc[k] for k in top}, notes=list(doc.get("notes", [])),
                   extras={k: v for k, v in doc.items() if k not in top and k != "notes"})

    @property
    def kv_cache_width(self) -> int:
        """Numbers cached per token and layer by the original attention (docs/mathematics.md
        section 3): keys and values of every KV head; MLA caches its latent plus the RoPE key."""
        if self.attention == "MLA":
            return int(self.extras.get("kv_lora_rank", 0)) + int(self.extras.get("qk_rope_head_dim", 0))
        return self.kv_heads * (self.head_dim + self.value_dim)

    def layer_scale(self, i: int) -> float:
        """Logit scale of layer ``i``: ``scale``, divided by (i + 1) for GPT-2 models with
        ``scale_attn_by_inverse_layer_idx`` (transformers' GPT2Attention)."""
        if self.extras.get("scale_attn_by_inverse_layer_idx"):
            return self.scale / (i + 1)
        return self.scale


@dataclass
class LayerWeights:
    """One layer's attention as two head stacks plus what stays outside them."""

    index: int
    pre: HeadStack
    post: HeadStack
    out_bias: Tensor | None
    tensors: list[str]  # checkpoint tensors read for this layer
    params: int  # attention projection parameters in the checkpoint (biases excluded)
    # The pre stack before qk-norm gains were folded in (None: no gains, same as ``pre``).
    # The exact RoPE structure needs it: the model's norm acts on the un-gained q/k.
    pre_ungained: HeadStack | None = None
    qk_gains: tuple[Tensor, Tensor] | None = None  # (H, d_h), (G, d_h) gains folded into pre


class Adapter:
    """Base class: subclasses set ``families`` and ``signature`` and implement
    ``spec`` and ``layer``."""

    families: tuple[str, ...] = ()
    # Regex on tensor names that identifies the family without a config (its group 1
    # must be the layer index).
    signature: str = ""

    def spec(self, ckpt: Checkpoint, cfg: dict, overrides: dict) -> ModelSpec:
        raise NotImplementedError

    def layer(self, ckpt: Checkpoint, spec: ModelSpec, i: int) -> LayerWeights:
        raise NotImplementedError


# ---------------------------------------------------------------- config helpers

# Config aliases (legacy names next to the v5 ones).
D_KEYS = ("hidden_size", "n_embd", "n_embed")
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads")
KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")


def signature_of(stack: str, leaf: str) -> str:
    """Config-less detection regex; its first group is the layer index."""
    return re.escape(stack) + r"(\d+)\." + re.escape(leaf)


def mha_head_dim(src: str, cfg: dict, d: int, heads: int, d_field: str, h_field: str) -> int:
    """d_h = d / H for families whose output projection is square (d x d); an explicit
    ``head_dim`` (e.g. from --head-dim) must agree."""
    check_heads(src, d, heads, heads, 1)
    if d % heads:
        raise InputError(f"{src}: hidden size {d} ({d_field!r}) is not divisible by "
                         f"{heads} heads ({h_field!r})")
    head_dim = d // heads
    given = cfg.get("head_dim")
    if given is not None and given != head_dim:
        raise InputError(f"{src}: head_dim {given} contradicts {d_field!r}/{h_field!r} = {d}/{heads}; "
                         f"this family requires head_dim = hidden size / heads")
    return head_dim


def hidden_size(cfg: dict, fallback: int, notes: list, what: str) -> int:
    """d from the config (any alias), else ``fallback`` (a tensor's width), said in the notes."""
    d = cfg_get(cfg, *D_KEYS)
    if d is None:
        d = fallback
        notes.append(f"hidden size d = {d} read from {what}'s shape (no config)")
    return d


def require_heads(cfg: dict, src: str) -> int:
    """The query head count H from the config (any alias); without one, the one error every
    family gives (the ``heads`` argument, the CLI's --heads, supplies it)."""
    H = cfg_get(cfg, *HEAD_KEYS)
    if H is None:
        raise InputError(f"{src}: missing field 'num_attention_heads' (give {arg('heads')})")
    return H


def first_key(cfg: dict, keys: tuple[str, ...]) -> str:
    """The config key actually present among aliases (for error messages)."""
    return next((k for k in keys if cfg.get(k) is not None), keys[0])


def cfg_get(cfg: dict, *keys: str, default=None):
    """First present, non-null value among ``keys`` (config key aliases)."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def find_layers(ckpt: Checkpoint, suffix: str) -> tuple[str, dict[int, str]]:
    """Match ``<prefix><layer>.<suffix>`` where the stack looks like ``...layers.{i}``
    or ``...h.{i}``; returns (prefix, {layer: name}). ``suffix`` is a regex whose
    text before the layer index is given as ``(?P<stack>...)``.

    Several prefixes (e.g. a vision tower beside the language model) are an error
    unless one of them is the language model's."""
    rx = re.compile(r"^(?P<prefix>.*?)" + suffix + r"$")
    found: dict[str, dict[int, str]] = {}
    for name in ckpt.names():
        m = rx.match(name)
        if m:
            found.setdefault(m.group("prefix"), {})[int(m.group("layer"))] = name
    if not found:
        return "", {}
    if len(found) > 1:
        text = [p for p in found if "language_model" in p or "text" in p]
        if len(text) != 1:
            raise InputError(f"{ckpt.path}: attention tensors under several prefixes "
                             f"({', '.join(repr(p) for p in sorted(found))}); cannot tell which stack to read")
        return text[0], found[text[0]]
    return next(iter(found.items()))


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_stack(ckpt: Checkpoint, cfg: dict, family: str, stack: str, leaf: str) -> tuple[str, int]:
    """Find ``<prefix><stack><i>.<leaf>`` for every layer; return (prefix, layer count).

    ``stack``/``leaf`` are literal name parts (e.g. ``"h."``, ``"attn.c_attn.weight"``).
    Layers at or beyond ``num_hidden_layers`` (MTP blocks) are ignored; a missing
    layer below it is an error naming the missing tensor."""
    pattern = re.escape(stack) + r"(?P<layer>\d+)\." + re.escape(leaf)
    prefix, found = find_layers(ckpt, pattern)
    if not found:
        raise InputError(f"{ckpt.path}: no '...{stack}N.{leaf}' tensors for family {family!r}")
    layers = cfg_get(cfg, *LAYER_KEYS)
    if layers is not None and (not isinstance(layers, int) or layers < 1):
        raise InputError(f"{ckpt.path}: num_hidden_layers must be a positive integer, got {layers!r}")
    present = sorted(i for i in found if layers is None or i < layers)
    if layers is None:
        layers = len(present)
    if len(present) != layers or present != list(range(layers)):  # length first: never build range(10^12)
        have = set(present)  # the first gap, without building range(layers): a config may claim 10^12
        missing = next(i for i in range(len(present) + 1) if i not in have)
        raise InputError(f"{ckpt.path}: missing tensor '{prefix}{stack}{missing}.{leaf}' "
                         f"(expected {layers} layers)")
    return prefix, layers


def check_shape(ckpt: Checkpoint, name: str, expected: tuple[int, ...], what: str) -> None:
    shape = tuple(ckpt.shape(name))
    if shape != tuple(expected):
        raise InputError(f"{ckpt.path}: tensor {name!r} has shape {list(shape)}, but {what} "
                         f"implies {list(expected)}")


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def attention_kind(heads: int, kv_heads: int) -> str:
    return "MHA" if kv_heads == heads else ("MQA" if kv_heads == 1 else "GQA")


def check_heads(source: str, d: int, heads: int, kv_heads: int, head_dim: int) -> None:
    for name, v in (("hidden size", d), ("heads", heads), ("kv heads", kv_heads), ("head dim", head_dim)):
        if not isinstance(v, int) or v <= 0:
            raise InputError(f"{source}: {name} must be a positive integer, got {v!r}")
    if heads % kv_heads:
        raise InputError(f"{source}: {heads} heads are not divisible by {kv_heads} kv heads")


# ---------------------------------------------------------------- stack builders

def homogeneous(weight_t: Tensor, bias: Tensor | None, use: bool) -> Tensor:
    """(k, d, w) per-head factors -> (k, d + 1, w) with the bias as last row when ``use``."""
    if not use:
        return weight_t
    k, d, w = weight_t.shape
    row = torch.zeros(k, 1, w, dtype=weight_t.dtype) if bias is None else bias.reshape(k, 1, w).to(weight_t.dtype)
    return torch.cat([weight_t, row], dim=1)


def per_head(weight: Tensor, n: int, width: int) -> Tensor:
    """nn.Linear weight [n*width, d] -> per-head factors (n, d, width), i.e. W^h = rows^T."""
    return weight.reshape(n, width, weight.shape[1]).transpose(1, 2)


def separate_layer(
    index: int,
    q: Tensor, k: Tensor, v: Tensor, o: Tensor,
    heads: int, kv_heads: int, head_dim: int, value_dim: int | None = None,
    bq: Tensor | None = None, bk: Tensor | None = None, bv: Tensor | None = None,
    bo: Tensor | None = None,
    q_gain: Tensor | None = None, k_gain: Tensor | None = None,
    tensors: list[str] | None = None, params: int | None = None,
) -> LayerWeights:
    """Build both head stacks from nn.Linear-layout projections.

    q: [H*d_h, d], k: [G*d_h, d], v: [G*d_v, d], o: [d, H*d_v] (y = W x + b).
    ``q_gain``/``k_gain``: per-channel qk-norm gains, shape (H, d_h)/(G, d_h) or
    broadcastable, folded into the factors' columns."""
    value_dim = value_dim or head_dim
    qk_bias = bq is not None or bk is not None
    A = homogeneous(per_head(q, heads, head_dim), bq, qk_bias)
    B = homogeneous(per_head(k, kv_heads, head_dim), bk, qk_bias)
    ungained, gains = None, None
    if q_gain is not None or k_gain is not None:
        ungained = HeadStack(A, B)
        ones = torch.ones(head_dim, dtype=A.dtype)
        gains = tuple((ones if g is None else g.to(A.dtype)).reshape(-1, head_dim).expand(n, head_dim).contiguous()
                      for g, n in ((q_gain, heads), (k_gain, kv_heads)))
    if q_gain is not None:
        A = A * q_gain.reshape(-1, 1, head_dim) if q_gain.numel() > head_dim else A * q_gain.reshape(1, 1, head_dim)
    if k_gain is not None:
        B = B * k_gain.reshape(-1, 1, head_dim) if k_gain.numel() > head_dim else B * k_gain.reshape(1, 1, head_dim)
    V = homogeneous(per_head(v, kv_heads, value_dim), bv, bv is not None)
    O_t = o.reshape(o.shape[0], heads, value_dim).permute(1, 0, 2)  # (H, d, d_v) = O_h^T
    if params is None:
        params = q.numel() + k.numel() + v.numel() + o.numel()
    return LayerWeights(index, HeadStack(A, B), HeadStack(O_t, V), bo, tensors or [], params, ungained, gains)
