"""``tuckerctl analyze``: per-layer multilinear spectra, effective ranks and ceilings.

Reads one layer at a time (the next one is read in a background thread while the
current one is computed), so peak memory is one or two layers' attention weights
plus O(d^2) work space, whatever the model size. On a GPU the tensors of up to three
layers are computed at once, one CUDA stream each (:mod:`tuckerctl.streams`), and their
eigenvalue problems are solved on a second pool of streams while each tensor's thread
computes the rest: a few more layers and d x d work spaces, still flat in the layer count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from . import __version__
from .adapters import LayerWeights, ModelSpec
from .checkpoint import Checkpoint
from .device import resolve_device
from .distributed import join
from .errors import InputError, arg
from .exact import EXACT_TABLE_MAX_FLOPS, full_widths, gqa_errors, hosvd_residuals, table_flops
from .loader import iter_layers, open_model
from .multilinear import ModeSpectra, frobenius_norm_sq, mode_spectra_with_bases, reduce, spectrum_problems
from .noise import mode_noise, relative_rms_error, resolution
from .pareto import gqa_groups, rank_grid
from .ranks import DEFAULT_ENERGY, energy_rank, family_ceilings, mode_summary, tucker_params
from .rope import DEFAULT_OFFSETS, Rotation, averaged_problems
from .schema import MODE_NAMES, SCHEMA
from .streams import StreamPool, pipelined
from .usage import parse_layer_spec

PARAMS_ENERGY = 0.99  # energy level of the "Tucker at measured ranks" parameter count
# On a GPU: tensors of up to LAYERS_IN_FLIGHT layers computed at once on TENSOR_STREAMS
# threads, their eigenvalue problems on SOLVER_STREAMS more (one CUDA stream each), so that
# the eigensolver -- most of the time -- always has several solves in flight: 4-6 concurrent
# float64 solves at n = 8192 took 0.38 s each on an H200 against 0.50 s alone.
TENSOR_STREAMS = 4
SOLVER_STREAMS = 4
LAYERS_IN_FLIGHT = 3


def parse_layers(layers: str | Sequence[int] | None, count: int) -> list[int]:
    """The layers to analyse, sorted: indices as given, or the text form ``"0,5-7"`` ->
    [0, 5, 6, 7]; None -> all layers. Errors name the field."""
    if layers is None or len(layers) == 0:
        return list(range(count))
    spans = parse_layer_spec(layers) if isinstance(layers, str) else [(int(i), int(i)) for i in layers]
    out: list[int] = []
    for lo, hi in spans:
        if lo < 0 or hi >= count:
            span = f"{lo}-{hi}" if hi != lo else str(lo)
            raise InputError(f"{arg('layers')}: {span!r} is outside 0-{count - 1} (the model has {count} layers, "
                             f"counted from 0)")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def stored_dtype(ckpt: Checkpoint, layer: LayerWeights) -> str:
    """Stored dtype (or GGUF quantisation type) of the layer's first attention tensor."""
    return ckpt.dtype(layer.tensors[0]) if layer.tensors else "F32"


def storage_eps(dtype: str) -> tuple[float, str]:
    """Relative rms storage error of ``dtype`` (:mod:`tuckerctl.noise`), F32's when unknown."""
    try:
        return relative_rms_error(dtype), dtype
    except ValueError:
        return relative_rms_error("F32"), f"{dtype} (no rounding model: F32's used)"


def gauge_fixed(stack):
    """Per-head qk-norm gauge: RMSNorm over each head's q (k) makes the model invariant to
    rescaling each head's query (group's key) factor, so fix the scale: every head's folded
    query factor, and every group's key factor, rescaled to the layer's rms Frobenius norm."""
    if stack.left_basis is not None or stack.right_basis is not None:
        return stack

    def even(x):
        norms = x.flatten(1).norm(dim=1).clamp_min(1e-300)
        return x * (norms.square().mean().sqrt() / norms)[:, None, None]

    return replace(stack, left=even(stack.left), right=even(stack.right))


def tradeoff_grids(red, groups: list[int], width: int, ceilings) -> list[list[int]]:
    """Rank triples at which analyze computes exact truncated-HOSVD errors: every head rank up
    to 24 heads (else a geometric grid), geometric grids of about 20 ranks for the other two
    modes, plus the GQA widths G' d_h and the ceilings (so the MLA- and GQA-shaped points and
    the model's own ranks are on the grid)."""
    H, c2, c3 = full_widths(red)
    g1 = list(range(1, H + 1)) if H <= 24 else rank_grid(H, 16).tolist()
    g2 = rank_grid(c2, 20, [ceilings[1]]).tolist()
    g3 = rank_grid(c3, 20, [g * width for g in groups] + [ceilings[2]]).tolist()
    return [g1, g2, g3]


def exact_tradeoff(red, groups: list[int], width: int, ceilings, bases=None) -> dict:
    """Exact errors for figure 4 of one tensor: GQA-shaped per grouping (always) and the
    truncated-HOSVD residual table on the grid (skipped above EXACT_TABLE_MAX_FLOPS: None).
    ``bases``: the tensor's HOSVD bases if already computed (``mode_spectra_with_bases``)."""
    out = {"gqa": gqa_errors(red, groups, width)}
    if table_flops(red) <= EXACT_TABLE_MAX_FLOPS:
        grids = tradeoff_grids(red, groups, width, ceilings)
        table, norm_sq = hosvd_residuals(red, grids, bases)
        out["hosvd"] = {"grid": grids, "residual_sq": table.cpu().tolist(), "norm_sq": norm_sq}
    else:
        out["hosvd"] = None
    return out


def analyze_tensor(stack, names: tuple[str, str, str], energies, tol: float | None, device,
                   groups: list[int] | None = None, width: int | None = None,
                   rope: tuple[Rotation, int] | None = None, eps: float = 0.0,
                   solver: StreamPool | None = None) -> dict:
    """Spectra and effective ranks of one head stack (computed in float64); with ``groups``
    also the exact trade-off errors (:func:`exact_tradeoff`, under ``"exact"``); with ``rope``
    (rotation, offsets) the spectra are averaged over offsets 0..offsets-1 (:mod:`tuckerctl.rope`).
    Numerical ranks: above ``tol`` (relative) if given, else above the rounding noise of weights
    stored with relative rms error ``eps``; either clamped to the method's floor (:mod:`tuckerctl.noise`).
    ``solver``: a pool the eigenvalue problems are solved on while this thread computes the
    rest (GPU: their own streams); without it they are solved here."""
    st = stack.to(device=device, dtype=torch.float64)
    red = reduce(st)
    bases = None
    if groups and not rope and table_flops(red) <= EXACT_TABLE_MAX_FLOPS:
        # The exact table needs every mode's vectors: one eigh/SVD per mode gives both.
        spectra, bases = mode_spectra_with_bases(red)
        head_gram = spectra.head_gram
    else:
        head_gram, problems = averaged_problems(red, *rope) if rope else spectrum_problems(red)
        solver = solver or StreamPool(torch.device(device), 1)  # size 1: solved here, when submitted
        pending = [solver.submit(pb.solve) for pb in problems]
    floors = resolution(red, averaged=rope is not None)
    nu = mode_noise(red, st.shape[1], st.shape[2], eps, eps) if tol is None else None
    exact = exact_tradeoff(red, groups, width or st.left.shape[2], st.ceilings, bases) if groups else None
    if bases is None:
        spectra = ModeSpectra(*(job.result() for job in pending), head_gram)
    if tol is None:
        tols = [max(v / float(s[0]), f) if len(s) and float(s[0]) > 0 else f for v, s, f in zip(nu, spectra, floors)]
    else:
        tols = [max(tol, f) for f in floors]
    diag = head_gram.diagonal().clamp_min(1e-300).sqrt()
    cos = (head_gram / diag[:, None] / diag[None, :]).cpu()
    shape = st.shape
    modes = {name: mode_summary(s, size, ceil, energies, t, f)
             for name, s, size, ceil, t, f in zip(names, spectra, shape, st.ceilings, tols, floors)}
    # ||W||_F of the zero-offset form (the exact errors below are relative to it).
    out = {"shape": list(shape), "norm": float(frobenius_norm_sq(red).clamp_min(0).sqrt()),
           "modes": modes, "head_cosine": [[round(float(v), 6) for v in row] for row in cos]}
    if exact is not None:
        out["exact"] = exact
    return out


def _ranks_at(tensor: dict, tau: float) -> list[int]:
    return [max(1, energy_rank(m["singular_values"], tau)) for m in tensor["modes"].values()]


def analyze_layer(layer: LayerWeights, energies, tol: float | None, device, groups: list[int] | None = None,
                  rope: tuple[Rotation, int] | None = None, eps: float = 0.0, gauge: bool = False) -> dict:
    """The layer's record: both tensors (:func:`analyze_tensor`) and the parameter counts."""
    inline = StreamPool(torch.device(device), 1)
    jobs = _layer_jobs(inline, inline, layer, energies, tol, device, groups, rope, eps, gauge)
    return _layer_record(layer.index, layer.params, {key: job.result() for key, job in jobs.items()})


def _layer_jobs(pool: StreamPool, solver: StreamPool, layer: LayerWeights, energies, tol, device, groups, rope,
                eps, gauge) -> dict:
    """Both tensors of a layer submitted to ``pool`` (their eigenvalue problems to ``solver``):
    {"pre": Future, "post": Future}."""
    jobs = {}
    for key in ("pre", "post"):
        stack = getattr(layer, key)
        if gauge and key == "pre":
            stack = gauge_fixed(stack)
        jobs[key] = pool.submit(analyze_tensor, stack, MODE_NAMES[key], energies, tol, device, groups,
                                stack.left.shape[2], rope if key == "pre" else None, eps, solver)
    return jobs


def _layer_record(index: int, params: int, tensors: dict) -> dict:
    out = {"index": index, **tensors}
    ranks = {key: _ranks_at(out[key], PARAMS_ENERGY) for key in ("pre", "post")}
    tucker = sum(tucker_params(out[k]["shape"], ranks[k]) for k in ranks)
    out["params"] = {"original": params, f"tucker_{PARAMS_ENERGY:g}": tucker,
                     f"ranks_{PARAMS_ENERGY:g}": ranks,
                     "kv_cache_tucker": ranks["pre"][2] + ranks["post"][2]}
    return out


def concurrency(device: torch.device) -> tuple[int, int]:
    """(tensor threads, eigensolver threads) of ``analyze``: on CUDA ``TENSOR_STREAMS`` and
    ``SOLVER_STREAMS`` (one stream each), on the CPU (1, 1): computed inline, one after the
    other (its BLAS already uses every core)."""
    return (TENSOR_STREAMS, SOLVER_STREAMS) if device.type == "cuda" else (1, 1)


def verdicts(spec: ModelSpec, layers: list[dict], noise: str = "the tolerance") -> list[str]:
    """Plain-language reading of the measured ranks against the ceilings; ``noise`` names what
    the numerical rank's tolerance stands for."""
    ceil = family_ceilings(spec.attention, spec.d, spec.heads, spec.kv_heads, spec.head_dim,
                           spec.value_dim, spec.extras.get("q_lora_rank"),
                           spec.extras.get("kv_lora_rank"), spec.extras.get("qk_rope_head_dim", 0))
    n = len(layers)
    lines = []
    for key, label in (("pre", "pre-softmax (query-key)"), ("post", "post-softmax (value-output)")):
        for mode_index, mode in enumerate(MODE_NAMES[key]):
            ms = [layer[key]["modes"][mode] for layer in layers]
            at_ceiling = sum(m["numerical_rank"] >= m["ceiling"] for m in ms)
            structural = sum(m.get("structural_rank", 0) >= m["ceiling"] for m in ms)
            size = ms[0]["size"]
            c = ms[0]["ceiling"]
            fam = ceil[key][mode_index]
            e99 = sum(m["energy_ranks"].get("0.99", 0) for m in ms) / n
            if c < size:
                where = f"the {spec.attention} ceiling {c}" + (f" (= {_ceiling_formula(spec, key, mode)})"
                                                               if _ceiling_formula(spec, key, mode) else "")
                lines.append(f"{label} {mode} mode: structural rank at {where} in {structural} of {n} layers, "
                             f"numerical rank (above {noise}) in {at_ceiling}; 0.99-energy rank {e99:.0f} on average")
            else:
                full = "full" if at_ceiling == n else f"full in {at_ceiling} of {n} layers"
                lines.append(f"{label} {mode} mode: {full} (size {size}); 0.99-energy rank {e99:.0f} on average"
                             + (f", family ceiling {fam}" if fam != size and mode != "head" else ""))
    orig = sum(layer["params"]["original"] for layer in layers)
    tuck = sum(layer["params"][f"tucker_{PARAMS_ENERGY:g}"] for layer in layers)
    if orig:
        lines.append(f"Tucker at the 0.99-energy ranks: {tuck:,} vs {orig:,} attention parameters "
                     f"({100 * tuck / orig:.0f}%)")
    return lines


def _ceiling_formula(spec: ModelSpec, key: str, mode: str) -> str:
    if spec.attention in ("GQA", "MQA") and mode in ("key", "value"):
        return f"G*d_h = {spec.kv_heads}*{spec.head_dim}"
    if spec.attention == "MLA":
        x = spec.extras
        if key == "pre" and mode == "key":
            return f"kv_lora + rope = {x.get('kv_lora_rank')}+{x.get('qk_rope_head_dim')}"
        if key == "pre" and mode == "query" and x.get("q_lora_rank"):
            return f"q_lora = {x.get('q_lora_rank')}"
        if key == "post" and mode == "value":
            return f"kv_lora = {x.get('kv_lora_rank')}"
    return ""


def analyze(path, *, config=None, heads=None, kv_heads=None, head_dim=None, family=None,
            layers: str | Sequence[int] | None = None, energy=DEFAULT_ENERGY, tol: float | None = None,
            rope_offsets: int = DEFAULT_OFFSETS, device: str = "auto",
            progress: Callable[[int, int], None] | None = None, revision: str | None = None) -> dict:
    """Analyse a checkpoint; returns the versioned analysis document (README: JSON)."""
    for t in energy:
        if not 0 < t <= 1:
            raise InputError(f"{arg('energy')}: {t} is not in (0, 1]")
    if tol is not None and not 0 < tol < 1:
        raise InputError(f"{arg('tol')}: {tol} is not in (0, 1)")
    dev = resolve_device(device)
    start = time.perf_counter()
    ckpt, adapter, spec = open_model(path, config, revision=revision, heads=heads, kv_heads=kv_heads,
                                     head_dim=head_dim, family=family)
    indices = parse_layers(layers, spec.layers)
    results = []
    noise_model = None
    gauge = spec.qk_norm and str(spec.extras.get("qk_norm_type", "")).startswith("per_head")
    groups = gqa_groups(spec.heads, spec.kv_heads if spec.attention != "MLA" else None)
    rope, rope_form = rope_setting(spec, rope_offsets)
    # Under torchrun each process takes every N-th layer (tuckerctl.distributed); each takes
    # the noise model from its first layer (attention tensors share one dtype), the document
    # rank 0's, i.e. that of the first layer, as in one process.
    group, rank_dev = join(dev)
    mine = group.shard(indices)
    # On a GPU the tensors of up to LAYERS_IN_FLIGHT layers are in flight at once on a pool of
    # streams while the loader reads the next layer; on the CPU one after the other, inline.
    tensor_threads, solve_threads = concurrency(rank_dev)
    with StreamPool(rank_dev, tensor_threads, "tuckerctl-tensor") as pool, \
            StreamPool(rank_dev, solve_threads, "tuckerctl-eig") as solver:
        def submit_layer(layer):
            nonlocal noise_model
            if noise_model is None:
                eps, dtype = storage_eps(stored_dtype(ckpt, layer))
                noise_model = {"dtype": dtype, "relative_rms": eps}
            return _layer_jobs(pool, solver, layer, energy, tol, rank_dev, groups, rope,
                               noise_model["relative_rms"], gauge)

        window = 1 if pool.size == 1 else LAYERS_IN_FLIGHT
        for layer, jobs in pipelined(iter_layers(adapter, ckpt, spec, mine, rank_dev), submit_layer, window):
            results.append(_layer_record(layer.index, layer.params, {key: job.result() for key, job in jobs.items()}))
            if progress and group.writer:
                progress(len(results), len(mine))
    results = sorted((r for part in group.all_gather(results) for r in part), key=lambda r: r["index"])
    noise_model = next((m for m in group.all_gather(noise_model) if m is not None), None)
    tables: dict = {}
    for result in results:  # in layer order, whichever process computed them
        for key in ("pre", "post"):
            exact = result[key].pop("exact")
            result[key]["gqa"] = exact["gqa"]
            _add_table(tables, key, exact["hosvd"])
    doc = {
        "schema": SCHEMA,
        "tool_version": __version__,
        "source": source_fields(path, ckpt),
        "model": spec.as_dict(),
        "settings": {"energy": list(energy), "tol": tol, "noise_model": noise_model, "device": str(dev),
                     "layers": indices, "rope_form": rope_form,
                     "qk_norm_gauge": "per-head query/key factors rescaled to equal Frobenius norms" if gauge
                     else None},
        "layers": results,
    }
    tucker_key = f"tucker_{PARAMS_ENERGY:g}"
    tradeoff = {key: _summary_tradeoff(results, key, tables.get(key)) for key in ("pre", "post")} if results else {}
    doc["summary"] = {"verdicts": verdicts(spec, results, noise_phrase(tol, noise_model)) if results else [],
                      "params_original": sum(r["params"]["original"] for r in results),
                      f"params_{tucker_key}": sum(r["params"][tucker_key] for r in results),
                      "tradeoff": tradeoff,
                      "seconds": round(time.perf_counter() - start, 3)}
    if results:
        doc["summary"]["verdicts"] += tradeoff_verdicts(doc)
        if rope_form:
            doc["summary"]["verdicts"].insert(0, f"pre-softmax spectra and ranks: {rope_form}")
        # The first-run reading, in plain words, ahead of the detailed verdicts.
        doc["summary"]["headline"] = headline(spec, results)
        doc["summary"]["verdicts"] = doc["summary"]["headline"] + doc["summary"]["verdicts"]
    return doc


def headline(spec: ModelSpec, layers: list[dict]) -> list[str]:
    """Two or three plain sentences a newcomer can act on: which modes use all the rank
    the architecture allows, where the energy sits, and whether a Tucker format at
    0.99 energy would be smaller than the model's own attention."""
    n = len(layers)
    every = "every layer" if n > 1 else "the analysed layer"
    capped, below, concentrated = [], [], []
    for key in ("pre", "post"):
        for mode in MODE_NAMES[key]:
            ms = [layer[key]["modes"][mode] for layer in layers]
            ceil, size = ms[0]["ceiling"], ms[0]["size"]
            # The structural rank (exact arithmetic on the stored weights): the numerical rank of
            # quantised weights sits below the ceiling however the model was trained.
            at = sum(m.get("structural_rank", m["numerical_rank"]) >= m["ceiling"] for m in ms)
            e99 = sum(m["energy_ranks"].get("0.99", m["numerical_rank"]) for m in ms) / n
            if mode != "head" and ceil < size:
                (capped if at == n else below).append((mode, ceil, at, _ceiling_formula(spec, key, mode)))
            elif mode != "head" and e99 < 0.75 * ceil:
                concentrated.append((mode, ceil, e99))
    lines = []
    if capped:
        modes = " and ".join(dict.fromkeys(m for m, *_ in capped))
        ceils = ", ".join(dict.fromkeys(f"{c}" + (f" = {f}" if f else "") for _, c, _, f in capped))
        lines.append(f"The {modes} modes sit exactly at the {spec.attention} ceiling ({ceils}) in {every}: "
                     f"the model uses all the rank {spec.attention} allows there.")
    for mode, ceil, at, _ in below:
        lines.append(f"The {mode} mode reaches its {spec.attention} ceiling {ceil} in only {at} of {n} layers: "
                     f"it does not use all the rank the architecture allows.")
    if concentrated:
        modes = " and ".join(dict.fromkeys(m for m, *_ in concentrated))
        where = ", ".join(f"{e:.0f} of {c}" for _, c, e in concentrated)
        lines.append(f"The {modes} modes are full rank, but 99% of their energy lies in fewer directions "
                     f"({where}, averaged over layers).")
    orig = sum(layer["params"]["original"] for layer in layers)
    tuck = sum(layer["params"][f"tucker_{PARAMS_ENERGY:g}"] for layer in layers)
    if orig:
        pct = 100 * tuck / orig
        if tuck >= orig:
            lines.append(f"A Tucker format keeping 99% of each mode's energy would need {pct:.0f}% of today's "
                         f"attention parameters, so this attention is not compressible at that accuracy.")
        else:
            lines.append(f"A Tucker format keeping 99% of each mode's energy would need {pct:.0f}% of today's "
                         f"attention parameters: compressible at that accuracy "
                         f"(try `tuckerctl compress --energy 0.99`).")
    return lines


def noise_phrase(tol: float | None, noise_model: dict | None) -> str:
    """What the numerical rank's tolerance means, for the verdicts."""
    if tol is not None:
        return f"--tol {tol:g}, clamped to what the float64 method resolves"
    dtype = (noise_model or {}).get("dtype", "F32")
    kind = "quantisation noise" if dtype.startswith(("Q", "IQ")) else "rounding noise"
    return (f"the {kind} of the stored {dtype} weights, relative rms {noise_model['relative_rms']:.2g}, "
            f"estimated per mode")


def rope_setting(spec: ModelSpec, offsets: int) -> tuple[tuple[Rotation, int] | None, str | None]:
    """(rotation, offsets) for the offset-averaged query-key spectra of a RoPE model, and the
    sentence that says which form the analysis shows (None for models without RoPE)."""
    if not spec.rope:
        return None, None
    if spec.attention == "MLA":
        return None, ("zero-offset form W[h] = W_Q^h W_K^gT (MLA's decoupled rope key is not averaged); "
                      "ranks and ceilings hold at every offset, energies are those of offset 0")
    if offsets <= 1:
        return None, ("zero-offset form W[h] = W_Q^h W_K^gT (--rope-offsets 0); ranks and ceilings hold at "
                      "every offset, energies are those of offset 0")
    model = spec.as_dict()
    rotation = Rotation.from_model(model)
    extra = ""
    if model.get("rope_theta_by_layer_type"):
        extra = " (the global layers' theta for every layer)"
    if model.get("rope_type"):
        extra += f" ({model['rope_type']} frequency scaling not modelled)"
    return (rotation, offsets), (f"RoPE offset-averaged: mode Grams averaged over offsets 0..{offsets - 1} "
                                 f"(theta {float(model.get('rope_theta') or 10000.0):g}{extra}); "
                                 "--rope-offsets 0 gives the zero-offset form")


def tradeoff_verdicts(doc: dict) -> list[str]:
    """Figure 4 in words, at exact errors: what each format reaches at the model's own size."""
    from . import pareto

    lines = []
    model = doc["model"]
    for key, label in (("pre", "pre-softmax"), ("post", "post-softmax")):
        t = pareto.tradeoff(doc, key)
        own = t.model.params
        kind = "exact truncated-HOSVD" if t.exact else "HOSVD tail bound"
        tuck, mla = pareto.best_error(t.tucker, own), pareto.best_error(t.mla, own)
        fmt = lambda e: "–" if e != e else f"{e:.3f}"  # noqa: E731
        lines.append(f"{label}: at the model's own size ({own:,.0f} parameters) its {model['attention']} format is "
                     f"exact; the best Tucker truncation has error {fmt(tuck)} ({kind}), the best MLA-shaped "
                     f"{fmt(mla)}")
        for i, g in enumerate(int(lab.removeprefix("G=")) for lab in t.gqa.labels):
            if model["attention"] != "MLA" and g % int(model["kv_heads"]) == 0:
                continue  # finer than the model's own grouping: exact, nothing to report
            x = t.gqa.params[i]
            contiguous = t.gqa_contiguous.errors[i] if t.gqa_contiguous is not None else t.gqa.errors[i]
            regrouped = next((r["regrouped_layers"] for r in doc["summary"]["tradeoff"][key]["gqa"]
                              if r["groups"] == g), 0)
            lines.append(f"{label}: GQA-shaped with {g} group(s) ({x:,.0f} parameters): exact error {contiguous:.3f}"
                         + (" with contiguous groups" if g > 1 else "")
                         + (f", {t.gqa.errors[i]:.3f} with the greedy regrouping "
                            f"({regrouped} of {len(doc['layers'])} layers regrouped)"
                            if t.gqa.errors[i] < contiguous * (1 - 1e-9) else "")
                         + f"; at that size Tucker {fmt(pareto.best_error(t.tucker, x))}, "
                           f"MLA-shaped {fmt(pareto.best_error(t.mla, x))}")
    if model["attention"] in ("MHA", "GQA", "MQA"):
        lines.append("Truncating a pretrained MHA/GQA model into Tucker loses to the model's own format at its own "
                     "size: the Tucker core does not exploit each head's rank <= d_h, which the model's factored "
                     "projections store for free. Tucker attention's gains come from training in the format.")
    return lines


def _add_table(tables: dict, key: str, hosvd: dict | None) -> None:
    """Sum the layers' exact HOSVD residual tables (same grid in every layer: same shapes)."""
    if hosvd is None or tables.get(key, {}) is None:
        tables[key] = None
        return
    res = torch.tensor(hosvd["residual_sq"], dtype=torch.float64)
    if key not in tables:
        tables[key] = {"grid": hosvd["grid"], "residual_sq": res, "norm_sq": hosvd["norm_sq"]}
    elif tables[key]["grid"] != hosvd["grid"]:
        tables[key] = None  # layers of different shapes: no common grid
    else:
        tables[key]["residual_sq"] += res
        tables[key]["norm_sq"] += hosvd["norm_sq"]


def _summary_tradeoff(results: list[dict], key: str, table: dict | None) -> dict:
    """Layer sums for figure 4: the exact truncated-HOSVD residuals on the grid (the same
    ranks in every layer) and the exact GQA-shaped errors per number of groups."""
    norm_sq = sum(r[key]["norm"] ** 2 for r in results)
    gqa = []
    for i, rec in enumerate(results[0][key]["gqa"]):
        contiguous = sum((r[key]["gqa"][i]["error_contiguous"] * r[key]["norm"]) ** 2 for r in results)
        best = sum((r[key]["gqa"][i]["error_best"] * r[key]["norm"]) ** 2 for r in results)
        rel = lambda x: (x / norm_sq) ** 0.5 if norm_sq > 0 else 0.0  # noqa: E731
        gqa.append({"groups": rec["groups"], "error_contiguous": rel(contiguous), "error_best": rel(best),
                    "regrouped_layers": sum(r[key]["gqa"][i]["best_grouping"] is not None for r in results)})
    hosvd = None
    if table is not None:
        hosvd = {"grid": table["grid"], "norm_sq": table["norm_sq"],
                 "residual_sq": [[[float(f"{v:.10g}") for v in row] for row in plane]
                                 for plane in table["residual_sq"].tolist()]}
    return {"form": "zero-offset", "hosvd": hosvd, "gqa": gqa}


def source_fields(path, ckpt: Checkpoint) -> dict:
    """The document's ``source``: what was asked for, the model's name, the format and,
    for Hub models, the revision and the local snapshot read."""
    out = {"path": str(path), "name": ckpt.name, "format": ckpt.format}
    if ckpt.revision:
        out["revision"] = ckpt.revision
    if str(ckpt.path) != str(path):
        out["local_path"] = str(ckpt.path)
    return out


def inspect(path, *, config=None, heads=None, kv_heads=None, head_dim=None, family=None,
            revision: str | None = None) -> dict:
    """What was detected: the model spec and, for the first layer, every tensor read."""
    ckpt, adapter, spec = open_model(path, config, revision=revision, heads=heads, kv_heads=kv_heads,
                                     head_dim=head_dim, family=family)
    layer0 = adapter.layer(ckpt, spec, 0)
    return {
        "schema": "tuckerctl.inspect/1",
        "tool_version": __version__,
        "source": {**source_fields(path, ckpt), "tensors": len(ckpt.names()),
                   "config": str(ckpt.config_path) if ckpt.config_path else None},
        "model": spec.as_dict(),
        "layer0": {
            "tensors": [{"name": n, "dtype": ckpt.dtype(n), "shape": list(ckpt.shape(n))} for n in layer0.tensors],
            "pre_shape": list(layer0.pre.shape), "post_shape": list(layer0.post.shape),
            "pre_ceilings": list(layer0.pre.ceilings), "post_ceilings": list(layer0.post.ceilings),
            "params": layer0.params,
        },
    }
