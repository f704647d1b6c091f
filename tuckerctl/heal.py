"""``tuckerctl heal``: recover quality after compression by distilling the Tucker factors.

Every compressed layer is trained to reproduce the ORIGINAL layer's attention output on
real hidden states (layer-wise distillation with teacher inputs):

1. The original model (transformers) runs once over the healing text; forward hooks
   keep, per compressed layer, the hidden states entering its attention block, the
   block's keyword inputs (RoPE cos/sin, mask) and its output. Memory is bounded: the
   layers are captured in as many passes as needed to stay under ``CAPTURE_BYTES``.
2. Per layer, a copy of the model's own attention module gets trainable factorised
   projections (the same maps :func:`tuckerctl.patch` installs, but parametrised by
   the Tucker factors themselves, so the structure and ranks cannot change) and is
   trained on ``||y_student - y_teacher||^2 / ||y_teacher||^2``. Layers are
   independent (teacher inputs), so the error of one does not feed the next.

Schedule (per layer): Adam with per-tensor step sizes ``lr * RMS(tensor)`` (factor
matrices and cores differ in scale by orders of magnitude), linear warm-up over the first
30% of the steps, cosine decay to 10%. Adam's first steps are sign-like (each entry
moves by about its step size whatever the gradient's size), so on a checkpoint that is
already close to its original a short warm-up throws it further away than the healing
text can bring it back; a long warm-up and a smaller peak step fix that (README: sweep).
After every step the factor matrices are re-orthonormalised by a QR retraction whose
triangular factor is pushed into the per-head coordinates or the core (``U <- Q``,
``Q_h <- R Q_h``; ``core x_k R``): the represented attention is unchanged, the factors
stay orthonormal as the format promises and all scale lives in the small per-head / core
tensors, which keeps the gauge fixed (``U G, G^-1 Q`` would
otherwise drift into ill-conditioned pairs). The loss on held-out windows of the
healing text is measured every few steps; the best iterate is kept, so a layer is
never left worse than it came in on that held-out part.

3. Optionally (``kl_steps > 0``) an end-to-end pass follows: the student is the original
   model with every compressed layer's trainable attention installed (non-attention
   weights shared with the teacher, frozen), trained jointly on the mean
   ``KL(teacher || student)`` of the next-token distributions over the same windows
   (teacher logits recomputed per batch: nothing vocabulary-sized is kept). Same
   optimiser, schedule and retraction; best held-out-KL iterate kept. It sees what the
   layer-wise pass cannot: errors that compound through the layers and the parts of a
   layer's output that do not matter for the next token.

Only qk_input layers of families whose output projection lives in the attention
module (Llama-like) are supported; the output is a normal compressed checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from . import __version__
from .calibrate import read_text, token_ids
from .device import resolve_device
from .errors import InputError, arg
from .families import families_of
from .patching import Factored
from .tucker_format import PER_HEAD, QK_INPUT, TuckerLayer, factor_name, load, write_checkpoint

CAPTURE_BYTES = 2 * 1024 ** 3  # teacher activations kept at once (float32)
VALIDATE_EVERY = 10
LR = 0.003  # default peak step of the layer-wise pass (README: the sweeps)
WARMUP = 0.3  # default warm-up fraction of both passes: near-exact checkpoints need small first steps
KL_LR = 0.001  # default peak step of the end-to-end pass (README: 0.003 was unstable on SmolLM2, 0.001 helped)
HEALABLE = families_of("LlamaLike")
_QK_LEAVES, _OUT_LEAF = ("q_proj", "k_proj", "v_proj"), "o_proj"


# ------------------------------------------------------------------ trainable factorised projections

class LatentProjection(nn.Module):
    """``[x, 1] U`` zero-padded to ``cols`` (U: (d or d + 1, r), trainable unless the side
    is kept whole: then U is the identity the checkpoint does not store, a fixed buffer)."""

    def __init__(self, U: Tensor, d: int, cols: int, trainable: bool = True):
        super().__init__()
        if trainable:
            self.U = nn.Parameter(U.clone())
        else:
            self.register_buffer("U", U.clone())
        self.d, self.cols = d, cols

    def forward(self, x: Tensor) -> Tensor:
        U = self.U
        z = x @ U[:self.d]
        if U.shape[0] == self.d + 1:
            z = z + U[self.d]
        return nn.functional.pad(z, (0, self.cols - U.shape[1]))


class HeadCoordinates(nn.Module):
    """Latent ``(..., r)`` -> every head's ``d_h`` coordinates ``(..., H d_h)`` (C: (H, r, d_h))."""

    def __init__(self, C: Tensor):
        super().__init__()
        self.C = nn.Parameter(C.clone())

    def forward(self, z: Tensor) -> Tensor:
        return torch.einsum("...r,hre->...he", z, self.C).flatten(-2)


class TuckerOutput(nn.Module):
    """The output projection of the value-output Tucker tensor: each head's attention-mixed
    latent value ``(..., H, s3p)`` -> ``sum_h v_h Mt_h^T Ut2^T (+ bias)``, ``Mt_h = sum_j Ut1[h, j] Ct[j]``."""

    def __init__(self, head: Tensor, core: Tensor, output: Tensor, padded: int, bias: Tensor | None):
        super().__init__()
        self.head, self.core, self.output = (nn.Parameter(t.clone()) for t in (head, core, output))
        self.padded = padded
        self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, z: Tensor) -> Tensor:
        H, s3 = self.head.shape[0], self.core.shape[2]
        v = z.reshape(*z.shape[:-1], H, self.padded)[..., :s3]
        mix = torch.einsum("hj,jab->hab", self.head, self.core)
        y = torch.einsum("...hb,hab,da->...d", v, mix, self.output)
        return y if self.bias is None else y + self.bias


class PerHeadOutput(nn.Module):
    """The output projection of the per-head value-output structure: each head's
    attention-mixed latent value ``v_h`` (``(..., H, s3p)``) -> ``sum_h (v_h V_g(h)) O_h^T Ut2^T
    (+ bias)``; no head mixing, so training keeps the stored structure and its size."""

    def __init__(self, output: Tensor, output_heads: Tensor, value_groups: Tensor, padded: int,
                 bias: Tensor | None, output_trainable: bool = True):
        super().__init__()
        if output_trainable:
            self.output = nn.Parameter(output.clone())
        else:
            self.register_buffer("output", output.clone())
        self.output_heads, self.value_groups = nn.Parameter(output_heads.clone()), nn.Parameter(value_groups.clone())
        self.padded = padded
        self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, z: Tensor) -> Tensor:
        H, G, s3 = self.output_heads.shape[0], self.value_groups.shape[0], self.value_groups.shape[1]
        v = z.reshape(*z.shape[:-1], H, self.padded)[..., :s3]
        Vg = self.value_groups[torch.arange(H, device=v.device) // (H // G)]
        w = torch.einsum("...hb,hbe,hae->...ha", v, Vg, self.output_heads)
        y = torch.einsum("...ha,da->...d", w, self.output)
        return y if self.bias is None else y + self.bias


def whole_sides(tk, layer: TuckerLayer) -> set[str]:
    """The sides of ``layer`` stored whole (``pre.query``, ``pre.key``, ``post.output``,
    ``post.value``): per-head structures whose subspace the checkpoint does not write."""
    candidates = [("pre", "query"), ("pre", "key")] if layer.structure == QK_INPUT else []
    if layer.post_structure == PER_HEAD:
        candidates += [("post", "output"), ("post", "value")]
    return {f"{t}.{p}" for t, p in candidates if factor_name(layer.index, t, p) not in tk.ckpt}


def student_attention(teacher: nn.Module, layer: TuckerLayer, d: int, dh: int,
                      whole: set[str] = frozenset()) -> nn.Module:
    """A copy of the model's attention module ``teacher`` whose projections are the
    trainable factorised ones of ``layer`` (qk_input structure; the value-output tensor as
    stored: Tucker or per-head), run through the ``tuckerctl`` attention function of
    :mod:`tuckerctl.patching`. Sides in ``whole`` (see :func:`whole_sides`) stay fixed
    identities, so the trained checkpoint keeps the structure and size it came with."""
    from .patching import ATTENTION_NAME, _pad_to, _register

    _register()
    f = lambda t: None if t is None else t.detach().to(torch.float32)  # noqa: E731
    U2, U3, Q, K = f(layer.pre_factors[1]), f(layer.pre_factors[2]), f(layer.query_heads), f(layer.key_groups)
    V1, V2, V3 = (f(t) for t in layer.post_factors)
    H, G, s3 = Q.shape[0], K.shape[0], V3.shape[1]
    s3p = _pad_to(s3, dh)
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    student.q_proj = Factored(LatentProjection(U2, d, U2.shape[1], "pre.query" not in whole), HeadCoordinates(Q))
    student.k_proj = Factored(LatentProjection(U3, d, U3.shape[1], "pre.key" not in whole), HeadCoordinates(K))
    student.v_proj = LatentProjection(V3, d, s3p, "post.value" not in whole)
    if layer.post_structure == PER_HEAD:
        student.o_proj = PerHeadOutput(V2, f(layer.output_heads), f(layer.value_groups), s3p, f(layer.out_bias),
                                       "post.output" not in whole)
    else:
        student.o_proj = TuckerOutput(V1, f(layer.post_core), V2, s3p, f(layer.out_bias))
    student.config = copy.copy(student.config)
    student.config._attn_implementation = ATTENTION_NAME
    student._tuckerctl = {"structure": QK_INPUT, "widths": (H * dh, G * dh, s3p), "heads": H, "value_width": s3,
                          "layer": layer.index}
    return student.to(next(teacher.parameters()).device)


def factor_tensors(student: nn.Module) -> dict[str, Tensor]:
    """{format part name: tensor} of a student module's trainable factors (see
    tuckerctl.tucker_format); sides kept whole are not among them (nor written)."""
    o = student.o_proj
    parts = {"pre.query": student.q_proj.down.U, "pre.query_heads": student.q_proj.up.C,
             "pre.key": student.k_proj.down.U, "pre.key_groups": student.k_proj.up.C,
             "post.value": student.v_proj.U, "post.output": o.output}
    if isinstance(o, PerHeadOutput):
        parts.update({"post.output_heads": o.output_heads, "post.value_groups": o.value_groups})
    else:
        parts.update({"post.head": o.head, "post.core": o.core})
    return {k: t for k, t in parts.items() if isinstance(t, nn.Parameter)}


def _orthonormal(U: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR with a positive diagonal (continuous in U): (Q, R), U = Q R."""
    Qm, R = torch.linalg.qr(U)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return Qm * s, R * s[:, None]


@torch.no_grad()
def retract(student: nn.Module) -> None:
    """Re-orthonormalise every factor matrix and push its R into the coordinates/core;
    the attention the module computes is unchanged (up to rounding)."""
    for proj in (student.q_proj, student.k_proj):
        if not isinstance(proj.down.U, nn.Parameter):  # a side kept whole: the identity
            continue
        Qm, R = _orthonormal(proj.down.U)
        proj.down.U.copy_(Qm)
        proj.up.C.copy_(torch.einsum("ab,hbe->hae", R, proj.up.C))
    o = student.o_proj
    if isinstance(o, PerHeadOutput):
        for U, C in ((student.v_proj.U, o.value_groups), (o.output, o.output_heads)):
            if isinstance(U, nn.Parameter):
                Qm, R = _orthonormal(U)
                U.copy_(Qm)
                C.copy_(torch.einsum("ab,hbe->hae", R, C))
        return
    Qm, R = _orthonormal(student.v_proj.U)
    student.v_proj.U.copy_(Qm)
    o.core.copy_(torch.einsum("jab,cb->jac", o.core, R))
    Qm, R = _orthonormal(o.output)
    o.output.copy_(Qm)
    o.core.copy_(torch.einsum("jab,ca->jcb", o.core, R))
    Qm, R = _orthonormal(o.head)
    o.head.copy_(Qm)
    o.core.copy_(torch.einsum("jab,kj->kab", o.core, R))


# ------------------------------------------------------------------ teacher activations

def _attention_modules(model: nn.Module, layers: list[int]) -> dict[int, nn.Module]:
    """{layer: attention module} (the module holding q_proj ... o_proj) of a Llama-like model."""
    found = {}
    for mod in model.modules():
        if all(hasattr(mod, leaf) for leaf in (*_QK_LEAVES, _OUT_LEAF)) and hasattr(mod, "layer_idx"):
            found[int(mod.layer_idx)] = mod
    missing = [i for i in layers if i not in found]
    if missing:
        raise InputError(f"the model has no attention module with q/k/v/o_proj for layer {missing[0]}")
    return {i: found[i] for i in layers}


def _capture(model: nn.Module, modules: dict[int, nn.Module], batches: list[Tensor]) -> dict[int, list[dict]]:
    """Run the teacher on every batch of windows; per layer and batch: the attention
    block's input ``x``, its other keyword inputs ``kw`` and its output ``y``."""
    seen: dict[int, list[dict]] = {i: [] for i in modules}
    skip = {"past_key_values", "cache", "use_cache", "cache_position", "position_ids", "output_attentions"}

    def hook(i):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            kw = {k: v for k, v in kwargs.items() if k not in skip and k != "hidden_states"}
            if len(args) > 1:  # families that pass position embeddings positionally
                kw["position_embeddings"] = args[1]
            seen[i].append({"x": x.detach(), "kw": kw, "y": (out[0] if isinstance(out, tuple) else out).detach()})
        return fn

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in modules.items()]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


# ------------------------------------------------------------------ training one layer

def _loss(student: nn.Module, batch: dict) -> Tensor:
    y = student(hidden_states=batch["x"], **batch["kw"])[0]
    return ((y - batch["y"]) ** 2).sum() / (batch["y"] ** 2).sum()


def _val_loss(student: nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        num = sum(float(((student(hidden_states=b["x"], **b["kw"])[0] - b["y"]) ** 2).sum()) for b in batches)
        return num / sum(float((b["y"] ** 2).sum()) for b in batches)


def lr_factor(step: int, steps: int, warmup: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the steps (at least one), then
    cosine decay to 10% of the peak."""
    warm = max(1, round(steps * warmup))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _train(params: list[Tensor], loss_of: Callable[[object], Tensor], val_loss: Callable[[], float],
           train: list, steps: int, lr: float, every: int, seed: int, after_step: Callable[[], None],
           tick: Callable[[], None] | None, warmup: float = 0.05) -> dict:
    """The loop both passes share: Adam with a per-tensor step ``lr × RMS(tensor)`` (factor
    matrices and cores differ in scale by orders of magnitude), :func:`lr_factor`'s schedule,
    ``after_step`` (the retraction) after every step, the held-out loss every ``every`` steps,
    and the best held-out iterate restored at the end. Returns the curve and summary figures."""
    groups = [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-12))} for p in params]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    peaks = [g["lr"] for g in groups]
    gen = torch.Generator().manual_seed(seed)
    best = val_loss()
    curve = [[0, best]]
    best_step, best_state = 0, [p.detach().clone() for p in params]
    train_losses = []
    for step in range(steps):
        for g, peak in zip(opt.param_groups, peaks):
            g["lr"] = peak * lr_factor(step, steps, warmup)
        batch = train[int(torch.randint(len(train), (1,), generator=gen))]
        opt.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        opt.step()
        after_step()
        train_losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == steps:
            v = val_loss()
            curve.append([step + 1, v])
            if v < best:
                best, best_step = v, step + 1
                best_state = [p.detach().clone() for p in params]
        if tick:
            tick()
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    finite = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731 (strict JSON)
    curve = [[k, finite(v)] for k, v in curve]
    return {"initial": curve[0][1], "final": finite(best), "best_step": best_step,
            "first": finite(train_losses[0]) if train_losses else None,
            "last": finite(train_losses[-1]) if train_losses else None,
            "curve": curve if len(curve) <= 12 else [curve[round(k * (len(curve) - 1) / 11)] for k in range(12)]}


def heal_layer(student: nn.Module, train: list[dict], val: list[dict], steps: int, lr: float,
               seed: int = 0, tick: Callable[[], None] | None = None, warmup: float = 0.05) -> dict:
    """Train ``student``'s Tucker factors in place on ``train`` batches; keep the iterate
    with the lowest held-out loss on ``val``. Returns the layer's loss record."""
    retract(student)  # fix the gauge first: step sizes below are relative to the orthonormal-factor scales
    r = _train(list(factor_tensors(student).values()), lambda batch: _loss(student, batch),
               lambda: _val_loss(student, val), train, steps, lr, VALIDATE_EVERY, seed, lambda: retract(student), tick,
               warmup)
    return {"val_loss_initial": r["initial"], "val_loss_final": r["final"], "best_step": r["best_step"],
            "train_loss_first": r["first"], "train_loss_last": r["last"], "val_curve": r["curve"]}


# ------------------------------------------------------------------ end-to-end pass on the KL divergence

def student_model(teacher: nn.Module, attention: dict[int, nn.Module]) -> nn.Module:
    """The teacher model with each layer's attention module replaced by ``attention[i]``
    (the trainable students). Every other parameter and buffer is SHARED with the teacher
    (no second copy of the weights) and must stay frozen."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    shared = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
    student = copy.deepcopy(teacher, memo=shared)
    names = {id(m): name for name, m in teacher.named_modules()}
    originals = _attention_modules(teacher, list(attention))
    for i, module in attention.items():
        parent, _, leaf = names[id(originals[i])].rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, leaf, module)
    return student


def _kl_sum(teacher: nn.Module, student: nn.Module, ids: Tensor) -> tuple[Tensor, int]:
    """(sum over next-token positions of KL(teacher || student), number of positions);
    the last position of each window predicts nothing in the text and is left out."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    logp = torch.log_softmax(student(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    kl = nn.functional.kl_div(logp, target, log_target=True, reduction="sum")
    return kl, target.shape[0] * target.shape[1]


def _val_kl(teacher: nn.Module, student: nn.Module, batches: list[Tensor]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            kl, n = _kl_sum(teacher, student, ids)
            total, count = total + float(kl), count + n
    return total / count


def heal_end_to_end(teacher: nn.Module, attention: dict[int, nn.Module], train: list[Tensor],
                    val: list[Tensor], steps: int, lr: float, seed: int = 0,
                    tick: Callable[[], None] | None = None, warmup: float = 0.05) -> dict:
    """Train the Tucker factors of all student attention modules in ``attention`` (in
    place) jointly on the mean next-token KL(teacher || student) over ``train`` batches of
    token ids; keep the iterate with the lowest held-out KL on ``val``. Returns the record."""
    dev = next(teacher.parameters()).device
    train, val = [b.to(dev) for b in train], [b.to(dev) for b in val]
    student = student_model(teacher, attention)
    for module in attention.values():
        retract(module)
    params = [p for module in attention.values() for p in factor_tensors(module).values()]

    def loss_of(ids: Tensor) -> Tensor:
        kl, n = _kl_sum(teacher, student, ids)
        return kl / n

    def after_step() -> None:
        for module in attention.values():
            retract(module)

    r = _train(params, loss_of, lambda: _val_kl(teacher, student, val), train, steps, lr,
               max(1, min(VALIDATE_EVERY, steps // 5)), seed, after_step, tick, warmup)
    return {"steps": steps, "lr": lr, "val_kl_initial": r["initial"], "val_kl_final": r["final"],
            "best_step": r["best_step"], "train_kl_first": r["first"], "train_kl_last": r["last"],
            "val_curve": r["curve"]}


# ------------------------------------------------------------------ the command

def _summary(records: list[dict]) -> dict:
    """Mean and worst held-out loss over the layers, before and after (None if any is not finite)."""
    out = {}
    for key, name in (("val_loss_initial", "initial"), ("val_loss_final", "final")):
        vals = [r[key] for r in records]
        ok = all(v is not None for v in vals)
        out[f"val_{name}_mean"] = sum(vals) / len(vals) if ok else None
        out[f"val_{name}_max"] = max(vals) if ok else None
    return out


def _load_teacher(against: Path, compressed: Path, dev: torch.device):
    """(model, tokenizer) of the original checkpoint (a model directory or a .gguf file)."""
    from .hf import load_model, load_tokenizer

    tokenizer = load_tokenizer(against, compressed if compressed.is_dir() else compressed.parent)
    model, causal = load_model(against, dev)
    if not causal:
        raise InputError(f"{against}: heal needs a causal language model")
    return model, tokenizer


def _windows(ids: Tensor, seq_len: int, batch: int) -> tuple[list[Tensor], list[Tensor]]:
    """(train batches, validation batches) of whole windows; every 8th window is held out."""
    n = ids.numel() // seq_len
    if n < 2:
        raise InputError(f"{arg('tokens')}: need at least two windows of {seq_len} tokens (got {ids.numel()} tokens)")
    wins = ids[:n * seq_len].reshape(n, seq_len)
    val_idx = list(range(7, n, 8)) or [n - 1]
    train_idx = [k for k in range(n) if k not in val_idx]
    chunk = lambda idx: [wins[idx[s:s + batch]] for s in range(0, len(idx), batch)]  # noqa: E731
    return chunk(train_idx), chunk(val_idx)


def heal(compressed, against, text, out, *, tokens: int = 8192, steps: int = 100, lr: float = LR,
         kl_steps: int = 0, kl_lr: float | None = None, warmup: float = WARMUP, seq_len: int = 256, batch: int = 4,
         device: str = "auto", overwrite: bool = False, seed: int = 0,
         progress: Callable[[int, int], None] | None = None) -> dict:
    """Heal the compressed checkpoint ``compressed`` against its original ``against`` on the
    text file ``text`` and write the result to ``out``; returns the healing record (also
    stored as ``healing`` in the output's metadata). ``steps``: layer-wise steps per layer;
    ``kl_steps``: steps of the end-to-end KL pass that follows (0: none); ``kl_lr``: its peak
    step (None: ``KL_LR``)."""
    kl_lr = KL_LR if kl_lr is None else kl_lr
    for name, value, least in (("tokens", tokens, 2), ("steps", steps, 0), ("kl_steps", kl_steps, 0),
                               ("seq_len", seq_len, 2), ("batch", batch, 1)):
        if value < least:
            raise InputError(f"{arg(name)}: {value} must be at least {least}")
    if steps == 0 and kl_steps == 0:
        raise InputError(f"{arg('steps')}: 0 layer-wise steps and no {arg('kl_steps')} leave nothing to do")
    for name, value in (("lr", lr), ("kl_lr", kl_lr)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{arg(name)}: {value} must be a positive number")
    if not 0 <= warmup < 1:
        raise InputError(f"warmup: {warmup} must be a fraction of the steps in [0, 1)")
    compressed, against, out = Path(compressed), Path(against), Path(out)
    body = read_text(text)
    digest = hashlib.sha256(Path(text).read_bytes()).hexdigest()
    tk = load(compressed)
    family = tk.spec.get("family")
    if family not in HEALABLE:
        raise InputError(f"{compressed}: heal supports the Llama-like families ({', '.join(HEALABLE)}), "
                         f"not {family!r}")
    layers = [tk.layer(i) for i in tk.layers]
    tucker_layers = [t.index for t in layers if t.structure != QK_INPUT]
    if tucker_layers:
        raise InputError(f"{compressed}: layer {tucker_layers[0]} uses the tucker structure; heal trains the "
                         f"qk_input structure (compress with {arg('structure', 'qk-input')})")
    for p in (against, Path(text)):
        r = p.resolve()
        if out.resolve() == r or r.is_relative_to(out.resolve()) or out.resolve().is_relative_to(r):
            raise InputError(f"{out}: refusing to write over or inside the input {p}")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists (use {arg('overwrite', True)} to replace it)")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, tokenizer = _load_teacher(against, compressed, dev)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if (cfg.hidden_size, cfg.num_hidden_layers) != (tk.spec["d"], tk.spec["layers"]):
        raise InputError(f"{compressed} was compressed from a different model than {against}")
    ids = token_ids(tokenizer, body, tokens)
    limit = getattr(cfg, "max_position_embeddings", None)
    seq_len = min(seq_len, int(limit)) if limit else seq_len
    train_ids, val_ids = _windows(ids, seq_len, batch)
    modules = _attention_modules(model, tk.layers)
    d, dh = tk.spec["d"], tk.spec["head_dim"]
    per_layer = 2 * ids.numel() * d * 4
    group = max(1, CAPTURE_BYTES // max(1, per_layer))
    total = (len(layers) * (steps + 1) if steps else 0) + kl_steps
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    # the trainable attention of every layer (float32, on dev): trained layer-wise, then end to end
    students = {t.index: student_attention(modules[t.index], t, d, dh, whole_sides(tk, t)) for t in layers}
    records = []
    for s in range(0, len(layers) if steps else 0, group):
        chunk = layers[s:s + group]
        acts = _capture(model, {t.index: modules[t.index] for t in chunk}, train_ids + val_ids)
        for t in chunk:
            captured = acts.pop(t.index)
            train, val = captured[:len(train_ids)], captured[len(train_ids):]
            tick()
            record = heal_layer(students[t.index], train, val, steps, lr, seed=seed + t.index, tick=tick,
                                warmup=warmup)
            records.append({"index": t.index, **record})
            del captured, train, val
    end_to_end = None
    if kl_steps:
        t0 = time.perf_counter()
        end_to_end = heal_end_to_end(model, students, train_ids, val_ids, kl_steps, kl_lr, seed=seed, tick=tick,
                                     warmup=warmup)
        end_to_end["seconds"] = round(time.perf_counter() - t0, 3)
    factors = {}
    for t in layers:
        store = tk.ckpt.get(factor_name(t.index, "pre", "query_heads")).dtype
        for part, tensor in factor_tensors(students[t.index]).items():
            kind, leaf = part.split(".")
            factors[factor_name(t.index, kind, leaf)] = tensor.detach().to(store).cpu().contiguous()
    seconds = time.perf_counter() - start
    healing = {
        "text": {"path": str(text), "sha256": digest, "tokens": int(ids.numel()),
                 "train_windows": sum(b.shape[0] for b in train_ids),
                 "validation_windows": sum(b.shape[0] for b in val_ids), "seq_len": seq_len},
        "against": str(against),
        "steps": steps, "lr": lr, "warmup": warmup, "batch": batch, "seed": seed, "device": str(dev),
        "schedule": f"layer-wise distillation, Adam (per-tensor lr x RMS), {warmup:.0%} warm-up + cosine to 10%, "
                    "QR retraction after each step, best held-out iterate"
                    + ("; then end-to-end on the mean next-token KL(original || healed), same optimiser, "
                       "schedule and retraction, best held-out-KL iterate" if kl_steps else ""),
        "loss": _summary(records) if records else None,
        "layers": records,
        "end_to_end": end_to_end,
        "seconds": round(seconds, 3),
        "tool_version": __version__,
    }
    info = json.loads(json.dumps(tk.info))
    note = ("healed (tuckerctl heal): the factors were trained on real hidden states, so the per-layer weight "
            "errors recorded at compression no longer describe them; tuckerctl verify measures the current ones")
    if note not in info.setdefault("notes", []):
        info["notes"].append(note)
    if "healing" in info:  # healing a healed checkpoint (e.g. --steps 0 --kl-steps N after a layer-wise run)
        healing["previous"] = info["healing"]
    info["healing"] = healing
    # Same structures, same stored parts (sides kept whole stay unwritten), same size.
    write_checkpoint(out, tk.ckpt, set(factors), factors, info, overwrite=overwrite, config=tk.source_config)
    return healing
