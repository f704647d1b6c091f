"""Decoder families with separate q/k/v/o projections under ``layers.{i}.self_attn``:
Llama (SmolLM2), Mistral, Qwen2/2.5, Qwen3, Gemma/Gemma2/Gemma3, OLMo, OLMo2/3, StarCoder2.

They differ only in biases, qk-norms and what lies outside the bilinear forms
(softcap, clip_qkv, scale); see docs/families.md.
Dimensions that the config leaves out are read from the tensor shapes (and said so
in the notes) rather than taken from family defaults; every dimension is checked
against layer 0's shapes when the spec is built, and against each layer's when read.
"""

from __future__ import annotations

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..families import facts, families_of
from .base import (
    Adapter,
    LayerWeights,
    ModelSpec,
    attention_kind,
    cfg_get,
    check_heads,
    check_shape,
    default_scale,
    find_layers,
    layer_stack,
    require_heads,
    separate_layer,
)

_STACK = r"(?P<layer>\d+)\.self_attn\."
_ATTN = r"layers\." + _STACK
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    H, G, dh, d = spec.heads, spec.kv_heads, spec.head_dim, spec.d
    return {"q_proj": (H * dh, d), "k_proj": (G * dh, d), "v_proj": (G * dh, d), "o_proj": (d, H * dh)}


def _what(spec: ModelSpec) -> str:
    return f"d={spec.d}, heads={spec.heads}, kv_heads={spec.kv_heads}, head_dim={spec.head_dim}"


def _from_rows(ckpt: Checkpoint, name: str, per: int, field: str) -> int:
    """``rows(name) / per``, an error when it does not divide (e.g. q rows / heads)."""
    rows = ckpt.shape(name)[0]
    if rows % per:
        raise InputError(f"{ckpt.path}: tensor {name!r} has {rows} rows, not a multiple of {field}={per}")
    return rows // per


class LlamaLike(Adapter):
    families = families_of("LlamaLike")
    signature = _ATTN + r"q_proj\.weight"

    def spec(self, ckpt: Checkpoint, cfg: dict, overrides: dict) -> ModelSpec:
        family = cfg.get("model_type") or "llama"
        src = str(ckpt.config_path or ckpt.path)
        prefix, qs = find_layers(ckpt, _ATTN + r"q_proj\.weight")
        if not qs:
            raise InputError(f"{ckpt.path}: no '...layers.N.self_attn.q_proj.weight' tensors for family {family!r}")
        base = f"{prefix}layers.{min(qs)}.self_attn."
        notes = []

        d = cfg_get(cfg, "hidden_size")
        if d is None:
            d = ckpt.shape(base + "q_proj.weight")[-1]
            notes.append(f"hidden size d = {d} read from q_proj's shape")
        H = require_heads(cfg, src)
        check_heads(src, d, H, 1, 1)
        head_dim = cfg_get(cfg, "head_dim")
        if head_dim is None:
            head_dim = _from_rows(ckpt, base + "q_proj.weight", H, "heads")
            if head_dim != d // H or not ckpt.config:
                notes.append(f"head dim = {head_dim} from q_proj rows / heads")
        check_heads(src, d, H, 1, head_dim)
        check_shape(ckpt, base + "q_proj.weight", (H * head_dim, d), f"d={d}, heads={H}, head_dim={head_dim}")
        G = cfg_get(cfg, "num_key_value_heads")
        if G is None:
            G = _from_rows(ckpt, base + "k_proj.weight", head_dim, "head_dim")
            if G != H or not ckpt.config:
                notes.append(f"kv heads = {G} from k_proj rows / head dim")
        check_heads(src, d, H, G, head_dim)

        prefix, layers = layer_stack(ckpt, cfg, family, "layers.", "self_attn.q_proj.weight")

        bias = any(base + p + ".bias" in ckpt for p in _PROJ[:3])
        qk_norm = base + "q_norm.weight" in ckpt or base + "k_norm.weight" in ckpt
        extras = {}
        scale = default_scale(head_dim)
        row = facts(family)
        if row.pre_attn_scalar and cfg.get("query_pre_attn_scalar"):
            scale = float(cfg["query_pre_attn_scalar"]) ** -0.5
        if cfg.get("attn_logit_softcapping"):
            extras["softcap"] = cfg["attn_logit_softcapping"]
        if cfg.get("clip_qkv"):
            extras["clip_qkv"] = cfg["clip_qkv"]
            notes.append(f"clip_qkv = {cfg['clip_qkv']} clamps q/k/v: W is exact only inside the clip")
        rp = cfg.get("rope_parameters") or {}
        if rp and all(isinstance(v, dict) for v in rp.values()):
            # One RoPE per layer type (Gemma3: local sliding / global layers): report all,
            # and the global layers' theta as the model's.
            extras["rope_theta_by_layer_type"] = {k: v.get("rope_theta") for k, v in rp.items()}
            rp = rp.get("full_attention") or next(iter(rp.values()))
        extras["rope_theta"] = cfg_get(cfg, "rope_theta", default=rp.get("rope_theta"))
        prf = cfg_get(cfg, "partial_rotary_factor", default=rp.get("partial_rotary_factor"))
        if prf and prf != 1:
            extras["partial_rotary_factor"] = prf
        if row.post_attention_norm:
            extras["post_attention_norm"] = True
        spec = ModelSpec(family=family, attention=attention_kind(H, G), layers=layers, d=d, heads=H, kv_heads=G,
                         head_dim=head_dim, value_dim=head_dim, bias=bias, rope=True, qk_norm=qk_norm,
                         scale=scale, extras=extras, notes=notes, prefix=prefix)

        # Verify every dimension against layer 0 now, so a wrong config fails at detection.
        for proj, shape in _shapes(spec).items():
            check_shape(ckpt, base + proj + ".weight", shape, _what(spec))
        if qk_norm:
            extras["qk_norm_type"] = self._qk_norm_type(ckpt, spec, base)
            if not row.qk_norm_one_plus_w and not ckpt.config:
                notes.append("qk-norm gains read as w; Gemma3-style (1 + w) gains need --family gemma3_text")
        return spec

    @staticmethod
    def _qk_norm_type(ckpt: Checkpoint, spec: ModelSpec, base: str) -> str:
        """``per_head`` (gain of width d_h, one RMS per head: Qwen3, Gemma3) or
        ``full_width`` (gain over all heads, one RMS over the whole projection: OLMo2),
        from q_norm's shape; ``_1p`` when the gain is applied as (1 + w)."""
        H, G, dh = spec.heads, spec.kv_heads, spec.head_dim
        full = tuple(ckpt.shape(base + "q_norm.weight")) == (H * dh,) and H > 1
        kind, width = ("full_width", (H * dh, G * dh)) if full else ("per_head", (dh, dh))
        what = f"{kind} qk-norm with {_what(spec)}"
        check_shape(ckpt, base + "q_norm.weight", (width[0],), what)
        check_shape(ckpt, base + "k_norm.weight", (width[1],), what)
        return kind + ("_1p" if facts(spec.family).qk_norm_one_plus_w else "")

    def layer(self, ckpt: Checkpoint, spec: ModelSpec, i: int) -> LayerWeights:
        base = f"{spec.prefix}layers.{i}.self_attn."
        first = f"{spec.prefix}layers.0.self_attn."
        what = _what(spec)
        shapes = _shapes(spec)
        names = [base + p + ".weight" for p in _PROJ]
        for proj, shape in shapes.items():
            check_shape(ckpt, base + proj + ".weight", shape, what)
        w = {p: ckpt.get(base + p + ".weight") for p in _PROJ}
        # Every layer has the biases layer 0 has: a bias missing in one layer is a
        # damaged file, not a different model.
        b = {}
        for proj in _PROJ:
            n = base + proj + ".bias"
            if (first + proj + ".bias" in ckpt) != (n in ckpt):
                raise InputError(f"{ckpt.path}: {'missing' if n not in ckpt else 'unexpected'} tensor {n!r} "
                                 f"(layer 0 {'has' if n not in ckpt else 'has no'} {proj}.bias)")
            if n in ckpt:
                check_shape(ckpt, n, (shapes[proj][0],), what)
                b[proj] = ckpt.get(n)
                names.append(n)
        gains = {}
        kind = spec.extras.get("qk_norm_type", "")
        widths = {"q_norm": spec.head_dim, "k_norm": spec.head_dim}
        if kind.startswith("full_width"):
            widths = {"q_norm": spec.heads * spec.head_dim, "k_norm": spec.kv_heads * spec.head_dim}
        for norm, width in widths.items():
            n = base + norm + ".weight"
            if not spec.qk_norm:
                if n in ckpt:
                    raise InputError(f"{ckpt.path}: unexpected tensor {n!r} (layer 0 has no qk-norm)")
                continue
            check_shape(ckpt, n, (width,), f"{kind} qk-norm with {what}")  # also: missing -> error
            g = ckpt.get(n)
            gains[norm] = 1.0 + g if kind.endswith("_1p") else g
            names.append(n)
        params = sum(w[p].numel() for p in _PROJ)
        return separate_layer(
            i, w["q_proj"], w["k_proj"], w["v_proj"], w["o_proj"], spec.heads, spec.kv_heads, spec.head_dim,
            bq=b.get("q_proj"), bk=b.get("k_proj"), bv=b.get("v_proj"), bo=b.get("o_proj"),
            q_gain=gains.get("q_norm"), k_gain=gains.get("k_norm"), tensors=names, params=params)
