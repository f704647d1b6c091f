"""MHA families with separate, biased q/k/v/o projections under legacy names:
BERT / RoBERTa / MiniLM, ViT / DeiT (bidirectional encoders) and OPT (causal decoder).
See docs/families.md.

On-disk names are the legacy hub names (transformers v5 renames ViT's modules only in
memory and writes the old names back), with or without a model prefix (``bert.``,
``roberta.``, ``vit.``, ``deit.``, ``model.decoder.``): the layer stack is found by
suffix with any prefix.
"""

from __future__ import annotations

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..families import families_of
from .base import (
    D_KEYS,
    HEAD_KEYS,
    Adapter,
    LayerWeights,
    ModelSpec,
    attention_kind,
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


class SeparateMHA(Adapter):
    """Base: per layer ``<prefix><stack><i>.<proj>.{weight,bias}`` for the four
    projections in ``proj`` (nn.Linear layout), d_h = d / H, G = H.

    ``bias_key``: config flag for the q/k/v biases, cross-checked with the tensors."""

    stack = "encoder.layer."
    proj: dict[str, str] = {}
    bias_key: str | None = None
    signature_leaf = "q"  # which projection identifies the family without a config

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.signature = signature_of(cls.stack, cls.proj[cls.signature_leaf] + ".weight")

    def _extras(self, cfg: dict, notes: list) -> dict:
        return {}

    def spec(self, ckpt: Checkpoint, cfg: dict, overrides: dict) -> ModelSpec:
        family = cfg.get("model_type") or self.families[0]
        src = str(ckpt.config_path or ckpt.path)
        prefix, layers = layer_stack(ckpt, cfg, family, self.stack, self.proj["q"] + ".weight")
        base = f"{prefix}{self.stack}0."
        notes: list[str] = []
        d = hidden_size(cfg, ckpt.shape(base + self.proj["q"] + ".weight")[1], notes, self.proj["q"])
        H = require_heads(cfg, src)
        dh = mha_head_dim(src, cfg, d, H, first_key(cfg, D_KEYS), first_key(cfg, HEAD_KEYS))
        what = f"d={d}, heads={H}, head_dim={dh}"
        for p in ("q", "k", "v", "o"):
            name = base + self.proj[p] + ".weight"
            if name not in ckpt:
                raise InputError(f"{ckpt.path}: missing tensor {name!r}")
            check_shape(ckpt, name, (d, d), what)
        bias = any(base + self.proj[p] + ".bias" in ckpt for p in "qkv")
        if self.bias_key and cfg.get(self.bias_key) is not None and bool(cfg[self.bias_key]) != bias:
            raise InputError(f"{src}: {self.bias_key!r} is {cfg[self.bias_key]} but tensor "
                             f"'{base + self.proj['q']}.bias' is {'present' if bias else 'absent'}")
        extras = self._extras(cfg, notes)
        return ModelSpec(family=family, attention=attention_kind(H, H), layers=layers, d=d, heads=H, kv_heads=H,
                         head_dim=dh, value_dim=dh, bias=bias, rope=False, qk_norm=False, scale=default_scale(dh),
                         extras=extras, notes=notes, prefix=prefix)

    def layer(self, ckpt: Checkpoint, spec: ModelSpec, i: int) -> LayerWeights:
        base = f"{spec.prefix}{self.stack}{i}."
        d, H, dh = spec.d, spec.heads, spec.head_dim
        what = f"d={d}, heads={H}, head_dim={dh}"
        w, b, names = {}, {}, []
        for p in ("q", "k", "v", "o"):
            name = base + self.proj[p] + ".weight"
            check_shape(ckpt, name, (d, d), what)
            w[p] = ckpt.get(name)
            names.append(name)
        for p in ("q", "k", "v", "o"):
            name = base + self.proj[p] + ".bias"
            if name in ckpt:
                check_shape(ckpt, name, (d,), what)
                b[p] = ckpt.get(name)
                names.append(name)
        if spec.bias != any(p in b for p in "qkv"):
            raise InputError(f"{ckpt.path}: layer {i} q/k/v biases "
                             f"({base + self.proj['q']}.bias, ...) differ from layer 0's")
        params = sum(t.numel() for t in w.values())
        return separate_layer(i, w["q"], w["k"], w["v"], w["o"], H, H, dh,
                              bq=b.get("q"), bk=b.get("k"), bv=b.get("v"), bo=b.get("o"),
                              tensors=names, params=params)


class Bert(SeparateMHA):
    """BERT / RoBERTa / MiniLM: ``encoder.layer.N.attention.self.{query,key,value}``,
    ``attention.output.dense``; bidirectional, post-LN (nothing to fold)."""

    families = families_of("Bert")
    proj = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "o": "attention.output.dense"}

    def _extras(self, cfg, notes):
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            notes.append(f"position_embedding_type {pos!r}: its relative-position logit terms are "
                         f"outside W and are not analysed")
        return {"causal": bool(cfg.get("is_decoder")), "positions": pos}


class ViT(SeparateMHA):
    """ViT / DeiT: ``encoder.layer.N.attention.attention.{query,key,value}`` (bias per
    ``qkv_bias``), ``attention.output.dense`` (always biased); bidirectional, pre-LN."""

    families = families_of("ViT")
    proj = {"q": "attention.attention.query", "k": "attention.attention.key",
            "v": "attention.attention.value", "o": "attention.output.dense"}
    bias_key = "qkv_bias"

    def _extras(self, cfg, notes):
        return {"causal": False, "positions": "learned"}


class OPT(SeparateMHA):
    """OPT: ``decoder.layers.N.self_attn.{q,k,v,out}_proj`` with biases; causal. The query
    is scaled after its bias, which is still scale * x_bar^T W x_bar."""

    families = families_of("OPT")
    stack = "layers."
    proj = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.out_proj"}
    bias_key = "enable_bias"
    signature_leaf = "o"  # q_proj is Llama's name too; out_proj is OPT's own

    def _extras(self, cfg, notes):
        if cfg.get("do_layer_norm_before") is False:
            notes.append("do_layer_norm_before = false: post-LN blocks (x is the raw residual)")
        return {"causal": True, "positions": "learned"}


ADAPTERS = [Bert(), ViT(), OPT()]
