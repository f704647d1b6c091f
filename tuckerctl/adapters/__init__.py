"""Architecture adapters: detect a checkpoint's family and read its layers.

``detect`` picks the adapter from ``config.json``'s ``model_type`` (or the nested
``text_config`` of multimodal checkpoints), or, without a config, from tensor names
plus ``--heads``/``--kv-heads``/``--head-dim``.
"""

from __future__ import annotations

import re

from ..checkpoint import Checkpoint
from ..errors import InputError, arg
from ..families import FAMILIES
from . import encoders, fused, mla
from .base import D_KEYS, HEAD_KEYS, KV_KEYS, Adapter, LayerWeights, ModelSpec, cfg_get
from .llama import LlamaLike

# One adapter per layout; tuckerctl.families says which model types each reads.
ADAPTERS: list[Adapter] = [LlamaLike(), *encoders.ADAPTERS, *fused.ADAPTERS, *mla.ADAPTERS]

# Command-line overrides, written under every config alias the adapters read.
_ALIASES = {"heads": HEAD_KEYS, "kv_heads": KV_KEYS, "head_dim": ("head_dim",)}


def family_adapter(family: str) -> Adapter:
    for a in ADAPTERS:
        if family in a.families:
            return a
    known = sorted(f for a in ADAPTERS for f in a.families)
    from ..usage import did_you_mean

    raise InputError(f"unknown family {family!r}{did_you_mean(family, known)} (model_type); "
                     f"supported: {', '.join(known)}")


def _text_config(cfg: dict) -> dict:
    """The language model's fields of a multimodal config (the one place that unwraps
    ``text_config``): the nested config when the wrapper is not a supported family (Kimi-K2.5
    wraps DeepSeek-V3) or has no width of its own (Gemma3: ``model_type: gemma3``, fields
    under ``text_config``; the nested model_type, else the wrapper's)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return cfg
    if text.get("model_type") and cfg.get("model_type") not in FAMILIES:
        return {**text}
    if cfg_get(cfg, *D_KEYS) is None:
        return {**text, "model_type": text.get("model_type") or cfg.get("model_type")}
    return cfg


def detect(ckpt: Checkpoint, heads: int | None = None, kv_heads: int | None = None,
           head_dim: int | None = None, family: str | None = None) -> tuple[Adapter, ModelSpec]:
    """Choose the adapter and read the model's attention structure."""
    cfg = _text_config(dict(ckpt.config or {}))
    overrides = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    for key, value in overrides.items():
        if value is not None:
            for alias in _ALIASES[key]:
                cfg[alias] = value
    family = family or cfg.get("model_type")
    if family is not None and not isinstance(family, str):
        raise InputError(f"{ckpt.path}: config field 'model_type' must be a string, got {family!r}")
    if family:
        adapter = family_adapter(family)
        cfg.setdefault("model_type", family)
    else:
        # The Llama-like adapter's names are the most generic (OPT and MLA q_proj match
        # them too), so it is tried last.
        ordered = ADAPTERS[1:] + ADAPTERS[:1]
        matches = [a for a in ordered
                   if a.signature and any(re.search(a.signature + "$", n) for n in ckpt.names())]
        if not matches:
            raise InputError(f"{ckpt.path}: no config.json and no known attention tensor names; "
                             f"give {arg('config')} or {arg('family')}")
        adapter = matches[0]
        if heads is None:
            raise InputError(f"{ckpt.path}: no config.json beside it: give {arg('config')}, or {arg('heads')} "
                             f"(and {arg('kv_heads')}/{arg('head_dim')} where needed)")
    spec = adapter.spec(ckpt, cfg, {k: v for k, v in overrides.items() if v is not None})
    if not ckpt.config:
        spec.notes.insert(0, f"no config.json: structure inferred from tensor names and --heads={heads}")
    return adapter, spec


__all__ = ["ADAPTERS", "Adapter", "LayerWeights", "ModelSpec", "detect", "family_adapter"]
