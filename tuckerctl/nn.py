"""Tucker attention: run a Tucker-factorised attention layer without forming W (docs/mathematics.md section 7).

A layer is two Tucker factorisations (docs/mathematics.md section 1):

* pre-softmax  ``W  ~ C  x1 U1 x2 U2 x3 U3``  (U1: H x r1 head, U2: m x r2 query, U3: n x r3 key)
* post-softmax ``Wt ~ Ct x1 Ut1 x2 Ut2 x3 Ut3`` (Ut2: d x s2 output, Ut3: n' x s3 value)

Query/key/value sides may be homogeneous (m, n, n' = d + 1 where the model had biases):
the last row multiplies the constant 1, so ``[x, 1] U = x U[:d] + U[d]``.

The forward pass works on the factors only::

    P = X U2 (N x r2),  K = X U3 (N x r3),  V = X Ut3 (N x s3)
    M_h = sum_j U1[h, j] C[j] (r2 x r3),    Q_h = P M_h (N x r3)
    A_h = softmax(scale * Q_h K^T + mask)
    Y   = sum_h A_h V Mt_h^T Ut2^T (+ out_bias),   Mt_h = sum_j Ut1[h, j] Ct[j]

From the attention kernel's point of view this is multi-query attention with one
shared K of width r3 and one shared V of width s3, so it runs through
``torch.nn.functional.scaled_dot_product_attention``; a decoding cache stores
``r3 + s3`` numbers per token (:class:`LatentKVCache`).

Positions: the module has no access to the original per-head RoPE (it acts in
each head's d_h-dimensional space, which the factorisation no longer has).
``rope_theta`` turns on *latent RoPE*: ``Q_h`` and ``K`` are rotated in the
r3-dimensional latent key space with one frequency schedule. That keeps logits
a function of relative position but is a **different positional kernel** from
the original model's: an approximation that needs fine-tuning. Logit softcapping
and ALiBi are not supported (NotImplementedError).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .families import facts

if TYPE_CHECKING:
    from .adapters import ModelSpec

LATENT_ROPE_WARNING = (
    "latent RoPE rotates queries and keys in the r3-dimensional Tucker key space; this changes "
    "the positional kernel relative to the original model's per-head RoPE, so outputs are an "
    "approximation that needs fine-tuning (exact only when every position is 0)")
NO_ROPE_WARNING = (
    "the source model uses RoPE but this module applies no rotation: it computes the "
    "zero-offset (content) attention only; pass latent_rope=True for a relative-position "
    "approximation (which needs fine-tuning)")



@dataclass
class LatentKVCache:
    """Decoding cache of a :class:`TuckerAttention`: only the latent keys and values.

    ``k``: (B, T, r3) latent keys (already rotated when latent RoPE is on);
    ``v``: (B, T, s3) latent values; ``key_mask``: (B, T) bool, True = real token
    (None = all real). ``length`` = T, the position of the next token."""

    k: Tensor
    v: Tensor
    key_mask: Tensor | None = None

    @property
    def length(self) -> int:
        return self.k.shape[1]

    @property
    def width(self) -> int:
        """Numbers stored per token: r3 + s3."""
        return self.k.shape[-1] + self.v.shape[-1]


def _as_tucker(obj) -> tuple[Tensor, list[Tensor]]:
    """A ``multilinear.Tucker``, TensorLy ``TuckerTensor`` or ``(core, [U1, U2, U3])`` pair:
    all three unpack as ``core, factors``."""
    core, factors = obj
    return core, list(factors)


def _default_causal(spec: ModelSpec) -> bool:
    """The spec's ``causal`` extra when it has one, else the family's default."""
    causal = spec.extras.get("causal")
    return facts(spec.family).causal if causal is None else bool(causal)


def _output(y: Tensor, out_bias: Tensor | None, unbatched: bool, cache: LatentKVCache | None):
    """The end of both modules' forward: the output bias, the batch dimension of an unbatched
    input, and ``(y, cache)`` when a cache was given or asked for (else ``y``)."""
    if out_bias is not None:
        y = y + out_bias
    if unbatched:
        y = y.squeeze(0)
    return y if cache is None else (y, cache)


def _homogeneous_apply(x: Tensor, U: Tensor) -> Tensor:
    """[x, 1] @ U when U has one row more than x is wide, else x @ U."""
    d = x.shape[-1]
    if U.shape[0] == d + 1:
        return x @ U[:d] + U[d]
    return x @ U


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def latent_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate the last dimension of ``x`` (..., N, r) by ``positions`` (N,) or (B, N).

    One frequency schedule over the r dimensions, ``theta ** (-2i / r_even)``, with
    the rotate_half pairing (i, i + r_even/2); an odd last dimension is left unrotated.
    For ``x`` of shape (B, H, N, r) with (B, N) positions, broadcasting over H is handled."""
    r = x.shape[-1]
    even = r - r % 2
    if even == 0:
        return x
    inv_freq = theta ** (-torch.arange(0, even, 2, dtype=torch.float64, device=x.device) / even)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., N, even/2)
    angles = torch.cat([angles, angles], dim=-1)
    if x.dim() == 4 and angles.dim() == 3:  # (B, N, e) against (B, H, N, r)
        angles = angles.unsqueeze(1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    head, tail = x[..., :even], x[..., even:]
    return torch.cat([head * cos + _rotate_half(head) * sin, tail], dim=-1)


class TuckerAttention(nn.Module):
    """Attention layer from the Tucker factors of its pre- and post-softmax tensors.

    ``pre_core`` (r1, r2, r3), ``pre_factors`` = [U1 (H, r1), U2 (d or d+1, r2), U3 (d or d+1, r3)];
    ``post_core`` (s1, s2, s3), ``post_factors`` = [Ut1 (H, s1), Ut2 (d, s2), Ut3 (d or d+1, s3)].
    ``scale`` is the model's logit scale (logit = scale * [x_i,1] W[h] [x_j,1]^T);
    ``out_bias`` (d,) is added to the output; ``rope_theta`` turns on latent RoPE
    (see :data:`LATENT_ROPE_WARNING`). ``causal`` is the default of ``forward``.
    Factors are ``nn.Parameter`` so the layer can be fine-tuned; the module never
    forms an H x d x d tensor. ``x`` width is ``d = Ut2.shape[0]``.
    """

    def __init__(self, pre_core: Tensor, pre_factors, post_core: Tensor, post_factors, scale: float,
                 out_bias: Tensor | None = None, rope_theta: float | None = None, causal: bool = False):
        super().__init__()
        U1, U2, U3 = pre_factors
        V1, V2, V3 = post_factors
        d = V2.shape[0]
        H = U1.shape[0]
        r1, r2, r3 = pre_core.shape
        s1, s2, s3 = post_core.shape
        problems = []
        if V1.shape[0] != H:
            problems.append(f"head factors disagree: pre has {H} heads, post {V1.shape[0]}")
        if (U1.shape[1], U2.shape[1], U3.shape[1]) != (r1, r2, r3):
            problems.append(f"pre factors {[tuple(u.shape) for u in (U1, U2, U3)]} do not match core {(r1, r2, r3)}")
        if (V1.shape[1], V2.shape[1], V3.shape[1]) != (s1, s2, s3):
            problems.append(f"post factors {[tuple(u.shape) for u in (V1, V2, V3)]} do not match core {(s1, s2, s3)}")
        for name, U in (("query", U2), ("key", U3), ("value", V3)):
            if U.shape[0] not in (d, d + 1):
                problems.append(f"{name} factor has {U.shape[0]} rows; expected d={d} or d+1 (homogeneous)")
        if out_bias is not None and tuple(out_bias.shape) != (d,):
            problems.append(f"out_bias has shape {tuple(out_bias.shape)}, expected ({d},)")
        if problems:
            raise ValueError("TuckerAttention: " + "; ".join(problems))
        self.pre_core = nn.Parameter(pre_core.detach().clone())
        self.U1, self.U2, self.U3 = (nn.Parameter(u.detach().clone()) for u in (U1, U2, U3))
        self.post_core = nn.Parameter(post_core.detach().clone())
        self.V1, self.V2, self.V3 = (nn.Parameter(u.detach().clone()) for u in (V1, V2, V3))
        self.out_bias = None if out_bias is None else nn.Parameter(out_bias.detach().clone().to(V2.dtype))
        self.scale = float(scale)
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.causal = bool(causal)
        self.source_rope = False  # set by from_tucker when the source model used RoPE

    # ------------------------------------------------------------ construction

    @classmethod
    def from_tucker(cls, pre, post, spec, out_bias: Tensor | None = None, latent_rope: bool = False,
                    causal: bool | None = None, dtype: torch.dtype | None = None,
                    layer: int | None = None) -> TuckerAttention:
        """Build from two ``Tucker`` objects (or ``(core, factors)`` pairs) and the model's
        :class:`~tuckerctl.adapters.ModelSpec` (a checkpoint's ``model`` record converts with
        ``ModelSpec.from_dict``).

        ``latent_rope``: rotate in the latent key space with the model's ``rope_theta``
        (warns: an approximation). ``causal``: default masking; None = causal except for
        encoder families (BERT, ViT, ...). ``layer``: the layer index, needed when the logit
        scale depends on it (GPT-2's ``scale_attn_by_inverse_layer_idx``). Softcap, ALiBi,
        qk-norm and clip_qkv models raise NotImplementedError: their logits are not a
        bilinear form of x alone."""
        family, extras = spec.family, spec.extras
        if extras.get("softcap") or extras.get("attn_logit_softcapping"):
            raise NotImplementedError(
                f"TuckerAttention: logit softcapping ({family}) is not supported; the module computes "
                f"plain softmax(scale * logits)")
        if extras.get("alibi") or facts(family).alibi:
            raise NotImplementedError(
                f"TuckerAttention: ALiBi position biases ({family}) are not supported")
        if spec.qk_norm:
            raise NotImplementedError(
                f"TuckerAttention: qk-norm ({family}) scales each logit by per-token 1/rms factors of "
                f"the per-head queries/keys, which the Tucker factors do not carry")
        if extras.get("clip_qkv"):
            raise NotImplementedError(f"TuckerAttention: clip_qkv ({family}) is a non-linear clamp; not supported")
        pre_core, pre_f = _as_tucker(pre)
        post_core, post_f = _as_tucker(post)
        if pre_f[0].shape[0] != spec.heads:
            raise ValueError(f"TuckerAttention: pre head factor has {pre_f[0].shape[0]} rows, "
                             f"spec says {spec.heads} heads")
        if post_f[1].shape[0] != spec.d:
            raise ValueError(f"TuckerAttention: post output factor has {post_f[1].shape[0]} rows, spec says d={spec.d}")
        theta = None
        if latent_rope:
            theta = extras.get("rope_theta")
            if theta is None:
                if not spec.rope:
                    raise ValueError(f"TuckerAttention: latent_rope requested but {family or 'the model'} "
                                     f"has no RoPE (no rope_theta)")
                theta = 10000.0  # the common default when a RoPE config omits it
            warnings.warn(LATENT_ROPE_WARNING, stacklevel=2)
        if causal is None:
            causal = _default_causal(spec)
        if dtype is not None:
            pre_core, post_core = pre_core.to(dtype), post_core.to(dtype)
            pre_f = [u.to(dtype) for u in pre_f]
            post_f = [u.to(dtype) for u in post_f]
            out_bias = None if out_bias is None else out_bias.to(dtype)
        if extras.get("scale_attn_by_inverse_layer_idx") and layer is None:
            raise ValueError(f"TuckerAttention: {family or 'this model'} scales layer i's logits by "
                             f"1/(i + 1) (scale_attn_by_inverse_layer_idx); pass layer=i")
        scale = spec.scale if layer is None else spec.layer_scale(layer)
        module = cls(pre_core, pre_f, post_core, post_f, scale, out_bias,
                     rope_theta=theta, causal=causal)
        module.source_rope = spec.rope
        return module

    @classmethod
    def from_checkpoint(cls, path, layer: int, device=None, latent_rope: bool = False,
                        causal: bool | None = None, dtype: torch.dtype | None = None) -> TuckerAttention:
        """Load one layer of a Tucker-format checkpoint written by ``tuckerctl compress``.

        A layer in the ``qk_input`` structure (the default for RoPE models) gives a
        :class:`QKInputAttention`, which runs the model's own RoPE and qk-norm exactly."""
        from .adapters import ModelSpec  # lazy: the module itself needs only torch
        from .tucker_format import QK_INPUT, load

        ck = load(path)
        t = ck.layer(layer)
        if t.structure == QK_INPUT:
            module = QKInputAttention.from_layer(ck, layer, causal=causal, dtype=dtype)
            return module.to(device) if device is not None else module
        module = cls.from_tucker(t.pre, t.post, ModelSpec.from_dict(ck.spec),
                                 out_bias=t.out_bias, latent_rope=latent_rope, causal=causal, dtype=dtype,
                                 layer=layer)
        return module.to(device) if device is not None else module

    # ------------------------------------------------------------ properties

    @property
    def d(self) -> int:
        return self.V2.shape[0]

    @property
    def heads(self) -> int:
        return self.U1.shape[0]

    @property
    def ranks(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """((r1, r2, r3), (s1, s2, s3))."""
        return tuple(self.pre_core.shape), tuple(self.post_core.shape)

    @property
    def kv_cache_width(self) -> int:
        """Numbers cached per token when decoding: r3 + s3."""
        return self.pre_core.shape[2] + self.post_core.shape[2]

    @property
    def approximation_note(self) -> str | None:
        """Why this module's output differs from the source model's beyond the truncation
        error (position handling), or None when it does not."""
        if self.rope_theta is not None:
            return LATENT_ROPE_WARNING
        if self.source_rope:
            return NO_ROPE_WARNING
        return None

    def extra_repr(self) -> str:
        (r1, r2, r3), (s1, s2, s3) = self.ranks
        hom = lambda U: "+1" if U.shape[0] == self.d + 1 else ""  # noqa: E731
        parts = [f"d={self.d}{'' if not hom(self.U2) else ' (homogeneous q/k)'}", f"heads={self.heads}",
                 f"pre_ranks=({r1}, {r2}, {r3})", f"post_ranks=({s1}, {s2}, {s3})",
                 f"kv_cache_width={self.kv_cache_width}", f"scale={self.scale:.6g}",
                 f"out_bias={self.out_bias is not None}", f"causal={self.causal}"]
        if hom(self.V3):
            parts.append("homogeneous v")
        if self.rope_theta is not None:
            parts.append(f"latent_rope_theta={self.rope_theta:g} (approximation)")
        return ", ".join(parts)

    # ------------------------------------------------------------ forward

    def head_mixers(self) -> tuple[Tensor, Tensor]:
        """M_h (H, r2, r3) and Mt_h (H, s2, s3): the core contracted with the head factor."""
        M = torch.einsum("hj,jab->hab", self.U1, self.pre_core)
        Mt = torch.einsum("hj,jab->hab", self.V1, self.post_core)
        return M, Mt

    def _mask(self, batch: int, n_new: int, past: int, causal: bool, key_mask: Tensor | None,
              device) -> Tensor | None:
        """Boolean SDPA mask (B, 1, n_new, past + n_new), True = may attend; None = no mask."""
        if not causal and key_mask is None:
            return None
        total = past + n_new
        allowed = torch.ones(batch, 1, n_new, total, dtype=torch.bool, device=device)
        if causal:
            q_pos = torch.arange(past, total, device=device)[:, None]
            allowed = allowed & (torch.arange(total, device=device)[None, :] <= q_pos)
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :].to(torch.bool)
        return allowed

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, causal: bool | None = None,
                positions: Tensor | None = None, cache: LatentKVCache | None = None,
                use_cache: bool = False):
        """Attention output for ``x`` (B, N, d) or (N, d).

        ``attention_mask`` (B, N) bool, True = real token: masks those keys (outputs at padded
        query positions are returned but meaningless). ``causal``: None = the module default.
        ``positions`` (N,) or (B, N): latent-RoPE positions (default ``cache.length + arange(N)``).
        ``cache``/``use_cache``: decoding; the new tokens' latent K and V are appended and
        ``(y, cache)`` is returned. Computation runs in the parameters' dtype."""
        causal = self.causal if causal is None else causal
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
        if x.shape[-1] != self.d:
            raise ValueError(f"TuckerAttention: input width {x.shape[-1]} != d = {self.d}")
        x = x.to(self.V2.dtype)
        B, N, _ = x.shape
        past = 0 if cache is None else cache.length

        M, Mt = self.head_mixers()
        P = _homogeneous_apply(x, self.U2)  # (B, N, r2)
        K = _homogeneous_apply(x, self.U3)  # (B, N, r3)
        V = _homogeneous_apply(x, self.V3)  # (B, N, s3)
        Q = torch.einsum("bna,hac->bhnc", P, M)  # (B, H, N, r3)
        if self.rope_theta is not None:
            if positions is None:
                positions = torch.arange(past, past + N, device=x.device)
            Q = latent_rope(Q, positions, self.rope_theta)
            K = latent_rope(K, positions, self.rope_theta)

        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.to(device=x.device, dtype=torch.bool).expand(B, N)
        if cache is not None:
            if cache.k.shape[0] != B:
                raise ValueError(f"TuckerAttention: cache batch {cache.k.shape[0]} != input batch {B}")
            if key_mask is not None or cache.key_mask is not None:
                old = cache.key_mask if cache.key_mask is not None else torch.ones(
                    B, past, dtype=torch.bool, device=x.device)
                new = key_mask if key_mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
                key_mask = torch.cat([old, new], dim=1)
            K = torch.cat([cache.k.to(K.dtype), K], dim=1)
            V = torch.cat([cache.v.to(V.dtype), V], dim=1)

        out = self._attend(Q, K, V, past, causal, key_mask)  # (B, H, N, s3)
        # Y = sum_h out_h Mt_h^T Ut2^T: contract heads and latent value dims in one matmul.
        H, s2, s3 = Mt.shape
        mix = Mt.permute(0, 2, 1).reshape(H * s3, s2)  # rows (h, c) -> Mt_h[:, c]
        y = out.permute(0, 2, 1, 3).reshape(B, N, H * s3) @ mix @ self.V2.T
        new_cache = LatentKVCache(K, V, key_mask) if cache is not None or use_cache else None
        return _output(y, self.out_bias, unbatched, new_cache)

    def _attend(self, Q: Tensor, K: Tensor, V: Tensor, past: int, causal: bool,
                key_mask: Tensor | None) -> Tensor:
        """softmax(scale Q K^T + mask) V with one shared K, V (multi-query view)."""
        B, H, N, _ = Q.shape
        k = K.unsqueeze(1).expand(B, H, K.shape[1], K.shape[2])  # a view: K is stored once
        v = V.unsqueeze(1).expand(B, H, V.shape[1], V.shape[2])
        if key_mask is None and (not causal or past == 0):
            return F.scaled_dot_product_attention(Q, k, v, is_causal=causal and N > 1, scale=self.scale)
        mask = self._mask(B, N, past, causal, key_mask, Q.device)
        # A query row with no visible key (e.g. left padding under a causal mask) would give
        # NaN; let it see everything and zero its output instead.
        empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1, N, 1)
        mask = mask | empty
        out = F.scaled_dot_product_attention(Q, k, v, attn_mask=mask, scale=self.scale)
        return out.masked_fill(empty, 0.0)

    def parameter_count(self) -> int:
        """Numbers in the factorisation (cores, factors and out_bias)."""
        return sum(p.numel() for p in self.parameters())


def _rms(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x: Tensor, positions: Tensor, theta: float, rotary_dim: int) -> Tensor:
    """The models' own RoPE on the last dimension of ``x`` (..., N, d_h): the first
    ``rotary_dim`` coordinates rotated in rotate_half pairs (i, i + rotary_dim/2) by
    ``positions`` (N,) with frequencies ``theta ** (-2i / rotary_dim)``."""
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=x.device) / rotary_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    head, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([head * cos + _rotate_half(head) * sin, tail], dim=-1)


class QKInputAttention(nn.Module):
    """An attention layer in the ``qk_input`` structure, exact with the model's own RoPE.

    ``q_h = [x,1] U2 Q_h`` and ``k_g = [x,1] U3 K_g`` keep each head's d_h coordinates, so
    the model's qk-norm (``qk_norm`` = ``"per_head"`` | ``"full_width"`` (one RMS over all
    heads, OLMo2), gains ``query_gain`` (H, d_h), ``key_gain`` (G, d_h)) and RoPE
    (``rope_theta``, the first ``rotary_dim`` coordinates, rotate_half pairing) apply
    unchanged; the value-output side is the usual Tucker ``Y = sum_h A_h V Mt_h^T Ut2^T``.
    The decoding cache (:class:`LatentKVCache`) holds the *latent* key ``[x,1] U3`` (r3
    numbers) and value (s3) per token; keys are up-projected and rotated at use. Positions
    are ``0 .. T-1`` over the cache. Default RoPE only (no scaling variants) and no sliding
    windows: run such models with ``tuckerctl.patch``."""

    def __init__(self, U2: Tensor, U3: Tensor, query_heads: Tensor, key_groups: Tensor, post_core: Tensor,
                 post_factors, scale: float, out_bias: Tensor | None = None, rope_theta: float | None = None,
                 rotary_dim: int | None = None, qk_norm: str | None = None, query_gain: Tensor | None = None,
                 key_gain: Tensor | None = None, eps: float = 1e-6, softcap: float | None = None,
                 causal: bool = True):
        super().__init__()
        V1, V2, V3 = post_factors
        H, r2, dh = query_heads.shape
        if key_groups.shape[2] != dh or H % key_groups.shape[0] or U2.shape[1] != r2 \
                or U3.shape[1] != key_groups.shape[1] or V1.shape[0] != H:
            raise ValueError("QKInputAttention: factor shapes do not match")
        if qk_norm not in (None, "per_head", "full_width"):
            raise ValueError(f"QKInputAttention: unknown qk_norm {qk_norm!r}")
        par = lambda t: None if t is None else nn.Parameter(t.detach().clone())  # noqa: E731
        self.U2, self.U3, self.Q, self.K = par(U2), par(U3), par(query_heads), par(key_groups)
        self.post_core = par(post_core)
        self.V1, self.V2, self.V3 = (par(u) for u in post_factors)
        self.out_bias = par(out_bias)
        self.query_gain, self.key_gain = par(query_gain), par(key_gain)
        self.scale, self.eps, self.softcap, self.causal = float(scale), float(eps), softcap, bool(causal)
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.rotary_dim = int(rotary_dim or dh)
        self.qk_norm = qk_norm

    @classmethod
    def from_layer(cls, ck, i: int, causal: bool | None = None, dtype=None) -> QKInputAttention:
        """Build from layer ``i`` of an opened compressed checkpoint (``tuckerctl.load``)."""
        from .adapters import ModelSpec

        spec, flags = ModelSpec.from_dict(ck.spec), ck.info.get("flags", {})
        extras, family = spec.extras, spec.family
        if extras.get("rope_theta_by_layer_type") or extras.get("rope_type") or facts(family).layer_types:
            raise NotImplementedError(f"QKInputAttention: {family} uses per-layer RoPE/sliding windows; "
                                      f"run it with tuckerctl.patch")
        t = ck.layer(i)
        conv = (lambda x: x) if dtype is None else (lambda x: None if x is None else x.to(dtype))  # noqa: E731
        theta = extras.get("rope_theta") or 10000.0
        prf = extras.get("partial_rotary_factor") or 1.0
        kind = extras.get("qk_norm_type", "") if spec.qk_norm else ""
        if causal is None:
            causal = _default_causal(spec)
        return cls(conv(t.pre_factors[1]), conv(t.pre_factors[2]), conv(t.query_heads), conv(t.key_groups),
                   conv(t.post_core), [conv(u) for u in t.post_factors], spec.scale, conv(t.out_bias),
                   rope_theta=theta if spec.rope else None,
                   rotary_dim=int(spec.head_dim * prf) // 2 * 2,
                   qk_norm=("full_width" if kind.startswith("full_width") else "per_head") if kind else None,
                   query_gain=conv(t.query_gain), key_gain=conv(t.key_gain),
                   eps=flags.get("qk_norm_eps", 1e-6), softcap=extras.get("softcap"), causal=causal)

    @property
    def kv_cache_width(self) -> int:
        """Numbers cached per token: the latent key (r3) and value (s3)."""
        return self.U3.shape[1] + self.post_core.shape[2]

    def _norm(self, x: Tensor, gain: Tensor | None) -> Tensor:
        """qk-norm of (B, heads, N, d_h) as the model applies it (gain included)."""
        if self.qk_norm is None:
            return x
        if self.qk_norm == "per_head":
            x = _rms(x, self.eps)
        else:  # one RMS over all heads of a token
            B, n, N, dh = x.shape
            x = _rms(x.transpose(1, 2).reshape(B, N, n * dh), self.eps).reshape(B, N, n, dh).transpose(1, 2)
        return x if gain is None else x * gain[None, :, None, :]

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, cache: LatentKVCache | None = None,
                use_cache: bool = False):
        """Attention output for ``x`` (B, N, d); ``attention_mask`` (B, N) bool masks keys;
        ``cache``/``use_cache`` as :meth:`TuckerAttention.forward`."""
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        x = x.to(self.V2.dtype)
        B, N, _ = x.shape
        past = 0 if cache is None else cache.length
        P = _homogeneous_apply(x, self.U2)
        Kl = _homogeneous_apply(x, self.U3)  # latent keys: what the cache holds
        V = _homogeneous_apply(x, self.V3)
        key_mask = None if attention_mask is None else attention_mask.to(device=x.device, dtype=torch.bool)
        if cache is not None:
            Kl, V = torch.cat([cache.k.to(Kl.dtype), Kl], 1), torch.cat([cache.v.to(V.dtype), V], 1)
            if key_mask is not None or cache.key_mask is not None:
                old = cache.key_mask if cache.key_mask is not None else torch.ones(B, past, dtype=torch.bool,
                                                                                    device=x.device)
                new = key_mask if key_mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
                key_mask = torch.cat([old, new], 1)
        T = Kl.shape[1]
        q = self._norm(torch.einsum("bna,had->bhnd", P, self.Q), self.query_gain)
        k = self._norm(torch.einsum("bta,gad->bgtd", Kl, self.K), self.key_gain)
        if self.rope_theta is not None:
            q = rope(q, torch.arange(past, past + N, device=x.device), self.rope_theta, self.rotary_dim)
            k = rope(k, torch.arange(T, device=x.device), self.rope_theta, self.rotary_dim)
        H, G = q.shape[1], k.shape[1]
        k = k.repeat_interleave(H // G, dim=1)
        logits = self.scale * q @ k.transpose(-1, -2)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        allowed = torch.ones(B, 1, N, T, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = allowed & (torch.arange(T, device=x.device)[None, :]
                                 <= torch.arange(past, past + N, device=x.device)[:, None])
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
        probs = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min).softmax(-1)
        out = probs @ V[:, None]  # (B, H, N, s3)
        Mt = torch.einsum("hj,jab->hab", self.V1, self.post_core)
        y = torch.einsum("bhnc,hac,da->bnd", out, Mt, self.V2)
        new_cache = LatentKVCache(Kl, V, key_mask) if cache is not None or use_cache else None
        return _output(y, self.out_bias, unbatched, new_cache)


__all__ = ["LATENT_ROPE_WARNING", "NO_ROPE_WARNING", "LatentKVCache", "QKInputAttention", "TuckerAttention",
           "latent_rope"]
