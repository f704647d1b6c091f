"""Decoder families with separate q/k/v/o projections under ``layers.{i}.self_attn``:
Llama (SmolLM2), Mistral, Qwen2/2.5, Qwen3, Gemma/Gemma2/Gemma3, OLMo, OLMo2, StarCoder2.

They differ only in defaults, biases, qk-norms and what lies outside the bilinear
forms (softcap, clip_qkv, scale); see architectures.md section 4.1-4.7, 4.16-4.18.
"""

from __future__ import annotations

from ..checkpoint import Checkpoint
from ..errors import InputError
from .base import (
    Adapter, LayerWeights, ModelSpec, attention_kind, cfg_get, check_heads, check_shape,
    default_scale, find_layers, separate_layer,
)

_STACK = r"(?P<layer>\d+)\.self_attn\."
_ATTN = r"layers\." + _STACK

# model_type -> (default kv heads when absent: "H" or int, default head_dim or None)
_DEFAULTS = {
    "llama": ("H", None), "mistral": (8, None), "qwen2": (32, None), "qwen3": (32, 128),
    "gemma": (16, 256), "gemma2": (4, 256), "gemma3_text": (4, 256), "gemma3": (4, 256),
    "olmo": ("H", None), "olmo2": ("H", None), "olmo3": ("H", None), "starcoder2": (2, None),
}
_QK_NORM = {"qwen3": "per_head", "gemma3_text": "per_head_1p", "gemma3": "per_head_1p",
            "olmo2": "full_width", "olmo3": "full_width"}


class LlamaLike(Adapter):
    families = tuple(_DEFAULTS)
    signature = _ATTN + r"q_proj\.weight"

    def spec(self, ckpt: Checkpoint, cfg: dict, overrides: dict) -> ModelSpec:
        family = cfg.get("model_type", "llama")
        src = str(ckpt.config_path or ckpt.path)
        prefix, qs = find_layers(ckpt, r"layers\." + _STACK + r"q_proj\.weight")
        if not qs:
            raise InputError(f"{ckpt.path}: no '...layers.N.self_attn.q_proj.weight' tensors for family {family!r}")
        q0 = ckpt.shape(qs[min(qs)])
        notes = []
        d = cfg_get(cfg, "hidden_size")
        if d is None:
            d = q0[1]
            notes.append(f"hidden size d = {d} read from q_proj's shape (no config)")
        H = cfg_get(cfg, "num_attention_heads")
        if H is None:
            raise InputError(f"{src}: missing field 'num_attention_heads' (give --heads)")
        kv_default, hd_default = _DEFAULTS.get(family, ("H", None))
        head_dim = cfg_get(cfg, "head_dim", default=hd_default if "head_dim" not in cfg else None)
        if head_dim is None:
            head_dim = q0[0] // H if not cfg else d // H
            if not cfg:
                notes.append(f"head dim = {head_dim} from q_proj rows / heads")
        G = cfg_get(cfg, "num_key_value_heads")
        if G is None:
            if cfg and kv_default != "H":
                G = kv_default
            else:
                k0 = ckpt.shape(qs[min(qs)].replace("q_proj", "k_proj"))
                G = k0[0] // head_dim
                if not cfg.get("model_type"):
                    notes.append(f"kv heads = {G} from k_proj rows / head dim")
        check_heads(src, d, H, G, head_dim)
        layers = cfg_get(cfg, "num_hidden_layers", default=None)
        present = sorted(i for i in qs if layers is None or i < layers)
        if layers is None:
            layers = len(present)
        if present != list(range(layers)):
            missing = sorted(set(range(layers)) - set(present))
            raise InputError(f"{ckpt.path}: missing tensor "
                             f"'{prefix}layers.{missing[0]}.self_attn.q_proj.weight' "
                             f"(config says {layers} layers)")
        name = qs[0]
        bias = (name.replace("q_proj.weight", "q_proj.bias") in ckpt
                or name.replace("q_proj.weight", "k_proj.bias") in ckpt
                or name.replace("q_proj.weight", "v_proj.bias") in ckpt)
        qk_norm = name.replace("q_proj.weight", "q_norm.weight") in ckpt
        extras = {}
        if qk_norm:
            extras["qk_norm_type"] = _QK_NORM.get(family, "per_head")
        scale = default_scale(head_dim)
        if cfg.get("query_pre_attn_scalar") and family.startswith("gemma") and family != "gemma":
            scale = float(cfg["query_pre_attn_scalar"]) ** -0.5
        if cfg.get("attn_logit_softcapping"):
            extras["softcap"] = cfg["attn_logit_softcapping"]
        if cfg.get("clip_qkv"):
            extras["clip_qkv"] = cfg["clip_qkv"]
            notes.append(f"clip_qkv = {cfg['clip_qkv']} clamps q/k/v: W is exact only inside the clip")
        rp = cfg.get("rope_parameters") or {}
        extras["rope_theta"] = cfg_get(cfg, "rope_theta", default=rp.get("rope_theta"))
        prf = cfg_get(cfg, "partial_rotary_factor", default=rp.get("partial_rotary_factor"))
        if prf and prf != 1:
            extras["partial_rotary_factor"] = prf
        if family.startswith("gemma2") or family.startswith("gemma3"):
            extras["post_attention_norm"] = True
        return ModelSpec(family, attention_kind(H, G), layers, d, H, G, head_dim, head_dim,
                         bias, True, qk_norm, scale, extras, notes, prefix)

    def layer(self, ckpt: Checkpoint, spec: ModelSpec, i: int) -> LayerWeights:
        base = f"{spec.prefix}layers.{i}.self_attn."
        H, G, dh, d = spec.heads, spec.kv_heads, spec.head_dim, spec.d
        what = f"d={d}, heads={H}, kv_heads={G}, head_dim={dh}"
        shapes = {"q_proj": (H * dh, d), "k_proj": (G * dh, d), "v_proj": (G * dh, d), "o_proj": (d, H * dh)}
        w = {}
        for proj, shape in shapes.items():
            check_shape(ckpt, base + proj + ".weight", shape, what)
            w[proj] = ckpt.get(base + proj + ".weight")
        names = [base + p + ".weight" for p in shapes]
        b = {}
        for proj in shapes:
            n = base + proj + ".bias"
            if n in ckpt:
                check_shape(ckpt, n, (shapes[proj][0],), what)
                b[proj] = ckpt.get(n)
                names.append(n)
        gains = {}
        for norm in ("q_norm", "k_norm"):
            n = base + norm + ".weight"
            if n in ckpt:
                g = ckpt.get(n)
                if spec.extras.get("qk_norm_type") == "per_head_1p":
                    g = 1.0 + g
                gains[norm] = g
                names.append(n)
        params = sum(w[p].numel() for p in shapes)
        return separate_layer(
            i, w["q_proj"], w["k_proj"], w["v_proj"], w["o_proj"], H, G, dh,
            bq=b.get("q_proj"), bk=b.get("k_proj"), bv=b.get("v_proj"), bo=b.get("o_proj"),
            q_gain=gains.get("q_norm"), k_gain=gains.get("k_norm"), tensors=names, params=params)
