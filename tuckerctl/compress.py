"""``tuckerctl compress``: Tucker-factorise every layer's attention and write a checkpoint.

Per layer and tensor: truncated HOSVD from the structured mode factors, then
``hooi_iters`` HOOI sweeps from the factors (never from the dense tensor). Ranks come
from a fixed triple, a per-mode energy threshold, or a global parameter budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import __version__
from .allocate import TensorSpectra, allocate_budget, allocation_grid, energy_ranks
from .device import resolve_device
from .distributed import SINGLE, Group, join
from .errors import InputError, arg
from .exact import EXACT_TABLE_MAX_FLOPS, hosvd_residuals, table_flops
from .loader import iter_layers, open_model
from .multilinear import clamp_ranks, mode_spectra, reduce, tucker
from .options import compress_choice, parse_ranks
from .outputs import claim
from .ranks import tucker_params
from .streams import StreamPool, pipelined
from .tucker_format import (
    PARTS,
    PER_HEAD,
    PER_HEAD_PARTS,
    QK_INPUT,
    QK_INPUT_PARTS,
    SCHEMA,
    TENSOR_PREFIX,
    TUCKER,
    factor_name,
    source_record,
    write_checkpoint,
)
from .verify import worst
from .whiten import weighted_tucker, whiten_stack

METHODS = ("tucker", "svd")
TENSORS = ("pre", "post", "both")
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Safetensors dtype of the source -> the factors' default stored dtype ("same as the source").
_SOURCE_STORE = {"BF16": "bfloat16", "F16": "float16"}
STRUCTURES = {"auto": None, "qk-input": QK_INPUT, "tucker": TUCKER}


def choose_structure(spec, structure: str) -> str:
    """``auto``: ``qk_input`` for RoPE families (the only structure their own RoPE runs
    exactly, docs/format), ``tucker`` otherwise. MLA keeps ``tucker``: its pre-softmax
    tensor mixes the nope and rope parts through shared latents."""
    if structure not in STRUCTURES:
        raise InputError(f"{arg('structure')}: {structure!r} is not one of {', '.join(STRUCTURES)}")
    chosen = STRUCTURES[structure]
    if spec.attention == "MLA":
        if chosen == QK_INPUT:
            raise InputError(f"{arg('structure', 'qk-input')}: not available for MLA models (their RoPE split "
                             "is kept in the tucker structure)")
        return TUCKER
    if chosen is None:
        return QK_INPUT if spec.rope else TUCKER
    return chosen


def qk_input_params(shape, ranks, heads: int, groups: int, head_dim: int) -> int:
    """Numbers in the qk_input structure with both sides factored: U2, U3 and the
    per-head/per-group coordinates (see :func:`side_params` for sides kept whole)."""
    _, m, n = shape
    _, r2, r3 = ranks
    return m * r2 + n * r3 + heads * r2 * head_dim + groups * r3 * head_dim


def side_params(rows: int, count: int, width: int, rank: int | None, d: int | None = None) -> int:
    """Numbers stored for one side of a per-head structure: ``rows x rank`` subspace plus
    ``count`` coordinate blocks ``rank x width``; ``rank`` None = the side kept whole (no
    subspace written, the coordinates are the original ``rows x width`` blocks, counted
    without a bias row beyond ``d``, as the original projections' count is)."""
    return min(rows, d or rows) * count * width if rank is None else rank * (rows + count * width)


def _sides(stack) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(rows, blocks, width) of the left (query/output) and right (key/value) sides."""
    H, m, n = stack.shape
    w = stack.left.shape[2]
    return (m, H, w), (n, stack.groups, w)


def per_head_params(stack, ranks, d: int) -> int:
    """Parameters of the per-head structure (qk_input, per_head) at ``(H, r2, r3)``
    (None = that side kept whole); ``d`` the model width (rows beyond it hold biases)."""
    (m, H, w), (n, G, _) = _sides(stack)
    return side_params(m, H, w, ranks[1], d) + side_params(n, G, w, ranks[2], d)


def _side_spectra(stack, spectra, d: int) -> list:
    """The allocator's view of the two sides of a per-head tensor (in its metric): the side's
    mode spectrum, the parameters per rank step and those of the side kept whole. The
    squared tails of both sides, over ||W||^2, add up to the truncated-HOSVD bound of the
    tensor's relative squared error (the head mode is never truncated)."""
    from .lowrank import Spectrum

    out = []
    for (rows, count, width), sig in zip(_sides(stack), (spectra.left, spectra.right)):
        out.append(Spectrum(None, None, sig.double().cpu(), None, None, min(rows, d) * count * width,
                            rows + count * width))
    return out


def _spectra_for_allocation(stack, spectra) -> TensorSpectra:
    """What the allocator sees of one 3-mode Tucker tensor: its mode spectra and, when the
    full core is affordable, the exact truncated-HOSVD errors on the allocation grid."""
    sig = tuple(x.cpu().tolist() for x in spectra)
    red = reduce(stack)
    if table_flops(red) > EXACT_TABLE_MAX_FLOPS:
        return TensorSpectra(stack.shape, sig)
    grid = allocation_grid([max(1, len(x)) for x in sig])
    table, _ = hosvd_residuals(red, grid)
    return TensorSpectra(stack.shape, sig, table.cpu().tolist(), grid)


def _metric(stack, key: str, moments, index: int):
    """(left, right) whiteners of one tensor in the activation metric, or (None, None)
    without calibration. Query and key sides, and the value side, see the layer's input
    (its homogeneous form when biased); the output side stays in the weight metric."""
    if moments is None:
        return None, None
    m = moments[index]
    _, rows, cols = stack.shape
    right = m.whitener(cols)
    left = m.whitener(rows) if key == "pre" else None
    return left, right


def _whitened(stack, left, right):
    return whiten_stack(stack, left.S if left else None, right.S if right else None)


def _budget_ranks(adapter, ckpt, spec, indices, params, dev, progress, structure, moments=None,
                  group: Group = SINGLE, tensors: str = "both"):
    """Pass 1 for --params: spectra of every tensor (in the activation metric when
    calibrated; this rank's share of the layers, then gathered from every rank), then a
    global allocation. With the per-head structures (qk_input pre, per_head post) each
    side of each tensor is a rank-or-whole choice, allocated like the per-matrix baseline
    (:func:`tuckerctl.lowrank.allocate`); returns {(layer, tensor): (H, r2, r3)} with None
    for a side kept whole. A tensor not in ``tensors`` is kept whole on both sides."""
    mine = []
    for k, layer in enumerate(iter_layers(adapter, ckpt, spec, group.shard(indices), dev)):
        pair, whole = [], {}
        for key in ("pre", "post"):
            stack = getattr(layer, key).to(device=dev, dtype=torch.float64)
            whole[key] = per_head_params(stack, (stack.heads, None, None), spec.d)
            metric_stack = _whitened(stack, *_metric(stack, key, moments, layer.index))
            s = mode_spectra(reduce(metric_stack))
            if structure == QK_INPUT:
                sides = _side_spectra(stack, s, spec.d)
                gram = _output_gram(stack, moments, layer.index) if key == "post" else None
                if gram is not None:
                    sides[0].sigma = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt().double().cpu()
                pair.append((stack.heads, sides))
            else:
                pair.append(_spectra_for_allocation(metric_stack, s))
        mine.append((layer.index, layer.params, pair, whole))
        if progress:
            progress(k + 1, 2 * len(indices))
    every = sorted((item for part in group.all_gather(mine) for item in part), key=lambda item: item[0])
    original = sum(item[1] for item in every)
    budget = int(params * original)
    if structure == QK_INPUT:
        from .lowrank import allocate, params_of

        free = [(i, key, side, sp) for i, _, pair, _ in every for key, (_, sides) in zip(("pre", "post"), pair)
                for side, sp in enumerate(sides) if tensors in (key, "both")]
        kept = sum(sp.params_dense for _, _, pair, _ in every for key, (_, sides) in zip(("pre", "post"), pair)
                   for sp in sides if tensors not in (key, "both"))
        sides = [sp for *_, sp in free]
        least = sum(sp.step_cost for sp in sides)  # every side has rank >= 1
        if budget - kept < least:
            raise InputError(f"{arg('params', params)}: below the minimum of {kept + least:,} parameters (every "
                             f"compressed side at rank 1{', the kept tensor whole' if kept else ''})")
        ranks = allocate(sides, budget - kept)
        spare = budget - kept - sum(params_of(sp, r) for sp, r in zip(sides, ranks))
        if sum(sp.step_cost for sp, r in zip(sides, ranks) if r == 0) > spare:  # room for the rank-1 floors
            ranks = allocate(sides, budget - kept - sum(sp.step_cost for sp, r in zip(sides, ranks) if r == 0))
        chosen = dict(zip([(i, key, side) for i, key, side, _ in free], (1 if r == 0 else r for r in ranks)))
        return {(i, key): (H, chosen.get((i, key, 0)), chosen.get((i, key, 1)))
                for i, _, pair, _ in every for key, (H, _) in zip(("pre", "post"), pair)}
    keys = [(item[0], key) for item in every for key in ("pre", "post") if tensors in (key, "both")]
    free = [t for item in every for key, t in zip(("pre", "post"), item[2]) if tensors in (key, "both")]
    # A kept tensor costs its original projections (stored whole).
    kept = sum(item[3][key] for item in every for key in ("pre", "post") if tensors not in (key, "both"))
    try:
        chosen = allocate_budget(free, budget - kept)
    except ValueError as e:
        raise InputError(f"{arg('params', params)}: {e}") from None
    return dict(zip(keys, chosen))


def _output_gram(stack, moments, index: int):
    """E[y^T y] structure of the value-output tensor's output side on the calibration
    inputs: O_t C_z O_t^T with O_t = [W_O,h^T]_h (d x H d_v) and C_z the second moment of
    the attention output entering o_proj (all heads, so the attention mixing and the
    cross-head correlations are in it). Its leading eigenvectors are the output subspace
    minimising E ||y - U2 U2^T y||^2, the metric the per-matrix baseline uses for W_O.
    None without calibration (or for shared latent bases)."""
    if moments is None or stack.left_basis is not None:
        return None
    H, m, w = stack.left.shape
    Cz = moments[index].attn_out
    if Cz is None or Cz.shape[0] != H * w:
        return None
    O_t = stack.left.permute(1, 0, 2).reshape(m, H * w)
    return O_t @ Cz.to(O_t) @ O_t.T


def _with_output_side(stack, t, gram, r2, right):
    """``t`` (a per-head fit, U1 = I) with its output subspace replaced by the ``r2``
    leading eigenvectors of ``gram``: (Tucker, activation-weighted error or None)."""
    from .multilinear import Tucker
    from .whiten import relative_error

    vals, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    U2 = vecs.flip(1)[:, :r2].to(stack.left)
    _, _, U3 = t.factors
    P3 = U3.T if right is None else U3.T @ (right.S @ right.S).to(U3)
    B = stack.right[stack.group_of]
    core = (U2.T @ stack.left) @ (P3 @ B).transpose(1, 2)  # (H, r2, r3): U2^T A_h B_g^T P3^T
    eye = torch.eye(stack.heads, dtype=U2.dtype, device=U2.device)
    back = Tucker(core, [eye, U2, U3], 0.0, [])
    back.rel_error = relative_error(stack, back)
    back.errors = [back.rel_error]
    if right is None:
        return back, None
    white = whiten_stack(stack, None, right.S)
    return back, relative_error(white, Tucker(core, [eye, U2, right.S.to(U3) @ U3], 0.0, []))


def _per_head(layer, key, stack, want, hooi_iters, store, left=None, right=None, out_gram=None):
    """A per-head structure of one layer tensor: ``qk_input`` (pre) or ``per_head``
    (post). Only the input/output sides are truncated, the head mode is kept whole: the
    subspaces U2, U3 of a Tucker fit at ranks (H, r2, r3) (so the reported error is exactly
    ||W - U2 U2^T W U3 U3^T|| / ||W||), and each head's/group's coordinates in them, taken
    from the un-gained factors (the model's qk-norm runs on those). A side whose rank in
    ``want`` is None is kept whole: no subspace is written and its coordinates are the
    original per-head (per-group) blocks, exactly.

    Calibrated (whiteners ``left``/``right``, S^2 = C): the fit runs on S A_h, S B_g and
    U2 = S^-1 V2, so the projection is the oblique U2 (U2^T S^2) = S^-1 V2 V2^T S and the
    coordinates are U2^T S^2 A_h (likewise for the other side). Returns (Tucker, ranks,
    tensors, activation-weighted error or None); a whole side's rank is its full width.

    ``out_gram`` (value-output tensor, calibrated): the output subspace is taken from it
    (:func:`_output_gram`) instead of the fit, which then keeps that side whole."""
    H = stack.heads
    ceil = clamp_ranks(stack, (H, stack.shape[1], stack.shape[2]))
    whole = (want[1] is None, want[2] is None)
    fit = (H, ceil[1] if whole[0] else want[1], ceil[2] if whole[1] else want[2])
    got = clamp_ranks(stack, fit)
    by_gram = out_gram is not None and not whole[0]
    if by_gram:
        fit, got = (H, ceil[1], got[2]), (H, got[1], got[2])
    weighted = None
    if left is None and right is None:
        t = tucker(stack, fit if by_gram else got, hooi_iters=hooi_iters)
    else:
        wt = weighted_tucker(stack, fit if by_gram else got, left, right, hooi_iters=hooi_iters)
        t, weighted = wt.tucker, wt.weighted_error
    if by_gram:
        t, weighted = _with_output_side(stack, t, out_gram, got[1], right)
    _, U2, U3 = t.factors
    if key == "pre":
        raw = (layer.pre_ungained or layer.pre).to(device=U2.device, dtype=U2.dtype)
    else:
        raw = layer.post.to(device=U2.device, dtype=U2.dtype)
    if raw.left_basis is not None or raw.right_basis is not None:
        raise InputError(f"{arg('structure', 'qk-input')} needs per-head {key} factors (not MLA latents)")
    names = QK_INPUT_PARTS if key == "pre" else PER_HEAD_PARTS
    tensors = {}
    for side, (U, w, coords) in enumerate(((U2, left, raw.left), (U3, right, raw.right))):
        if whole[side]:  # identity subspace: not written; the coordinates are the original blocks
            tensors[names[2 + side]] = coords
            continue
        P = U.T if w is None else U.T @ (w.S @ w.S).to(U)
        tensors[names[side]] = U
        tensors[names[2 + side]] = P @ coords
    if key == "pre" and layer.qk_gains is not None:
        tensors["query_gain"], tensors["key_gain"] = (g.to(U2) for g in layer.qk_gains)
    out = {k: v.to(store).cpu().contiguous() for k, v in tensors.items()}
    shape = stack.shape
    got = (H, shape[1] if whole[0] else got[1], shape[2] if whole[1] else got[2])
    return t, got, out, weighted


def _per_head_energy(stack, left, right, energy, d: int, out_gram=None):
    """Per-side ranks for --energy in a per-head structure: the smallest rank holding
    ``energy`` of the side's (weighted) spectrum, or None (kept whole) where that rank
    would not save parameters."""
    from .lowrank import energy_rank_or_dense as side_rank

    s = mode_spectra(reduce(_whitened(stack, left, right)))
    sides = _side_spectra(stack, s, d)
    if out_gram is not None:
        sides[0].sigma = torch.linalg.eigvalsh(out_gram).flip(0).clamp_min(0).sqrt().double().cpu()
    return (stack.heads, *(side_rank(sp, energy) for sp in sides))


def tensor_structure(key: str, kind: str, fixed: bool, kept: bool) -> str:
    """Structure of one tensor: the pre-softmax one follows ``kind`` (``qk_input`` or
    ``tucker``); the value-output one is ``per_head`` when kept as it is (``--tensors``),
    and with qk_input models under --params/--energy (its per-side cost never exceeds the
    original's, where the 3-mode core can cost 2x W_V + W_O), else the 3-mode ``tucker``."""
    if key == "pre":
        return QK_INPUT if kept else kind
    return PER_HEAD if kept or (kind == QK_INPUT and not fixed) else TUCKER


def _compress_tensor(layer, key, dev, calib, budget, energy, fixed_pre, fixed_post, kind, hooi_iters, store, spec,
                     tensors="both"):
    """One tensor of a layer: ranks, decomposition, factors on the host. Returns (record
    entry, {part: tensor}, notes)."""
    notes = []
    stack = getattr(layer, key).to(device=dev, dtype=torch.float64)
    kept = tensors not in (key, "both")
    structure = tensor_structure(key, kind, fixed_pre is not None, kept)
    left, right = (None, None) if kept else _metric(stack, key, calib, layer.index)
    per_head = structure in (QK_INPUT, PER_HEAD)
    gram = _output_gram(stack, calib, layer.index) if structure == PER_HEAD and not kept else None
    if kept:
        want = (stack.heads, None, None)
    elif budget is not None:
        want = budget[(layer.index, key)]
    elif energy is not None and per_head:
        want = _per_head_energy(stack, left, right, energy, spec.d, gram)
    elif energy is not None:
        s = mode_spectra(reduce(_whitened(stack, left, right)))
        want = energy_ranks(TensorSpectra(stack.shape, tuple(x.cpu().tolist() for x in s)), energy)
    else:
        want = fixed_pre if key == "pre" else fixed_post
    if per_head:
        if fixed_pre is not None and not kept:
            want = (stack.heads, want[1], want[2])  # the head mode is never truncated here
        t, got, parts, weighted = _per_head(layer, key, stack, want, hooi_iters, store, left, right, gram)
        whole = [w is None for w in want[1:]]
        want = tuple(g if w is None else w for g, w in zip(got, want))
        count = per_head_params(stack, [None if w else r for w, r in zip([False, *whole], got)], spec.d)
    else:
        got = clamp_ranks(stack, want)
        weighted = None
        whole = None
        if calib is None:
            t = tucker(stack, got, hooi_iters=hooi_iters)
        else:
            wt = weighted_tucker(stack, got, left, right, hooi_iters=hooi_iters)
            t, weighted = wt.tucker, wt.weighted_error
        parts = {part: x.to(store).cpu().contiguous() for part, x in zip(PARTS[key], [t.core, *t.factors])}
        count = tucker_params(stack.shape, t.ranks)
    if tuple(got) != tuple(want):
        notes.append(f"layer {layer.index} {key}: ranks {list(want)} clamped to the mode ceilings {list(got)}")
    entry = {"shape": list(stack.shape), "ranks": list(got), "rel_error": 0.0 if kept else t.rel_error,
             "rel_error_hosvd": 0.0 if kept else t.errors[0], "params": count}
    if whole is not None:
        entry["whole_sides"] = whole  # sides kept whole (no subspace written)
    if key == "post":
        entry["structure"] = structure
    if kept:
        entry["kept"] = True
    if calib is not None:  # rel_error is then the weight-space error of the mapped-back factors
        entry["activation_rel_error"] = 0.0 if kept else weighted
        entry["metric_condition"] = [None if w is None else w.condition for w in (left, right)]
    return entry, parts, notes


# On a GPU the tensors of up to LAYERS_IN_FLIGHT layers are decomposed at once on STREAMS
# threads (one CUDA stream each): a tensor's HOSVD and HOOI steps depend on each other, one
# dense eigensolver leaves most of the GPU idle, so independent tensors fill it.
STREAMS = 4
LAYERS_IN_FLIGHT = 2


def concurrency(device: torch.device) -> tuple[int, int]:
    """(threads, layers in flight) of ``compress``: ``STREAMS`` and ``LAYERS_IN_FLIGHT`` on
    CUDA, (1, 1) on the CPU (inline, one tensor after the other: BLAS uses every core)."""
    return (STREAMS, LAYERS_IN_FLIGHT) if device.type == "cuda" else (1, 1)


def compress(path, out, *, ranks: Sequence[int] | str | None = None, ranks_post: Sequence[int] | str | None = None,
             energy: float | None = None, params: float | None = None, hooi_iters: int = 2,
             device: str = "auto", dtype: str | None = None, overwrite: bool = False,
             structure: str = "auto", config=None, heads=None, kv_heads=None, head_dim=None, family=None,
             calibrate=None, calib_tokens: int = 4096, method: str = "tucker", tensors: str = "both",
             moments=None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Compress ``path`` into the directory ``out``; returns the compression record
    (also stored as the checkpoint's ``tuckerctl`` metadata). Under torchrun the layers
    are shared among the processes and rank 0 writes; the other ranks return None.

    ``dtype``: stored factor dtype; None = the source's (bf16/fp16 in, same out; float32
    for float32, fp8 and quantised GGUF sources). ``structure``: ``auto`` | ``qk-input`` |
    ``tucker`` for the pre-softmax tensor (see :func:`choose_structure`).

    ``calibrate``: a text file; the original model (via transformers) runs on its first
    ``calib_tokens`` tokens and the decomposition minimises the error of the layers'
    outputs on those inputs instead of the weights' Frobenius error (``moments``: the
    same statistics precomputed by :func:`tuckerctl.calibrate.calibrate`).
    ``method="svd"``: the per-matrix whitened-SVD baseline (:mod:`tuckerctl.lowrank`).
    ``tensors``: which tensor(s) to compress (``pre``, ``post`` or ``both``)."""
    fixed_pre = parse_ranks(ranks, "ranks")
    fixed_post = parse_ranks(ranks_post, "ranks_post") or fixed_pre
    compress_choice(fixed_pre, ranks_post, energy, params, hooi_iters, dtype)
    if structure not in STRUCTURES:
        raise InputError(f"{arg('structure')}: {structure!r} is not one of {', '.join(STRUCTURES)}")
    if method not in METHODS:
        raise InputError(f"{arg('method')}: {method!r} is not one of {', '.join(METHODS)}")
    if tensors not in TENSORS:
        raise InputError(f"{arg('tensors')}: {tensors!r} is not one of {', '.join(TENSORS)}")
    if method == "tucker" and tensors != "both" and structure == "tucker":
        raise InputError(f"{arg('tensors', tensors)}: the kept tensor is stored in the per-head structure, "
                         f"which {arg('structure', 'tucker')} excludes")
    if method == "svd" and fixed_pre is not None:
        raise InputError(f"{arg('method', 'svd')} takes {arg('params')} or {arg('energy')}, not {arg('ranks')}")
    if calib_tokens < 2:
        raise InputError(f"{arg('calib_tokens')}: {calib_tokens} must be at least 2")
    if calibrate is not None:
        from .calibrate import read_text

        read_text(calibrate)  # a bad file fails now, not after loading the model
    claim(out, "checkpoint", inputs=[path, config], overwrite=overwrite)  # refuse before any work
    dev = resolve_device(device)
    start = time.perf_counter()
    ckpt, adapter, spec = open_model(path, config, attention_only=False, heads=heads, kv_heads=kv_heads,
                                     head_dim=head_dim, family=family)
    kind = choose_structure(spec, structure)
    out = Path(out)
    indices = list(range(spec.layers))
    calib = _moments(path, calibrate, calib_tokens, moments, indices, dev)
    if method == "svd":
        from .lowrank import compress_lowrank

        return compress_lowrank(path, out, ckpt, adapter, spec, indices, dev, calib, energy=energy, params=params,
                                tensors=tensors, dtype=dtype or "float32", overwrite=overwrite,
                                calibrate=calibrate, start=start, progress=progress)
    steps = len(indices) * (3 if params is not None else 1)
    requested = dev
    group, dev = join(dev)
    if not group.writer:
        progress = None
    budget = _budget_ranks(adapter, ckpt, spec, indices, params, dev,
                           (lambda d, t: progress(d, steps)) if progress else None,
                           kind, calib, group, tensors) if params is not None else None
    done = []  # per layer of this rank's share: (record, factors, notes)
    store = None
    threads, window = concurrency(dev)
    with StreamPool(dev, threads, "tuckerctl-tensor") as pool:
        def submit_layer(layer):
            nonlocal dtype, store
            if store is None:
                dtype = dtype or _SOURCE_STORE.get(ckpt.dtype(layer.tensors[0]), "float32")
                store = STORE_DTYPES[dtype]
            return [pool.submit(_compress_tensor, layer, key, dev, calib, budget, energy, fixed_pre, fixed_post,
                                kind, hooi_iters, store, spec, tensors) for key in ("pre", "post")]

        for layer, jobs in pipelined(iter_layers(adapter, ckpt, spec, group.shard(indices), dev), submit_layer, window):
            rec = {"index": layer.index, "params_original": layer.params, "source_tensors": layer.tensors,
                   "structure": tensor_structure("pre", kind, fixed_pre is not None, tensors == "post")}
            factors: dict[str, torch.Tensor] = {}
            notes = []
            for key, job in zip(("pre", "post"), jobs):
                entry, parts, note = job.result()
                factors.update({factor_name(layer.index, key, part): x for part, x in parts.items()})
                rec[key] = entry
                notes += note
            if layer.out_bias is not None:
                factors[f"{TENSOR_PREFIX}.{layer.index}.out_bias"] = layer.out_bias.to(store).cpu().contiguous()
            done.append((rec, factors, notes))
            if progress:
                progress(len(done) + (steps - len(indices)), steps)
    # Under torchrun rank 0 collects every layer's factors and alone writes the checkpoint.
    parts = group.gather(done)
    if parts is None:
        return None
    done = sorted((item for part in parts for item in part), key=lambda item: item[0]["index"])
    records = [rec for rec, _, _ in done]
    factors = {name: t for _, layer_factors, _ in done for name, t in layer_factors.items()}
    notes = [note for _, _, layer_notes in done for note in layer_notes]
    if store is None:
        dtype = dtype or "float32"
        store = STORE_DTYPES[dtype]
    # qk_input keeps the model's own qk-norm modules: their tensors stay in the output.
    replaced = {n for rec in records for n in rec["source_tensors"]
                if not (rec["structure"] == QK_INPUT and n.endswith(("q_norm.weight", "k_norm.weight")))}
    # Same-named notes for every layer read badly; keep the first few.
    if len(notes) > 4:
        notes = notes[:3] + [f"... and {len(notes) - 3} more clamped tensors"]
    original = sum(r["params_original"] for r in records)
    compressed = sum(r[k]["params"] for r in records for k in ("pre", "post"))
    warnings = []
    if compressed > original:
        warnings.append(f"the compressed attention has MORE parameters than the original "
                        f"({compressed:,} vs {original:,}, ratio {compressed / original:.2f}): lower the ranks, "
                        f"--energy or use --params")
    elem = torch.empty((), dtype=store).element_size()
    kv_orig = spec.kv_cache_width
    kv_layers = [_kv_layer(r, spec) for r in records]
    info = {
        "schema": SCHEMA,
        "tool_version": __version__,
        "source": source_record(path, ckpt, replaced),
        "model": spec.as_dict(),
        "structure": kind,
        "flags": {
            "latent_rope_needed": spec.rope and kind == TUCKER,
            "qk_norm": spec.qk_norm,
            **({"qk_norm_eps": float((ckpt.config or {}).get("rms_norm_eps", 1e-6))} if spec.qk_norm else {}),
            **{k: spec.extras[k] for k in ("softcap", "alibi", "clip_qkv", "causal") if k in spec.extras},
        },
        "settings": {"ranks": list(fixed_pre) if fixed_pre else None,
                     "ranks_post": list(fixed_post) if fixed_post else None,
                     "energy": energy, "params": params, "hooi_iters": hooi_iters, "dtype": dtype,
                     "structure": kind, "device": str(requested), "method": method, "tensors": tensors,
                     "calibration": calibration_record(calibrate, calib)},
        "layers": records,
        "summary": {"params_original": original, "params_tucker": compressed,
                    "ratio": compressed / original if original else None,
                    "max_rel_error": worst(e for r in records for e in (r["pre"]["rel_error"], r["post"]["rel_error"])),
                    "kv_cache_per_token": {
                        "original": kv_orig,
                        "tucker_max": max(kv_layers),
                        "original_all_layers": kv_orig * len(records),
                        "tucker_all_layers": sum(kv_layers),
                        "bytes_original_all_layers": kv_orig * len(records) * elem,
                        "bytes_tucker_all_layers": sum(kv_layers) * elem,
                        "dtype": dtype}},
        "warnings": warnings,
        "notes": notes + ([
            "RoPE model in the tucker structure: the factors hold the zero-offset (content) bilinear forms; "
            "running them needs latent RoPE, an APPROXIMATION that changes the positional kernel (fine-tune "
            "after compressing); --structure qk-input runs the model's own RoPE exactly"]
            if spec.rope and kind == TUCKER and spec.attention != "MLA" else []),
    }
    if calib is not None:
        info["summary"]["max_activation_rel_error"] = max(r[k]["activation_rel_error"]
                                                           for r in records for k in ("pre", "post"))
    converted, config = None, None
    if ckpt.format == "gguf":
        from .gguf_reader import hf_layout

        layout = hf_layout(ckpt)
        if layout is None:
            info["notes"].append("gguf source of this architecture: only the attention factors are written, "
                                 "non-attention tensors are not copied (export needs them)")
        else:
            converted, config = layout
            info["notes"].append("gguf source: non-attention tensors written dequantised (float32) under "
                                 "transformers names, with a transformers config; the tokenizer stays in the GGUF")
    elif ckpt.format != "safetensors":
        info["notes"].append(f"{ckpt.format} source: only the attention factors are written, "
                             "non-attention tensors are not copied")
    write_checkpoint(out, ckpt, replaced, factors, info, overwrite=overwrite, converted=converted, config=config)
    info["summary"]["seconds"] = round(time.perf_counter() - start, 3)
    return info


def _moments(path, calibrate, calib_tokens, moments, indices, dev):
    """Calibration moments per layer (computed, given, or None)."""
    if moments is None and calibrate is not None:
        from .calibrate import calibrate as collect

        moments = collect(path, calibrate, calib_tokens, device=dev)
    if moments is not None:
        missing = [i for i in indices if i not in moments]
        if missing:
            raise InputError(f"{path}: calibration found no attention inputs for layer {missing[0]}")
    return moments


def calibration_record(calibrate, moments) -> dict | None:
    if moments is None:
        return None
    return {"text": None if calibrate is None else str(calibrate), "tokens": next(iter(moments.values())).tokens}


def _kv_layer(rec: dict, spec) -> int:
    """Numbers cached per token by one compressed layer: the latent key and value (r3 +
    r3~); a per-head side caches whichever is smaller, the latent or the per-group
    key/value it up-projects to (a side kept whole caches the original keys/values)."""
    total = 0
    for key, width in (("pre", spec.head_dim), ("post", spec.value_dim)):
        r3 = rec[key]["ranks"][2]
        per_head = (rec["structure"] if key == "pre" else rec[key].get("structure")) in (QK_INPUT, PER_HEAD)
        total += min(r3, spec.kv_heads * width) if per_head else r3
    return total
