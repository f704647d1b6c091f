"""``tuckerctl report``: figures, ``index.html`` and ``summary.md`` from an analysis document.

:func:`load_analysis` reads and validates an analysis JSON written by ``tuckerctl
analyze``; :func:`build_report` writes the report directory (every file atomically, and
nothing outside that directory). The HTML is self-contained: inline CSS and relative
image paths, so the directory can be copied and read offline.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import numpy as np

from . import __version__, interactive, pareto
from .errors import InputError, arg
from .io import atomic_write
from .outputs import claim, file_mode
from .schema import MODE_NAMES, SCHEMA, SET_SCHEMA, TENSORS, layer_modes
from .strict import read_json

FORMATS = ("png", "svg", "pdf")
ATTENTIONS = ("MHA", "GQA", "MQA", "MLA")

FIGURES = {
    "fig1-spectra": (
        "Mode spectra",
        "Normalised singular values σ_i/σ_1 of the three unfoldings of each tensor (log scale), one line per "
        "layer coloured by depth. The dotted vertical line is the rank ceiling the architecture imposes; "
        "beyond it (shaded) the spectrum is structurally zero. A spectrum that runs to its ceiling uses all "
        "the rank the architecture allows; one that falls off early can be truncated."),
    "fig2-ranks": (
        "Effective rank by layer",
        "Energy ranks r(τ) (the smallest rank keeping a fraction τ of the squared singular values) and the "
        "numerical rank, per layer and mode. Dashed horizontal lines are the rank ceilings of MHA, of GQA "
        "with G groups (the model's own in bold) and of MLA (an MLA model's own latent widths; otherwise an "
        "MLA with the same KV cache per token, 2·G·d_h). No existing family compresses the head mode: its "
        "ceiling is always H. Tucker attention does (r1 < H)."),
    "fig3-heads": (
        "Head-mode structure",
        "Cosine similarity of the head slices, ⟨W[h], W[h′]⟩ / (‖W[h]‖ ‖W[h′]‖), of the pre- and "
        "post-softmax tensors, and the head-mode spectrum, for up to six evenly spread layers. Similar "
        "heads and a fast-falling head spectrum mean the head mode compresses (r1 < H)."),
    "fig5-evolution": (
        "Effective ranks across analyses",
        "Energy ranks r(τ) of every mode against the training step (read from the folder names or --label), "
        "or against the model size: per analysis, the median over layers (line) and the range over layers "
        "(band), the numerical rank's median (crosses), the rank ceiling of each model's architecture "
        "(dashed) and the mode size (dotted). Ranks that climb to the ceiling during training mean the "
        "model grows into all the rank its architecture allows."),
    "fig4-tradeoff": (
        "Error against parameters: Tucker, MLA- and GQA-shaped formats",
        "Relative error of truncating each tensor (the same ranks in every layer) against the parameters a "
        "format needs to store the truncation, summed over layers. Errors are exact: the truncated HOSVD's "
        "error at every grid triple (from the full core, computed by analyze) and the optimal GQA error for "
        "a grouping (Eckart–Young per group). Models too large for the exact table (see the verdicts) fall "
        "back to HOSVD tail bounds for Tucker and MLA-shaped (upper bounds, 8–15% above the truncated "
        "HOSVD's error in practice) and the key-mode tail for GQA (a lower bound, hollow diamonds). "
        "Black: Pareto frontier of Tucker formats (r1 ≤ H, any r2, r3; feasible triples of geometric grids). "
        "Red: MLA-shaped formats (r1 = H; latent query and key ranks for W, a latent value rank and a full "
        "output projection for W̃), stored as latent down-projections plus per-head up-projections — "
        "separate K and V latents and no decoupled RoPE key, not DeepSeek's shared KV latent. "
        "Blue diamonds: GQA-shaped formats with G groups (a shared key/value matrix of width d_h per group, "
        "every head's own query): the best grouping found (contiguous, or a greedy regrouping by key-side "
        "similarity); a dash marks the contiguous grouping where it is worse. Star: the model's own "
        "architecture, exact by construction (error 0 is drawn on the dotted floor line). For RoPE models "
        "the errors are those of the zero-offset (content) form. Per tensor, a shared latent projection "
        "(MLA's KV latent) is counted in each tensor that uses it. Truncating a pretrained model into Tucker "
        "loses to its own format at its own size: the core does not exploit each head's rank ≤ d_h."),
}


# ----------------------------------------------------------------------------- validation

class _Checker:
    """Walks an analysis document; the first bad field raises an InputError naming it."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, what: str):
        raise InputError(f"{self.source}: field '{path}' {what}")

    def get(self, obj, key, path: str):
        if not isinstance(obj, dict):
            self.fail(path.rsplit(".", 1)[0] if "." in path else path, "must be an object")
        if key not in obj:
            self.fail(path, "is missing")
        return obj[key]

    def int(self, obj, key, path: str, minimum: int = 0) -> int:
        v = self.get(obj, key, path)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(path, f"must be an integer >= {minimum} (got {v!r})")
        return v

    def num(self, obj, key, path: str) -> float:
        v = self.get(obj, key, path)
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            self.fail(path, f"must be a finite number (got {v!r})")
        return float(v)

    def numbers(self, obj, key, path: str, length: int | None = None) -> list:
        v = self.get(obj, key, path)
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(x)
                                          for x in v):
            self.fail(path, "must be a list of finite numbers")
        if length is not None and len(v) != length:
            self.fail(path, f"must have {length} entries (has {len(v)})")
        return v

    def list(self, obj, key, path: str) -> list:
        v = self.get(obj, key, path)
        if not isinstance(v, list) or not v:
            self.fail(path, "must be a non-empty list")
        return v


def validate_analysis(doc, source: str = "analysis") -> dict:
    """Check that ``doc`` is an analysis document this module can draw; returns it.

    Raises :class:`InputError` naming ``source`` and the first missing or malformed field."""
    c = _Checker(source)
    if not isinstance(doc, dict):
        raise InputError(f"{source}: not a JSON object")
    schema = c.get(doc, "schema", "schema")
    if schema != SCHEMA:
        c.fail("schema", f"is {schema!r}, expected {SCHEMA!r} (write it with `tuckerctl analyze --json`)")
    model = c.get(doc, "model", "model")
    for k in ("family", "attention"):
        if not isinstance(c.get(model, k, f"model.{k}"), str):
            c.fail(f"model.{k}", "must be a string")
    if model["attention"] not in ATTENTIONS:
        c.fail("model.attention", f"must be one of {', '.join(ATTENTIONS)} (got {model['attention']!r})")
    for k in ("layers", "d", "heads", "kv_heads", "head_dim"):
        c.int(model, k, f"model.{k}", 1)
    if model.get("value_dim") is not None:
        c.int(model, "value_dim", "model.value_dim", 1)
    if model["attention"] == "MLA":
        c.int(model, "kv_lora_rank", "model.kv_lora_rank", 1)
    settings = c.get(doc, "settings", "settings")
    energies = c.numbers(settings, "energy", "settings.energy")
    if not energies:
        c.fail("settings.energy", "must list at least one energy level")
    if settings.get("tol") is not None:  # null: tolerance from the rounding model, per mode
        c.num(settings, "tol", "settings.tol")
    summary = c.get(doc, "summary", "summary")
    verdicts = c.get(summary, "verdicts", "summary.verdicts")
    if not isinstance(verdicts, list) or not all(isinstance(v, str) for v in verdicts):
        c.fail("summary.verdicts", "must be a list of strings")
    for i, layer in enumerate(c.list(doc, "layers", "layers")):
        at = f"layers[{i}]"
        c.int(layer, "index", f"{at}.index")
        for key in TENSORS:
            t = c.get(layer, key, f"{at}.{key}")
            shape = c.numbers(t, "shape", f"{at}.{key}.shape", 3)
            if any(not isinstance(s, int) or s < 1 for s in shape):
                c.fail(f"{at}.{key}.shape", "must hold three positive integers")
            c.num(t, "norm", f"{at}.{key}.norm")
            modes = c.get(t, "modes", f"{at}.{key}.modes")
            for m, size in zip(MODE_NAMES[key], shape):
                p = f"{at}.{key}.modes.{m}"
                M = c.get(modes, m, p)
                if c.int(M, "size", f"{p}.size", 1) != size:
                    c.fail(f"{p}.size", f"is {M['size']}, but {at}.{key}.shape says {size}")
                c.int(M, "ceiling", f"{p}.ceiling", 1)
                c.int(M, "numerical_rank", f"{p}.numerical_rank")
                ranks = c.get(M, "energy_ranks", f"{p}.energy_ranks")
                for e in energies:
                    c.int(ranks, f"{e:g}", f"{p}.energy_ranks.{e:g}")
                sv = c.numbers(M, "singular_values", f"{p}.singular_values")
                if len(sv) > size:
                    c.fail(f"{p}.singular_values", f"has {len(sv)} values for a mode of size {size}")
                if any(b > a * (1 + 1e-9) + 1e-300 for a, b in zip(sv, sv[1:])) or any(s < 0 for s in sv):
                    c.fail(f"{p}.singular_values", "must be non-negative and descending")
            cos = c.get(t, "head_cosine", f"{at}.{key}.head_cosine")
            H = shape[0]
            if not isinstance(cos, list) or len(cos) != H:
                c.fail(f"{at}.{key}.head_cosine", f"must be a {H} x {H} matrix (heads of {at}.{key}.shape)")
            for r, row in enumerate(cos):
                c.numbers({"row": row}, "row", f"{at}.{key}.head_cosine[{r}]", H)
        c.int(c.get(layer, "params", f"{at}.params"), "original", f"{at}.params.original")
    _check_tradeoff(c, summary)
    return doc


def _check_tradeoff(c: _Checker, summary: dict) -> None:
    """summary.tradeoff (optional): exact residual tables whose shape matches their grid."""
    trade = summary.get("tradeoff") or {}
    for key in TENSORS:
        rec = trade.get(key)
        if rec is None:
            continue
        p = f"summary.tradeoff.{key}"
        table = rec.get("hosvd") if isinstance(rec, dict) else c.fail(p, "must be an object")
        if table is not None:
            grid = c.get(table, "grid", f"{p}.hosvd.grid")
            if not isinstance(grid, list) or len(grid) != 3 or not all(
                    isinstance(g, list) and g and all(isinstance(x, int) and x >= 1 for x in g) for g in grid):
                c.fail(f"{p}.hosvd.grid", "must be three non-empty lists of positive ranks")
            c.num(table, "norm_sq", f"{p}.hosvd.norm_sq")
            res = c.get(table, "residual_sq", f"{p}.hosvd.residual_sq")
            try:
                arr = np.asarray(res, dtype=np.float64)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.shape != tuple(len(g) for g in grid) or not np.isfinite(arr).all():
                c.fail(f"{p}.hosvd.residual_sq", f"must be a finite {' x '.join(str(len(g)) for g in grid)} array")
        gqa = c.get(rec, "gqa", f"{p}.gqa")
        if not isinstance(gqa, list):
            c.fail(f"{p}.gqa", "must be a list")
        for i, g in enumerate(gqa):
            c.int(g, "groups", f"{p}.gqa[{i}].groups", 1)
            c.num(g, "error_contiguous", f"{p}.gqa[{i}].error_contiguous")
            c.num(g, "error_best", f"{p}.gqa[{i}].error_best")


def load_analyses(path) -> list[dict]:
    """Read an analysis JSON: one document, or several (``tuckerctl.analyses/1``, written
    by ``analyze A B C --json``), each validated."""
    doc = _read_json(Path(path))
    if isinstance(doc, dict) and doc.get("schema") == SET_SCHEMA:
        models = doc.get("models")
        if not isinstance(models, list) or not models:
            raise InputError(f"{path}: field 'models' must be a non-empty list of analyses")
        return [validate_analysis(m, f"{path}: models[{i}]") for i, m in enumerate(models)]
    return [validate_analysis(doc, str(path))]


def load_analysis(path) -> dict:
    """Read and validate an analysis JSON file (schema ``tuckerctl.analysis/2``)."""
    return validate_analysis(_read_json(Path(path)), str(path))


def _read_json(path: Path):
    return read_json(path, "analysis JSON", constants=True)  # validate_analysis names a NaN's field


# ----------------------------------------------------------------------------- report

_STEP = re.compile(r"(?i)(?:^|[^a-z])(?:global[-_]?step|step|checkpoint|ckpt|iter(?:ation)?|it)[-_=]?"
                   r"(\d+(?:\.\d+)?)([km]?)(?![\d.])")
_NUMBER = re.compile(r"(?i)^(\d+(?:\.\d+)?)([km]?)$")


def training_step(label: str) -> float | None:
    """The training step in a label or folder name: ``step-1000``, ``checkpoint-2000``,
    ``global_step3k``, ``iter_500``, or a bare number (``1000``, ``2k``); else None."""
    m = _STEP.search(label) or _NUMBER.match(label.strip())
    if not m:
        return None
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]


def series_axis(analyses: Sequence[dict], labels: Sequence[str]) -> tuple[list[float], str, list[str] | None, bool]:
    """x values for the evolution figure: (xs, axis label, tick labels or None, log x).

    Training steps when every label holds a distinct one; else the model size (the
    attention parameters of the whole model) when those differ; else the order given."""
    steps = [training_step(label) for label in labels]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        return steps, "training step", None, False
    sizes = [attention_params(a) for a in analyses]
    if len(set(sizes)) == len(sizes):
        return sizes, "attention parameters of the whole model (log scale)", list(labels), True
    return list(range(len(labels))), "analysis", list(labels), False


def attention_params(a: dict) -> float:
    """Attention parameters of the whole model, scaled up from the analysed layers."""
    per_layer = [layer["params"]["original"] for layer in a["layers"]]
    return sum(per_layer) / len(per_layer) * a["model"]["layers"]


def default_labels(analyses: Sequence[dict]) -> list[str]:
    """One label per analysis: the source's folder or file name (where a training step
    usually is), the revision of a Hub model, else the model's name."""
    from .plotting import source_label

    out = []
    for a in analyses:
        src = a.get("source", {})
        label = source_label(src.get("path", "")) or src.get("name") or "model"
        if src.get("revision"):
            label += f"@{src['revision']}"
        out.append(label)
    return out


def build_report(analysis, out_dir: Path, formats: Sequence[str] = ("png",),
                 compare: dict | None = None, labels: Sequence[str] | None = None, style: str = "screen",
                 panels: bool = False, overwrite: bool = False, inputs=()) -> list[Path]:
    """Write figures, ``summary.md``, ``index.html`` (and ``ranks.csv``) into ``out_dir``.

    ``analysis``: one analysis document or a list of them. ``compare``: another one,
    appended to the list. ``formats``: any of "png", "svg", "pdf" (PNG at 150 dpi) and
    "csv" (every per-layer, per-mode number in one long table). With two to four
    analyses, figures 1, 2 and 4 draw them over each other (solid, dashed, dotted,
    dash-dotted); with more, the first and the last. With three or more, figure 5
    draws the ranks against the training step (read from ``labels``, by default the
    folder names), or the model size. ``style``: "screen" (default), "paper" (7 in,
    double column), "paper-single" (panels 3.5 in wide) or "slides" (13.33 in, large
    fonts). ``panels``: also one file per panel (``<figure>-p<k>.<fmt>``, row by row).
    The directory is built beside ``out_dir`` and renamed into place
    (:mod:`tuckerctl.outputs`): an existing report is replaced only with ``overwrite``,
    and never one of ``inputs``. Returns the written files."""
    from . import plotting  # matplotlib is imported only when a report is built

    if style not in plotting.STYLES:
        raise InputError(f"{arg('style')}: {style!r} is not one of {', '.join(plotting.STYLES)}")

    analyses = list(analysis) if isinstance(analysis, (list, tuple)) else [analysis]
    if compare is not None:
        analyses.append(compare)
    formats = tuple(dict.fromkeys(str(f).lower().lstrip(".") for f in formats))
    bad = [f for f in formats if f not in FORMATS + ("csv",)]
    if bad or not formats:
        raise InputError(f"{arg('formats')}: {', '.join(bad) or 'nothing'} is not one of "
                         f"{', '.join(FORMATS + ('csv',))}")
    figure_formats = tuple(f for f in formats if f != "csv")
    if not analyses:
        raise InputError("report: no analysis given")
    for i, a in enumerate(analyses):
        validate_analysis(a, "analysis" if i == 0 else ("compare" if len(analyses) == 2 else f"analysis {i + 1}"))
    labels = list(labels) if labels else default_labels(analyses)
    if len(labels) != len(analyses):
        raise InputError(f"{arg('labels')}: {len(labels)} labels for {len(analyses)} analyses (give one per analysis)")
    final = Path(out_dir)
    target = claim(final, "report", inputs=inputs, overwrite=overwrite)
    with target.staging() as tmp:
        written = _write_report(analyses, labels, tmp, formats, figure_formats, plotting, style, panels)
    return [final / p.name for p in written]


def _write_report(analyses, labels, out_dir: Path, formats, figure_formats, plotting, style: str = "screen",
                  panels: bool = False) -> list[Path]:
    """Write the report's files into ``out_dir`` (the staging directory); returns them."""
    shown = analyses if len(analyses) <= plotting.MAX_OVERLAY else [analyses[0], analyses[-1]]
    builders = {"fig1-spectra": lambda: plotting.fig_spectra(shown),
                "fig2-ranks": lambda: plotting.fig_ranks(shown),
                "fig3-heads": lambda: plotting.fig_heads(shown[0]),
                "fig4-tradeoff": lambda: plotting.fig_tradeoff(shown)}
    if len(shown) == 2:
        builders["fig3-heads-compare"] = lambda: plotting.fig_heads(shown[1])
    if len(analyses) >= 3:
        xs, xlabel, ticks, log_x = series_axis(analyses, labels)
        builders["fig5-evolution"] = lambda: plotting.fig_evolution(analyses, xs, xlabel, ticks, log_x)

    written: list[Path] = []
    for stem, build in (builders.items() if figure_formats else ()):
        with plotting.using_style(style) as preset:
            fig = build()
        for fmt in figure_formats:
            target = out_dir / f"{stem}.{fmt}"
            meta = {"png": {"Software": f"tuckerctl {__version__}"}, "svg": {"Date": None},
                    "pdf": {"Creator": f"tuckerctl {__version__}"}}[fmt]
            atomic_write(target, lambda tmp, fig=fig, fmt=fmt, meta=meta: _save(fig, tmp, fmt, meta, preset.dpi))
            written.append(target)
            fig.set_layout_engine("none")  # laid out once; further formats reuse the positions
            if panels:
                for k, box in enumerate(_panel_boxes(fig), 1):
                    target = out_dir / f"{stem}-p{k}.{fmt}"
                    atomic_write(target, lambda tmp, fig=fig, fmt=fmt, meta=meta, box=box:
                                 _save(fig, tmp, fmt, meta, preset.dpi, box))
                    written.append(target)
    if "csv" in formats:
        target = out_dir / "ranks.csv"
        _write_text(target, ranks_csv(analyses, labels))
        written.append(target)
    stems = list(builders) if figure_formats else []
    pair = shown
    tradeoffs = [{key: pareto.tradeoff(a, key) for key in TENSORS} for a in pair]
    names = plotting._names(pair)
    md = out_dir / "summary.md"
    _write_text(md, _markdown(pair, names, tradeoffs, stems, figure_formats))
    page = out_dir / "index.html"
    _write_text(page, _html(pair, names, tradeoffs, stems, figure_formats))
    return written + [md, page]


def _panel_boxes(fig) -> list:
    """The region (inches) of each panel with its labels, row by row: one file per panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]
    return [ax.get_tightbbox(renderer).transformed(fig.dpi_scale_trans.inverted()).padded(0.06) for ax in axes]


CSV_COLUMNS = ("model", "label", "step", "layer", "tensor", "mode", "size", "ceiling", "numerical_rank")


def ranks_csv(analyses: Sequence[dict], labels: Sequence[str]) -> str:
    """Every per-layer, per-mode number as one long CSV table (one row per model, layer,
    tensor and mode): ranks, ceiling, entropy and stable rank, sigma_1 and the layer's
    parameter counts. Loads with ``pandas.read_csv`` as it is."""
    import csv
    import io

    energies = list(dict.fromkeys(f"{e:g}" for a in analyses for e in a["settings"]["energy"]))
    header = list(CSV_COLUMNS) + [f"energy_rank_{e}" for e in energies] + \
        ["entropy_rank", "stable_rank", "sigma_1", "params_original", "params_tucker_0.99"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for a, label in zip(analyses, labels):
        name = a.get("source", {}).get("name") or label
        step = training_step(label)
        for layer in a["layers"]:
            p = layer["params"]
            for key in TENSORS:
                for mode in MODE_NAMES[key]:
                    M = layer[key]["modes"][mode]
                    sv = M["singular_values"]
                    w.writerow([name, label, "" if step is None else f"{step:g}", layer["index"], key, mode,
                                M["size"], M["ceiling"], M["numerical_rank"]]
                               + [M["energy_ranks"].get(e, "") for e in energies]
                               + [_num(M.get("entropy_rank")), _num(M.get("stable_rank")), _num(sv[0] if sv else 0.0),
                                  p["original"], p.get("tucker_0.99", "")])
    return buf.getvalue()


def _num(v) -> str:
    return "" if v is None else f"{float(v):.9g}"


def _readable(tmp: Path) -> None:
    os.chmod(tmp, file_mode())  # the umask's permissions (temp files are created 0600)


def _save(fig, tmp: Path, fmt: str, meta: dict, dpi: int, box=None) -> None:
    fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta, bbox_inches=box)
    _readable(tmp)


def _write_text(path: Path, text: str) -> None:
    def write(tmp: Path):
        tmp.write_text(text, encoding="utf-8")
        _readable(tmp)

    atomic_write(path, write)


# ----------------------------------------------------------------------------- content

_MODEL_FIELDS = ("family", "attention", "layers", "d", "heads", "kv_heads", "head_dim", "value_dim", "bias",
                 "rope", "qk_norm", "scale")
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def _model_rows(a: dict) -> list[tuple[str, str]]:
    m = a["model"]
    rows = [(k, _fmt(m[k])) for k in _MODEL_FIELDS if k in m]
    rows += [(k, _fmt(m[k])) for k in _MLA_FIELDS if m.get(k) is not None]
    src = a.get("source", {})
    rows.append(("source", f"{src.get('path', '?')} ({src.get('format', '?')})"))
    s = a["settings"]
    rows.append(("analysed layers", _layer_span([layer["index"] for layer in a["layers"]])))
    rows.append(("energy levels τ", ", ".join(f"{e:g}" for e in s["energy"])))
    noise = s.get("noise_model") or {}
    rows.append(("numerical-rank tolerance", f"{s['tol']:g} · σ_1" if s.get("tol") is not None else
                 f"storage noise of {noise.get('dtype', '?')} weights "
                 f"(relative rms {noise.get('relative_rms', 0):.2g}), per mode"))
    rows.append(("tool version", str(a.get("tool_version", "?"))))
    return rows


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _layer_span(idx: list[int]) -> str:
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}–{idx[-1]} ({len(idx)})" if len(idx) > 1 else str(idx[0])
    return ", ".join(map(str, idx))


def _rank_table(a: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-layer table: energy ranks (all levels) and numerical
    rank / ceiling per mode, then parameters."""
    energies = [f"{e:g}" for e in a["settings"]["energy"]]
    header = ["layer"] + [f"{key} {m}" for key in TENSORS for m in MODE_NAMES[key]] + \
             ["params original", "params Tucker@0.99", "KV cache Tucker@0.99"]
    rows = []
    for layer in a["layers"]:
        cells = [str(layer["index"])]
        for _, _, M in layer_modes(layer):
            er = "/".join(str(M["energy_ranks"][e]) for e in energies)
            cells.append(f"{er} · {M['numerical_rank']}/{M['ceiling']}")
        p = layer["params"]
        cells.append(f"{p['original']:,}")
        cells.append(f"{p['tucker_0.99']:,}" if "tucker_0.99" in p else "–")
        cells.append(str(p["kv_cache_tucker"]) if "kv_cache_tucker" in p else "–")
        rows.append(cells)
    return header, rows


def _rank_sort_keys(a: dict) -> list[list]:
    """Sort keys of the per-layer table: the 0.99-energy rank (else the middle level) of
    each mode cell, plain numbers elsewhere."""
    energies = [f"{e:g}" for e in a["settings"]["energy"]]
    level = "0.99" if "0.99" in energies else energies[len(energies) // 2]
    out = []
    for layer in a["layers"]:
        p = layer["params"]
        out.append([layer["index"]] + [layer[key]["modes"][m]["energy_ranks"][level]
                                       for key in TENSORS for m in MODE_NAMES[key]]
                   + [p["original"], p.get("tucker_0.99"), p.get("kv_cache_tucker")])
    return out


def _tradeoff_rows(a: dict, t: dict) -> tuple[list[str], list[list[str]]]:
    """Headline numbers of figure 4 per tensor."""
    header = ["tensor", "model's own params", "best Tucker error at ≤ own params",
              "best MLA-shaped error at ≤ own params", "Tucker params for error ≤ 0.1",
              "Tucker params for error ≤ 0.01"]
    rows = []
    for key in TENSORS:
        x = t[key]
        own = x.model.params
        rows.append([key, f"{own:,.0f}", _err(pareto.best_error(x.tucker, own)), _err(pareto.best_error(x.mla, own)),
                     _count(pareto.params_for(x.tucker, 0.1), own), _count(pareto.params_for(x.tucker, 0.01), own)])
    return header, rows


def _kind(t: dict) -> str:
    return "exact errors" if all(x.exact for x in t.values()) else "Tucker/MLA: HOSVD tail bounds"


def _err(e: float) -> str:
    return "–" if math.isnan(e) else ("0 (exact)" if e == 0 else f"{e:.3g}")


def _count(p: float, own: float) -> str:
    return "–" if math.isnan(p) else f"{p:,.0f} ({p / own:.2f}×)"


def _figure_file(stem: str, formats: Sequence[str]) -> str:
    for fmt in ("png", "svg", "pdf"):
        if fmt in formats:
            return f"{stem}.{fmt}"
    return f"{stem}.png"


def _figure_list(stems: list[str], names: list[str]) -> list[tuple[str, str, str]]:
    """(stem, title, caption) per figure, in order."""
    out = []
    for stem in stems:
        base = "fig3-heads" if stem.startswith("fig3-heads") else stem
        title, caption = FIGURES[base]
        if base == "fig3-heads" and len(names) > 1:
            title += f" — {names[1] if stem.endswith('compare') else names[0]}"
        elif len(names) > 1 and base != "fig5-evolution":
            caption += " " + "; ".join(f"{style}: {n} (model {tag})" for style, n, tag in
                                       zip(("Solid", "dashed", "dotted", "dash-dotted"), names, "ABCD")) + "."
        out.append((stem, title, caption))
    return out


def _md(s) -> str:
    """Text from the analysis (paths, names, notes) as literal Markdown: what could make a
    link, image, table cell or HTML tag is escaped, control characters are shown, and it
    stays on one line."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))
    text = re.sub(r"([\\\[\]|])", r"\\\1", text)
    return text.replace("<", "&lt;")


def _md_cell(s: str) -> str:
    return _md(s)


def _md_table(header, rows) -> list[str]:
    out = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return out


def _markdown(pair, names, tradeoffs, stems, formats) -> str:
    title = " vs ".join(names)
    lines = [f"# tuckerctl report: {_md(title)}", "",
             f"Written by tuckerctl {__version__} from analysis schema `{SCHEMA}`. "
             "Rank cells read `r(τ1)/r(τ2)/r(τ3) · numerical rank/ceiling`.", ""]
    for i, (a, name, t) in enumerate(zip(pair, names, tradeoffs)):
        tag = "" if len(pair) == 1 else f" {'ABCD'[i]}"
        lines += [f"## Model{tag}: {_md(name)}", ""]
        lines += _md_table(["field", "value"], _model_rows(a)) + [""]
        for note in a["model"].get("notes", []):
            lines.append(f"> note: {_md(note)}")
        lines += ["", "### Verdicts", ""] + [f"- {_md(v)}" for v in a["summary"]["verdicts"]] + [""]
        lines += ["### Per-layer ranks", ""] + _md_table(*_rank_table(a)) + [""]
        lines += ["### Error against parameters (" + _kind(t) + ")", ""] + _md_table(*_tradeoff_rows(a, t)) + [""]
    lines += ["## Figures", ""]
    for n, (stem, head, caption) in enumerate(_figure_list(stems, names), 1):
        lines += [f"### {n}. {head}", "", f"![{head}]({_figure_file(stem, formats)})", "", caption, ""]
        others = [f"[{f}]({stem}.{f})" for f in formats if f"{stem}.{f}" != _figure_file(stem, formats)]
        if others:
            lines += ["Also as " + ", ".join(others) + ".", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
p.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
table.kv td { text-align: left; }
.scroll { overflow-x: auto; }
ul.verdicts li { margin: 0.15em 0; }
.note { color: #8a5300; }
figure { margin: 1.6em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; max-width: 60em; }
figcaption b { color: #222; }
"""


def _html_table(header, rows, cls: str = "", sort_keys=None) -> str:
    """A table; ``sort_keys`` (rows of numbers, optional) become the cells' data-sort."""
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    keys = sort_keys or [[None] * len(r) for r in rows]

    def td(c, k) -> str:
        return f"<td>{e(str(c))}</td>" if k is None else f"<td data-sort=\"{k}\">{e(str(c))}</td>"

    body = "".join("<tr>" + "".join(td(c, k) for c, k in zip(r, ks)) + "</tr>" for r, ks in zip(rows, keys))
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html(pair, names, tradeoffs, stems, formats) -> str:
    e = html.escape
    title = " vs ".join(names)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>tuckerctl report: {e(title)}</title><style>{_CSS}{interactive.CSS}</style></head><body>",
             f"<h1>tuckerctl report: {e(title)}</h1>",
             f"<p class=\"meta\">Written by tuckerctl {e(__version__)} from analysis schema <code>{SCHEMA}</code>. "
             "Rank cells read <code>r(τ1)/r(τ2)/r(τ3) · numerical rank/ceiling</code>.</p>"]
    for i, (a, name, t) in enumerate(zip(pair, names, tradeoffs)):
        tag = "" if len(pair) == 1 else f" {'ABCD'[i]}"
        parts.append(f"<h2>Model{tag}: {e(name)}</h2>")
        parts.append(_html_table(["field", "value"], _model_rows(a), "kv"))
        parts += [f"<p class=\"note\">note: {e(n)}</p>" for n in a["model"].get("notes", [])]
        parts.append("<h3>Verdicts</h3><ul class=\"verdicts\">"
                     + "".join(f"<li>{e(v)}</li>" for v in a["summary"]["verdicts"]) + "</ul>")
        parts.append("<h3>Per-layer ranks</h3><p class=\"meta\">Click a column header to sort (rank columns sort "
                     "by the 0.99-energy rank).</p>" + _html_table(*_rank_table(a), "sortable", _rank_sort_keys(a)))
        parts.append("<h3>Error against parameters (" + e(_kind(t)) + ")</h3>" + _html_table(*_tradeoff_rows(a, t)))
    parts.append("<h2>Ranks by layer (interactive)</h2><p class=\"meta\">Energy rank per layer (line, dots) and "
                 "numerical rank (crosses) of the chosen mode against its ceiling (dashed); hover or focus a point for "
                 "its values.</p><div id=\"chart\"><noscript>(needs JavaScript; the figures below show the same "
                 "numbers)</noscript></div>")
    parts.append(interactive.data_script(interactive.chart_data(list(pair), list(names))))
    parts.append("<h2>Figures</h2>")
    for n, (stem, head, caption) in enumerate(_figure_list(stems, names), 1):
        src = _figure_file(stem, formats)
        if src.endswith(".pdf"):
            img = f"<p><a href=\"{e(src)}\">{e(src)}</a> (PDF)</p>"
        else:
            img = f"<img src=\"{e(src)}\" alt=\"{e(head)}\">"
        others = [f"<a href=\"{e(stem)}.{f}\">{f.upper()}</a>" for f in formats if f"{stem}.{f}" != src]
        more = (" Also as " + ", ".join(others) + ".") if others else ""
        parts.append(f"<figure id=\"{e(stem)}\">{img}<figcaption><b>Figure {n}. {e(head)}.</b> "
                     f"{e(caption)}{more}</figcaption></figure>")
    parts.append(f"<script>{interactive.SCRIPT}</script>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
