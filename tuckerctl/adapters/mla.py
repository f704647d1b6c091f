"""Multi-head latent attention (MLA): DeepSeek-V2/V3, Kimi-K2 and MiniCPM3
(docs/families.md, "Multi-head latent attention").

Tensors per layer under ``layers.{i}.self_attn.``::

    q_a_proj [r_q, d], q_a_layernorm [r_q], q_b_proj [H (d_n + d_r), r_q]   (q-LoRA)
    or q_proj [H (d_n + d_r), d]                                            (no q-LoRA)
    kv_a_proj_with_mqa [r_kv + d_r, d] = [c_kv rows; shared rope-key rows]
    kv_a_layernorm [r_kv]                (normalises c_kv only, not the rope key)
    kv_b_proj [H (d_n + d_v), r_kv]      viewed (H, d_n + d_v, r_kv): per head
                                         [W_kb^h (d_n rows); W_vb^h (d_v rows)]
    o_proj [d, H d_v]

The head stacks keep the shared latent projections as shared bases, so the
structured routines never see more than the latent widths (this is what makes
DeepSeek-V3 cheap):

* ``pre``  W[h] = Lb left[h] right[h]^T Rb^T with (q-LoRA) Lb = W_qa^T (d x r_q),
  left[h] = diag(g_q) W_qb^h^T (r_q x (d_n + d_r)); (no q-LoRA) no Lb and
  left[h] = W_q^h^T. Rb = kv_a_proj_with_mqa^T (d x (r_kv + d_r)) and
  right[h] = blockdiag(diag(g_kv) W_kb^h^T, I_{d_r}). Per-head columns are
  [nope (d_n); rope (d_r)]; the rope key is one vector shared by all heads.
* ``post`` Wt[h] = O_h^T V_h^T with left[h] = O_h^T (d x d_v), no Lb;
  Rb = W_kva^T (d x r_kv, the c_kv rows of kv_a_proj_with_mqa) and
  right[h] = diag(g_kv) W_vb^h^T (r_kv x d_v).

What stays outside the bilinear forms (the caller must know):

* The latent RMSNorms multiply by per-token scalars: the query-latent 1/rms
  (q-LoRA only) hits the whole logit, the key-latent 1/rms of c_kv hits only the
  nope part of the logit (the rope key is not normalised) and every value.
  ``qk_norm`` is True and ``extras['qk_norm_type']`` is ``"mla_latent"``.
* ``W`` is the zero-offset (content) form: RoPE rotates the d_r rope columns
  (interleaved pairs (2i, 2i+1) for DeepSeek-V2 and V3 with ``rope_interleave``;
  rotate_half pairs (i, i + d_r/2) for MiniCPM3), ``rope: true``. Under YaRN the
  rotary cos/sin carry an ``attention_factor`` that scales q_rope and k_rope; it is
  part of the zero-offset logit, so it is folded into the rope columns of both
  sides (recorded as ``extras['rope_attention_factor']``).
* ``scale`` = (d_n + d_r)^-0.5 * mscale^2 with mscale = 0.1 mscale_all_dim ln(factor) + 1
  when the rope scaling is not "default" and sets ``mscale_all_dim`` (DeepSeek's
  ``yarn_get_mscale``).
* MiniCPM3 multiplies each residual branch by scale_depth / sqrt(L). That happens
  in the decoder layer, after the attention module, so it is NOT folded into W_VO
  (the stacks describe the attention module's output); it is reported as
  ``extras['residual_scale']`` with a note.

Config ``head_dim`` is never read (transformers v5 sets it to qk_rope_head_dim for
MLA). ``num_key_value_heads`` must equal H. Biases (``attention_bias``: q_a_proj,
kv_a_proj_with_mqa, o_proj) use homogeneous coordinates: a last row on the shared
bases (a zero row on the side without bias), the o_proj bias stays outside.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..families import facts, families_of
from ..multilinear import HeadStack
from .base import (
    Adapter,
    LayerWeights,
    ModelSpec,
    cfg_get,
    check_heads,
    check_shape,
    find_layers,
    homogeneous,
    layer_stack,
    per_head,
    require_heads,
)

_STACK = r"layers\.(?P<layer>\d+)\.self_attn\."
_KV_A = "kv_a_proj_with_mqa.weight"


def split_kv_b(kv_b: Tensor, heads: int, d_n: int, d_v: int) -> tuple[Tensor, Tensor]:
    """kv_b_proj [H (d_n + d_v), r_kv] -> (W_kb (H, d_n, r_kv), W_vb (H, d_v, r_kv)).

    The rows are interleaved per head ([k_0; v_0; k_1; v_1; ...]), not [all K; all V]."""
    per_head = kv_b.reshape(heads, d_n + d_v, kv_b.shape[1])
    return per_head[:, :d_n], per_head[:, d_n:]


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_params(cfg: dict) -> dict:
    """Merged rope settings: legacy ``rope_scaling`` (``type``) overlaid by v5's ``rope_parameters``."""
    rp = dict(cfg.get("rope_scaling") or {})
    rp.update(cfg.get("rope_parameters") or {})
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def _scales(cfg: dict, qk_dim: int, src: str) -> tuple[float, float, list[str]]:
    """(logit scale, YaRN rope attention factor, notes) as transformers computes them."""
    rp = _rope_params(cfg)
    kind = rp["rope_type"]
    scale, factor_attn, notes = qk_dim ** -0.5, 1.0, []
    if kind == "default":
        return scale, factor_attn, notes
    factor = rp.get("factor")
    if kind == "yarn" and factor is None:
        mpe, orig = cfg.get("max_position_embeddings"), rp.get("original_max_position_embeddings")
        if not (mpe and orig):
            raise InputError(f"{src}: yarn rope scaling without 'factor' or max/original position lengths")
        factor = mpe / orig
    if rp.get("mscale_all_dim"):
        if factor is None:
            raise InputError(f"{src}: rope scaling {kind!r} with 'mscale_all_dim' but no 'factor'")
        m = _yarn_mscale(float(factor), float(rp["mscale_all_dim"]))
        scale *= m * m
    if kind == "yarn":
        if rp.get("attention_factor") is not None:
            factor_attn = float(rp["attention_factor"])
        elif rp.get("mscale") and rp.get("mscale_all_dim"):
            factor_attn = _yarn_mscale(factor, rp["mscale"]) / _yarn_mscale(factor, rp["mscale_all_dim"])
        else:
            factor_attn = _yarn_mscale(factor)
    else:
        notes.append(f"rope scaling {kind!r}: any cos/sin attention factor it applies is not modelled")
    return scale, factor_attn, notes


def _positive(src: str, name: str, v, allow_zero: bool = False) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise InputError(f"{src}: {name} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"integer, got {v!r}")
    return v


_PROJECTIONS = ("q_a_proj.weight", "q_b_proj.weight", "q_proj.weight", _KV_A, "kv_b_proj.weight",
                "o_proj.weight")


def _shapes(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Tensor suffix under ``self_attn.`` -> (shape the spec implies, required)."""
    ex, H, d = spec.extras, spec.heads, spec.d
    r_q, r_kv = ex["q_lora_rank"], ex["kv_lora_rank"]
    d_n, d_r, d_v = ex["qk_nope_head_dim"], ex["qk_rope_head_dim"], ex["v_head_dim"]
    if r_q is not None:
        query = {"q_a_proj.weight": ((r_q, d), True), "q_a_proj.bias": ((r_q,), False),
                 "q_a_layernorm.weight": ((r_q,), True), "q_b_proj.weight": ((H * (d_n + d_r), r_q), True)}
    else:
        query = {"q_proj.weight": ((H * (d_n + d_r), d), True), "q_proj.bias": ((H * (d_n + d_r),), False)}
    return {**query,
            _KV_A: ((r_kv + d_r, d), True), "kv_a_proj_with_mqa.bias": ((r_kv + d_r,), False),
            "kv_a_layernorm.weight": ((r_kv,), True), "kv_b_proj.weight": ((H * (d_n + d_v), r_kv), True),
            "o_proj.weight": ((d, H * d_v), True), "o_proj.bias": ((d,), False)}


def _what(spec: ModelSpec) -> str:
    ex = spec.extras
    return (f"d={spec.d}, heads={spec.heads}, q_lora_rank={ex['q_lora_rank']}, "
            f"kv_lora_rank={ex['kv_lora_rank']}, qk_nope={ex['qk_nope_head_dim']}, "
            f"qk_rope={ex['qk_rope_head_dim']}, v_head_dim={ex['v_head_dim']}")


class MLA(Adapter):
    """DeepSeek-V2/V3, Kimi-K2 and MiniCPM3 multi-head latent attention."""

    families = families_of("MLA")
    signature = _STACK + r"kv_a_proj_with_mqa\.weight"

    def spec(self, ckpt: Checkpoint, cfg: dict, overrides: dict) -> ModelSpec:
        family = cfg.get("model_type", "deepseek_v3")
        src = str(ckpt.config_path or ckpt.path)
        prefix, kvs = find_layers(ckpt, _STACK + r"kv_a_proj_with_mqa\.weight")
        if not kvs:
            raise InputError(f"{ckpt.path}: no '...layers.N.self_attn.{_KV_A}' tensors for family {family!r}")
        first = kvs[min(kvs)]
        base = first[: -len(_KV_A)]
        notes: list[str] = []

        def shape(proj: str) -> tuple[int, ...]:
            return tuple(ckpt.shape(base + proj + ".weight"))

        kv_a = shape("kv_a_proj_with_mqa")
        q_lora = base + "q_a_proj.weight" in ckpt
        if not q_lora and base + "q_proj.weight" not in ckpt:
            raise InputError(f"{ckpt.path}: missing tensor {base + 'q_a_proj.weight'!r} "
                             f"(or {base + 'q_proj.weight'!r} without q-LoRA)")
        H = require_heads(cfg, src)
        _positive(src, "num_attention_heads", H)
        G = cfg_get(cfg, "num_key_value_heads", default=H)
        if G != H:
            raise InputError(f"{src}: num_key_value_heads = {G!r}, but MLA needs it equal to "
                             f"num_attention_heads = {H!r}")

        # Dimensions: from the config when present, otherwise from tensor shapes (stated).
        d = cfg_get(cfg, "hidden_size")
        if d is None:
            d = kv_a[1]
            notes.append(f"hidden size d = {d} from {_KV_A}'s shape (no config)")
        r_kv = cfg_get(cfg, "kv_lora_rank")
        if r_kv is None:
            r_kv = shape("kv_b_proj")[1]
            notes.append(f"kv_lora_rank = {r_kv} from kv_b_proj's shape")
        d_r = cfg_get(cfg, "qk_rope_head_dim")
        if d_r is None:
            d_r = kv_a[0] - r_kv
            notes.append(f"qk_rope_head_dim = {d_r} from {_KV_A} rows - kv_lora_rank")
        d_n = cfg_get(cfg, "qk_nope_head_dim")
        if d_n is None:
            q_rows = shape("q_b_proj" if q_lora else "q_proj")[0]
            d_n = q_rows // H - d_r
            notes.append(f"qk_nope_head_dim = {d_n} from query rows / heads - rope dim")
        d_v = cfg_get(cfg, "v_head_dim")
        if d_v is None:
            if family == "minicpm3" and cfg.get("hidden_size") is not None:
                d_v = d // H  # MiniCPM3's documented default
            else:
                d_v = shape("kv_b_proj")[0] // H - d_n
                notes.append(f"v_head_dim = {d_v} from kv_b_proj rows / heads - nope dim")
        r_q = None
        if q_lora and "q_lora_rank" in cfg and cfg["q_lora_rank"] is None:
            raise InputError(f"{src}: q_lora_rank is null (no q-LoRA) but the checkpoint has "
                             f"{base + 'q_a_proj.weight'!r}")
        if q_lora:
            r_q = cfg_get(cfg, "q_lora_rank")
            if r_q is None:
                r_q = shape("q_a_proj")[0]
                if cfg:
                    notes.append(f"q_lora_rank = {r_q} from q_a_proj's shape")
        elif cfg.get("q_lora_rank") is not None:
            raise InputError(f"{src}: q_lora_rank = {cfg['q_lora_rank']!r} but the checkpoint has "
                             f"{base + 'q_proj.weight'!r} and no q_a_proj (config says q-LoRA)")
        for name, v in (("kv_lora_rank", r_kv), ("qk_nope_head_dim", d_n), ("v_head_dim", d_v)):
            _positive(src, name, v)
        _positive(src, "qk_rope_head_dim", d_r, allow_zero=True)
        if r_q is not None:
            _positive(src, "q_lora_rank", r_q)
        check_heads(src, d, H, H, d_n + d_r)
        if overrides.get("head_dim") is not None:
            notes.append("--head-dim is ignored for MLA (per-head width is qk_nope + qk_rope)")

        # Drops DeepSeek's multi-token-prediction layer (index num_hidden_layers).
        prefix, layers = layer_stack(ckpt, cfg, family, "layers.", f"self_attn.{_KV_A}")

        scale, rope_factor, scale_notes = _scales(cfg, d_n + d_r, src)
        notes += scale_notes
        row = facts(family)  # RoPE pair convention (V3 may override it with rope_interleave: false)
        pairing = "rotate_half" if row.rope_interleave_key and cfg.get("rope_interleave") is False else \
            row.rope_pairing
        rp = _rope_params(cfg)
        bias = (base + "q_a_proj.bias" in ckpt or base + "q_proj.bias" in ckpt
                or base + "kv_a_proj_with_mqa.bias" in ckpt)
        extras = {
            "q_lora_rank": r_q, "kv_lora_rank": r_kv, "qk_nope_head_dim": d_n,
            "qk_rope_head_dim": d_r, "v_head_dim": d_v, "rope_pairing": pairing,
            "rope_theta": cfg_get(cfg, "rope_theta", default=rp.get("rope_theta")),
            "qk_norm_type": "mla_latent",
        }
        if rp["rope_type"] != "default":
            extras["rope_type"] = rp["rope_type"]
        if rope_factor != 1.0:
            extras["rope_attention_factor"] = rope_factor
            notes.append(f"YaRN attention factor {rope_factor:.6g} folded into the rope columns of W")
        notes.append("latent RMSNorms: per-token 1/rms of the query latent scales each logit, that of "
                     "c_kv scales the nope part of the logit and every value (gains are folded)")
        if family == "minicpm3":
            # transformers: absent -> class default 1.4; explicit null -> sqrt(L), i.e. no scaling.
            depth = cfg.get("scale_depth", 1.4)
            res = 1.0 if depth is None else float(depth) / math.sqrt(layers)
            extras["residual_scale"] = res
            notes.append(f"MiniCPM3 scales the attention output by scale_depth/sqrt(L) = {res:.6g} "
                         f"before the residual add; not folded into W_VO")
        spec = ModelSpec(family=family, attention="MLA", layers=layers, d=d, heads=H, kv_heads=H,
                         head_dim=d_n + d_r, value_dim=d_v, bias=bias, rope=True, qk_norm=True, scale=scale,
                         extras=extras, notes=notes, prefix=prefix)
        for suffix, (expected, required) in _shapes(spec).items():  # config vs layer-0 shapes, up front
            if required or base + suffix in ckpt:
                check_shape(ckpt, base + suffix, expected, _what(spec))
        return spec

    def layer(self, ckpt: Checkpoint, spec: ModelSpec, i: int) -> LayerWeights:
        base = f"{spec.prefix}layers.{i}.self_attn."
        H, d = spec.heads, spec.d
        ex = spec.extras
        r_q, r_kv = ex["q_lora_rank"], ex["kv_lora_rank"]
        d_n, d_r, d_v = ex["qk_nope_head_dim"], ex["qk_rope_head_dim"], ex["v_head_dim"]
        shapes, what = _shapes(spec), _what(spec)
        names: list[str] = []

        def get(suffix: str) -> Tensor | None:
            """Read a tensor after checking its shape; None for an absent optional one."""
            name = base + suffix
            expected, required = shapes[suffix]
            if not required and name not in ckpt:
                return None
            check_shape(ckpt, name, expected, what)
            names.append(name)
            return ckpt.get(name)

        if r_q is not None:
            qa, q_bias = get("q_a_proj.weight"), get("q_a_proj.bias")
            g_q, qb = get("q_a_layernorm.weight"), get("q_b_proj.weight")
        else:
            qw, q_bias = get("q_proj.weight"), get("q_proj.bias")
        kva, kva_b = get(_KV_A), get("kv_a_proj_with_mqa.bias")
        g_kv, kvb = get("kv_a_layernorm.weight"), get("kv_b_proj.weight")
        o, o_b = get("o_proj.weight"), get("o_proj.bias")
        homog = q_bias is not None or kva_b is not None

        def with_row(m: Tensor, row: Tensor | None) -> Tensor:
            """Shared basis (n, q) -> (n + 1, q) with the bias (or zeros) as last row, when in use."""
            return homogeneous(m[None], row, homog)[0]

        af = float(ex.get("rope_attention_factor", 1.0))
        # Query side: per-head columns [nope; rope]; the YaRN factor rides on the rope columns.
        if r_q is not None:
            left_basis = with_row(qa.T, q_bias)  # (d[+1], r_q)
            left = qb.reshape(H, d_n + d_r, r_q).transpose(1, 2) * g_q.reshape(1, r_q, 1)
        else:
            left_basis = None
            left = homogeneous(per_head(qw, H, d_n + d_r), q_bias, homog)
        if af != 1.0:
            left = torch.cat([left[..., :d_n], left[..., d_n:] * af], -1)
        # Key side: shared basis kv_a^T; per head blockdiag(diag(g_kv) W_kb^h^T, af I_{d_r}).
        w_kb, w_vb = split_kv_b(kvb, H, d_n, d_v)
        right = torch.zeros(H, r_kv + d_r, d_n + d_r, dtype=kvb.dtype)
        right[:, :r_kv, :d_n] = w_kb.transpose(1, 2) * g_kv.reshape(1, r_kv, 1)
        right[:, r_kv:, d_n:] = af * torch.eye(d_r, dtype=kvb.dtype)
        right_basis = with_row(kva.T, kva_b)  # (d[+1], r_kv + d_r)
        pre = HeadStack(left, right, left_basis, right_basis)

        # Value/output side: O_h^T against the c_kv latent basis.
        o_t = o.reshape(d, H, d_v).permute(1, 0, 2)  # (H, d, d_v)
        v_basis = homogeneous(kva[None, :r_kv].transpose(1, 2), None if kva_b is None else kva_b[:r_kv],
                              kva_b is not None)[0]  # (d[+1], r_kv): a value bias only if c_kv has one
        post = HeadStack(o_t, w_vb.transpose(1, 2) * g_kv.reshape(1, r_kv, 1), None, v_basis)

        params = sum(ckpt.numel(n) for n in names if n.endswith(_PROJECTIONS))
        return LayerWeights(i, pre, post, o_b, names, params)


ADAPTERS = [MLA()]
