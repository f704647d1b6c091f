"""Decoder families whose q/k/v live in ONE fused tensor: Phi-3, GPT-2, GPT-NeoX/Pythia,
Falcon and Bloom (docs/families.md, "Fused QKV").

Every fused layout is one of two row orders (after GPT-2's Conv1D is transposed to
nn.Linear layout [out, in]):

* contiguous ``[Q (H d_h); K (G d_h); V (G d_h)]``: Phi-3, GPT-2;
* grouped ``view(G, r + 2, d_h, d)`` with r = H / G, i.e. per KV group the r query
  heads, then its key, then its value: Falcon (G = ``num_kv_heads`` for the new
  decoder architecture, G = 1 for ``multi_query``, G = H otherwise); GPT-NeoX and Bloom
  are the G = H case (``view(H, 3, d_h, d)``).

Reading a grouped tensor contiguously gives O(1) errors; the tests check both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..families import families_of
from .base import (
    D_KEYS,
    HEAD_KEYS,
    KV_KEYS,
    Adapter,
    LayerWeights,
    ModelSpec,
    attention_kind,
    cfg_get,
    check_heads,
    check_shape,
    default_scale,
    first_key,
    hidden_size,
    layer_stack,
    mha_head_dim,
    require_heads,
    separate_layer,
    signature_of,
)


def split_contiguous(t: Tensor, heads: int, groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [Q (H d_h); K (G d_h); V (G d_h)] -> (q, k, v); works for weights and biases."""
    return tuple(torch.split(t, [heads * head_dim, groups * head_dim, groups * head_dim], dim=0))


def split_grouped(t: Tensor, heads: int, groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows viewed as (G, r + 2, d_h, ...): per group [q_{g,0..r-1}; k_g; v_g] -> (q, k, v).

    Query head h = g r + j, so g(h) = h // r as everywhere else."""
    r = heads // groups
    rest = t.shape[1:]
    v = t.reshape(groups, r + 2, head_dim, *rest)
    q = v[:, :r].reshape(heads * head_dim, *rest)
    k = v[:, r].reshape(groups * head_dim, *rest)
    val = v[:, r + 1].reshape(groups * head_dim, *rest)
    return q, k, val


def rope_extras(cfg: dict, default_factor: float = 1.0, legacy_pct: str | None = None,
                legacy_theta: str | None = None) -> dict:
    """rope_theta / partial_rotary_factor from v5 ``rope_parameters`` or legacy keys."""
    rp = cfg.get("rope_parameters") or {}
    theta = cfg_get(cfg, "rope_theta", *(k for k in [legacy_theta] if k), default=rp.get("rope_theta"))
    factor = cfg_get(cfg, "partial_rotary_factor", *(k for k in [legacy_pct] if k),
                     default=rp.get("partial_rotary_factor", default_factor))
    out = {"rope_theta": theta if theta is not None else 10000.0}
    if factor != 1:
        out["partial_rotary_factor"] = factor
    rope_type = rp.get("rope_type") or (cfg.get("rope_scaling") or {}).get("type")
    if rope_type and rope_type != "default":
        out["rope_type"] = rope_type
    return out


# ---------------------------------------------------------------- the common adapter

class FusedQKV(Adapter):
    """Base for fused-QKV families. Subclasses set the name parts and ``_dims``/``_extras``.

    ``stack``: text before the layer index; ``qkv``/``out``: module paths after it;
    ``conv1d``: weights stored [in, out] (GPT-2); ``layout``: "contiguous" | "grouped"."""

    stack = "layers."
    qkv = ""
    out = ""
    conv1d = False
    layout = "grouped"
    bias_key: str | None = None  # config flag for q/k/v biases, cross-checked with the tensors
    signature = None  # derived from stack/qkv per subclass; "" disables config-less detection

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.qkv and cls.signature is None:
            cls.signature = signature_of(cls.stack, cls.qkv + ".weight")

    # -- per-family hooks
    def _dims(self, ckpt, cfg, src, qkv_shape, notes) -> tuple[int, int, int, int]:
        """(d, H, G, d_h) from the config (and shapes only where the config is silent)."""
        raise NotImplementedError

    def _extras(self, cfg: dict, head_dim: int, notes: list) -> tuple[bool, float, dict]:
        """(rope, scale, extras)."""
        raise NotImplementedError

    # -- shapes in the checkpoint's own orientation
    def _w_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return (cols, rows) if self.conv1d else (rows, cols)

    def spec(self, ckpt: Checkpoint, cfg: dict, overrides: dict) -> ModelSpec:
        family = cfg.get("model_type") or self.families[0]
        src = str(ckpt.config_path or ckpt.path)
        prefix, layers = layer_stack(ckpt, cfg, family, self.stack, self.qkv + ".weight")
        base = f"{prefix}{self.stack}0."
        qkv_shape = tuple(ckpt.shape(base + self.qkv + ".weight"))
        out_name = base + self.out + ".weight"
        if out_name not in ckpt:
            raise InputError(f"{ckpt.path}: missing tensor {out_name!r}")
        notes: list[str] = []
        d, H, G, dh = self._dims(ckpt, cfg, src, qkv_shape, notes)
        check_heads(src, d, H, G, dh)
        what = f"d={d}, heads={H}, kv_heads={G}, head_dim={dh}"
        check_shape(ckpt, base + self.qkv + ".weight", self._w_shape((H + 2 * G) * dh, d), what)
        check_shape(ckpt, out_name, self._w_shape(d, H * dh), what)
        bias = base + self.qkv + ".bias" in ckpt
        if self.bias_key and cfg.get(self.bias_key) is not None and bool(cfg[self.bias_key]) != bias:
            raise InputError(f"{src}: {self.bias_key!r} is {cfg[self.bias_key]} but tensor "
                             f"'{base + self.qkv}.bias' is {'present' if bias else 'absent'}")
        rope, scale, extras = self._extras(cfg, dh, notes)
        return ModelSpec(family=family, attention=attention_kind(H, G), layers=layers, d=d, heads=H, kv_heads=G,
                         head_dim=dh, value_dim=dh, bias=bias, rope=rope, qk_norm=False, scale=scale,
                         extras=extras, notes=notes, prefix=prefix)

    def layer(self, ckpt: Checkpoint, spec: ModelSpec, i: int) -> LayerWeights:
        base = f"{spec.prefix}{self.stack}{i}."
        H, G, dh, d = spec.heads, spec.kv_heads, spec.head_dim, spec.d
        what = f"d={d}, heads={H}, kv_heads={G}, head_dim={dh}"
        rows = (H + 2 * G) * dh
        wq_name, wo_name = base + self.qkv + ".weight", base + self.out + ".weight"
        check_shape(ckpt, wq_name, self._w_shape(rows, d), what)
        check_shape(ckpt, wo_name, self._w_shape(d, H * dh), what)
        w, o = ckpt.get(wq_name), ckpt.get(wo_name)
        names = [wq_name, wo_name]
        params = w.numel() + o.numel()
        if self.conv1d:  # Conv1D stores [in, out]; nn.Linear layout is its transpose
            w, o = w.T.contiguous(), o.T.contiguous()
        split = split_grouped if self.layout == "grouped" else split_contiguous
        q, k, v = split(w, H, G, dh)
        bq = bk = bv = bo = None
        bname = base + self.qkv + ".bias"
        if (bname in ckpt) != spec.bias:
            raise InputError(f"{ckpt.path}: tensor {bname!r} is {'present' if bname in ckpt else 'missing'}"
                             f" in layer {i} but {'missing' if bname in ckpt else 'present'} in layer 0")
        if spec.bias:
            check_shape(ckpt, bname, (rows,), what)
            bq, bk, bv = split(ckpt.get(bname), H, G, dh)
            names.append(bname)
        oname = base + self.out + ".bias"
        if oname in ckpt:
            check_shape(ckpt, oname, (d,), what)
            bo = ckpt.get(oname)
            names.append(oname)
        return separate_layer(i, q, k, v, o, H, G, dh, bq=bq, bk=bk, bv=bv, bo=bo,
                              tensors=names, params=params)


# ---------------------------------------------------------------- families

class Phi3(FusedQKV):
    """Phi-3 / Phi-4-mini: ``self_attn.qkv_proj`` contiguous [Q; K; V], no bias, RoPE on
    the first ``partial_rotary_factor`` of each head."""

    families = families_of("Phi3")
    stack, qkv, out, layout = "layers.", "self_attn.qkv_proj", "self_attn.o_proj", "contiguous"

    def _dims(self, ckpt, cfg, src, qkv_shape, notes):
        d = hidden_size(cfg, qkv_shape[1], notes, "qkv_proj")
        H = require_heads(cfg, src)
        dh = cfg_get(cfg, "head_dim")
        if dh is None:
            if d % H:
                raise InputError(f"{src}: hidden size {d} ('hidden_size') is not divisible by "
                                 f"{H} heads ('num_attention_heads')")
            dh = d // H
        G = cfg_get(cfg, *KV_KEYS)
        if G is None:
            if ckpt.config:
                G = H  # Phi3Config: num_key_value_heads None -> H
            else:
                G = (qkv_shape[0] // dh - H) // 2
                notes.append(f"kv heads = {G} from qkv_proj rows (no config)")
        return d, H, G, dh

    def _extras(self, cfg, head_dim, notes):
        return True, default_scale(head_dim), {"causal": True, **rope_extras(cfg)}


class GPT2(FusedQKV):
    """GPT-2: Conv1D ``attn.c_attn`` [d, 3d] (in x out) with columns [Q | K | V] and bias,
    ``attn.c_proj`` [d, d]. Learned positions; ``h.N.attn.bias`` is a causal-mask
    buffer and is never read."""

    families = families_of("GPT2")
    stack, qkv, out, layout, conv1d = "h.", "attn.c_attn", "attn.c_proj", "contiguous", True

    def _dims(self, ckpt, cfg, src, qkv_shape, notes):
        d = hidden_size(cfg, qkv_shape[0], notes, "c_attn")
        H = require_heads(cfg, src)
        dh = mha_head_dim(src, cfg, d, H, first_key(cfg, D_KEYS), first_key(cfg, HEAD_KEYS))
        return d, H, H, dh

    def _extras(self, cfg, head_dim, notes):
        scale = default_scale(head_dim) if cfg.get("scale_attn_weights", True) else 1.0
        extras = {"causal": True, "positions": "learned"}
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            extras["scale_attn_by_inverse_layer_idx"] = True
            notes.append("scale_attn_by_inverse_layer_idx: layer i's logit scale is scale / (i + 1)")
        if cfg.get("add_cross_attention"):
            notes.append("cross-attention blocks (crossattention.*) are not analysed")
        return False, scale, extras


def _fused_dims(cfg: dict, src: str, qkv_shape, notes: list) -> tuple[int, int, int]:
    """(d, H, d_h) of a ``query_key_value`` [(H + 2G) d_h, d] family (NeoX, Falcon, Bloom)."""
    d = hidden_size(cfg, qkv_shape[1], notes, "query_key_value")
    H = require_heads(cfg, src)
    return d, H, mha_head_dim(src, cfg, d, H, first_key(cfg, D_KEYS), first_key(cfg, HEAD_KEYS))


class QueryKeyValue(FusedQKV):
    """A ``query_key_value`` [(H + 2G) d_h, d] family (NeoX, Falcon, Bloom): d_h = d / H, and
    G = H unless the family's ``_dims`` says otherwise (Falcon)."""

    def _dims(self, ckpt, cfg, src, qkv_shape, notes):
        d, H, dh = _fused_dims(cfg, src, qkv_shape, notes)
        return d, H, H, dh


class GPTNeoX(QueryKeyValue):
    """GPT-NeoX / Pythia: ``attention.query_key_value`` [3d, d] per-head interleaved
    view(H, 3, d_h, d), bias; RoPE on the first ``rotary_pct`` of each head."""

    families = families_of("GPTNeoX")
    stack, qkv, out, layout = "layers.", "attention.query_key_value", "attention.dense", "grouped"
    bias_key = "attention_bias"

    def _extras(self, cfg, head_dim, notes):
        extras = {"causal": True, **rope_extras(cfg, 0.25, "rotary_pct", "rotary_emb_base")}
        return True, default_scale(head_dim), extras


class Falcon(QueryKeyValue):
    """Falcon: ``self_attention.query_key_value`` grouped view(G, r + 2, d_h, d) with
    G = ``num_kv_heads`` (new_decoder_architecture, 40B/180B), 1 (``multi_query``, 7B)
    or H (classic MHA, Falcon-RW). RoPE, or ALiBi when ``alibi``."""

    families = families_of("Falcon")
    stack, qkv, out, layout = "h.", "self_attention.query_key_value", "self_attention.dense", "grouped"
    bias_key = "bias"

    def _dims(self, ckpt, cfg, src, qkv_shape, notes):
        d, H, dh = _fused_dims(cfg, src, qkv_shape, notes)
        family = cfg.get("model_type")
        kv = cfg_get(cfg, *KV_KEYS)
        new_arch = cfg.get("new_decoder_architecture", family == "RefinedWeb")
        if not ckpt.config:  # no config: the row count tells the layout
            G = kv if kv is not None else (qkv_shape[0] // dh - H) // 2
            notes.append(f"kv heads = {G} from query_key_value rows (no config): Falcon grouped layout; "
                         f"positional scheme (RoPE or ALiBi) unknown")
        elif new_arch:
            G = kv if kv is not None else H
        elif cfg.get("multi_query", True):
            G = 1  # num_kv_heads is ignored by transformers in this layout
        else:
            if kv is not None and kv != H:
                raise InputError(f"{src}: {first_key(cfg, KV_KEYS)!r} = {kv} but the classic Falcon layout "
                                 f"(multi_query and new_decoder_architecture false) needs {H}")
            G = H
        return d, H, G, dh

    def _extras(self, cfg, head_dim, notes):
        extras = {"causal": True}
        if cfg.get("alibi"):
            # (q.k + alibi) * scale: the bias is scaled with the logits (FalconAttention).
            extras.update(alibi=True, alibi_scaled=True)
            return False, default_scale(head_dim), extras
        extras.update(rope_extras(cfg))
        return True, default_scale(head_dim), extras


class Bloom(QueryKeyValue):
    """Bloom: ``self_attention.query_key_value`` [3d, d] per-head interleaved
    view(H, 3, d_h, d), bias, ALiBi added after the scale."""

    families = families_of("Bloom")
    stack, qkv, out, layout = "h.", "self_attention.query_key_value", "self_attention.dense", "grouped"
    # Same tensor names as Falcon: config-less files are read by the Falcon adapter,
    # whose G = H case is exactly this layout.
    signature = ""

    def _extras(self, cfg, head_dim, notes):
        return False, default_scale(head_dim), {"causal": True, "alibi": True, "alibi_scaled": False}


ADAPTERS = [Phi3(), GPT2(), GPTNeoX(), Falcon(), Bloom()]
