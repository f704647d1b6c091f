"""Figures of an analysis document (matplotlib, Agg backend; no file I/O here).

Each ``fig_*`` function takes one analysis, or two for the compare mode (the first drawn
solid, the second dashed), and returns a :class:`matplotlib.figure.Figure` of a fixed
size (:func:`figure_size`) so that the saved PNGs have predictable pixel sizes.

Colours are fixed across figures: one per format family (:data:`FAMILY_COLORS`) and one
per mode position (:data:`MODE_COLORS`: head, query/output, key/value).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # never open a window, never need a display
import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import cm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from . import pareto  # noqa: E402
from .schema import MODE_NAMES, TENSORS  # noqa: E402

DPI = 150
MAX_HEAD_LAYERS = 6
MAX_SPECTRUM_LINES = 12  # more layers: median and band instead of one line each
# Colour-blind safe (Paul Tol's "vibrant" set); one colour per family and per mode.
FAMILY_COLORS = {"Tucker": "#000000", "GQA": "#0077BB", "MLA": "#CC3311", "MHA": "#777777",
                 "model": "#EE3377"}
MODE_COLORS = {"head": "#AA3377", "query": "#EE7733", "output": "#EE7733", "key": "#009988", "value": "#009988"}
MODEL_STYLES = ("-", "--", ":", "-.")  # analyses A, B, C, D drawn over each other
GQA_MARKERS = ("D", "d", "o", "s")
TAGS = "ABCD"
MAX_OVERLAY = len(TAGS)
TENSOR_TITLES = {"pre": "pre-softmax W (query–key)", "post": "post-softmax W̃ (value–output)"}
ENERGY_MARKERS = ("v", "o", "^", "s", "D")
FIG_SIZES = {"spectra": (13.0, 7.6), "ranks": (15.0, 8.4), "tradeoff": (13.0, 6.2)}

_FONTS = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8.5,
          "xtick.labelsize": 8, "ytick.labelsize": 8}
_RC_REST = {"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
            "grid.linewidth": 0.6, "svg.fonttype": "none"}
_RC = {**_FONTS, **_RC_REST}


@dataclass(frozen=True)
class Style:
    """Figure size preset: ``width`` in inches (None: the screen sizes), font scale, PNG dpi."""

    name: str
    width: float | None
    font: float
    dpi: int


# Fonts at print size: paper figures are drawn at the printed width, so 9 pt x 0.8 is
# 7.2 pt on the page (a journal's minimum is about 6 pt); slides are 16:9 at 13.33 in.
STYLES = {"screen": Style("screen", None, 1.0, 150),
          "paper": Style("paper", 7.0, 0.8, 300),            # double column (full text width)
          "paper-single": Style("paper-single", 10.5, 0.8, 300),  # one panel = 3.5 in: use with --panels
          "slides": Style("slides", 13.33, 1.5, 150)}
_style = STYLES["screen"]


@contextmanager
def using_style(name: str):
    """Draw the figures inside the block with the preset ``name`` (see :data:`STYLES`)."""
    global _style
    previous, _style = _style, STYLES[name]
    try:
        yield _style
    finally:
        _style = previous


def _rc() -> dict:
    return {**{k: v * _style.font for k, v in _FONTS.items()}, **_RC_REST}


def _fs(points: float) -> float:
    """A fixed label size in points, scaled by the style."""
    return points * _style.font


def figure_size(name: str, analysis: dict | None = None) -> tuple[float, float]:
    """Size in inches of figure ``name`` (the head figure's width grows with its columns),
    scaled to the style's width with the screen aspect ratio."""
    if name == "heads":
        k = len(head_layers(analysis))
        w, h = (1.4 + 2.35 * k, 7.4)
    else:
        w, h = FIG_SIZES[name]
    if _style.width is None:
        return (w, h)
    width = _style.width if name != "heads" else min(_style.width, w)
    # Smaller figures keep more height per width: the fonts do not shrink as fast as the panels.
    return (width, round(h / w * width * (1.25 if width < w else 1.0), 2))


def model_name(analysis: dict) -> str:
    """Short legend name: what people call the model (Hub id, ``_name_or_path``, GGUF
    ``general.name``, else the file or folder name) and its architecture."""
    src = analysis.get("source", {})
    base = src.get("name") or source_label(src.get("path", "")) or "model"
    m = analysis["model"]
    return f"{base} ({m['family']}, {_arch(m)})"


def source_label(path: str) -> str:
    """The file or folder name of a source path (a cache snapshot: the repo id)."""
    path = str(path).rstrip("/\\")
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    base = os.path.basename(path)
    return Path(base).stem if base.endswith((".safetensors", ".gguf")) else base


def _arch(model: dict) -> str:
    if model["attention"] in ("GQA", "MQA"):
        return f"{model['attention']} G={model['kv_heads']}"
    if model["attention"] == "MLA":
        return f"MLA d_c={model.get('kv_lora_rank')}"
    return model["attention"]


def _names(analyses: list[dict]) -> list[str]:
    names = [model_name(a) for a in analyses]
    if len(set(names)) < len(names):
        names = [f"{n} [{tag}]" for n, tag in zip(names, TAGS)]
    return names


def _figure(size) -> Figure:
    # A plain Figure (no pyplot state): figures are never shown and never leak.
    return Figure(figsize=size, dpi=_style.dpi, layout="constrained")


def _shade(color: str, amount: float) -> tuple:
    """Lighter (amount < 0, towards white) or darker (amount > 0, towards black) colour."""
    rgb = np.array(mcolors.to_rgb(color))
    return tuple(rgb * (1 - amount) if amount > 0 else rgb + (1 - rgb) * (-amount))


def _energy_styles(energies: list[str]) -> list[tuple]:
    """(shade amount, marker) per energy level, lightest for the lowest level."""
    n = len(energies)
    amounts = np.linspace(-0.5, 0.35, n) if n > 1 else [0.0]
    return [(float(a), ENERGY_MARKERS[i % len(ENERGY_MARKERS)]) for i, a in enumerate(amounts)]


def _model_legend(fig: Figure, names: list[str], extra: list | None = None, ncol: int | None = None,
                  markers: bool = False):
    """Legend below the panels: ``extra`` handles, then one line style per model (compare)."""
    handles = list(extra or [])
    if len(names) > 1:
        handles += [Line2D([], [], color="#333333", ls=ls, lw=1.6, label=n, marker=mk if markers else None,
                           ms=5, mfc="white")
                    for n, ls, mk in zip(names, MODEL_STYLES, GQA_MARKERS)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=_legend_columns(ncol or min(len(handles), 4)),
                   frameon=False)


def _legend_columns(n: int) -> int:
    """At most three legend columns on a page-wide (paper) figure, so the legend fits."""
    return min(n, 3) if _style.width is not None and _style.width < 10 else n


# ----------------------------------------------------------------------------- figure 1

def fig_spectra(analyses: list[dict]) -> Figure:
    """Normalised mode spectra sigma_i / sigma_1 (log y), one line per layer coloured by depth."""
    with matplotlib.rc_context(_rc()):
        fig = _figure(figure_size("spectra"))
        axes = fig.subplots(2, 3)
        names = _names(analyses)
        cmap = matplotlib.colormaps["viridis"]
        single = len(analyses) == 1
        idx = [layer["index"] for layer in analyses[0]["layers"]]
        norm = mcolors.Normalize(min(idx), max(max(idx), min(idx) + 1)) if single else mcolors.Normalize(0, 1)
        for row, key in enumerate(TENSORS):
            for col, mode in enumerate(MODE_NAMES[key]):
                ax = axes[row, col]
                size, sizes = 0, []
                for ai, (a, ls) in enumerate(zip(analyses, MODEL_STYLES)):
                    layers = a["layers"]
                    n = len(layers)
                    if n > MAX_SPECTRUM_LINES:
                        _spectrum_band(ax, layers, key, mode, ls, MODE_COLORS[mode] if single else
                                       _shade("#333333", -0.25 * ai))
                    for k, layer in enumerate(layers if n <= MAX_SPECTRUM_LINES else ()):
                        s = np.asarray(layer[key]["modes"][mode]["singular_values"], dtype=float)
                        if not len(s) or s[0] <= 0:
                            continue
                        y = s / s[0]
                        x = np.arange(1, len(s) + 1)
                        ok = y > 0  # exact zeros cannot be drawn on a log axis
                        depth = layer["index"] if single else (k / (n - 1) if n > 1 else 0.0)
                        ax.plot(x[ok], y[ok], color=cmap(norm(depth)), ls=ls, lw=1.1, alpha=0.85,
                                marker="." if len(s) <= 12 else None, ms=4)
                    M = layers[0][key]["modes"][mode]
                    size = max(size, M["size"])
                    ceil = max(layer[key]["modes"][mode]["ceiling"] for layer in layers)
                    _mark_ceiling(ax, ceil, M["size"], ls, None if single else TAGS[ai])
                    sizes.append(M["size"])
                _log_decades(ax)
                _clip_at_roundoff(ax, _panel_tol(analyses, key, mode))
                ax.set_xlim(0, size + max(1, size * 0.02))
                ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
                ax.set_title(f"{TENSOR_TITLES[key].split(' (')[0]} · {mode} mode (size {_sizes(sizes)})")
                if row == 1:
                    ax.set_xlabel("singular value index i")
                if col == 0:
                    ax.set_ylabel("σ_i / σ_1 (log scale)")
        banded = all(len(a["layers"]) > MAX_SPECTRUM_LINES for a in analyses)
        if not banded:
            sm = cm.ScalarMappable(norm=norm, cmap=cmap)
            bar = fig.colorbar(sm, ax=axes, shrink=0.85, pad=0.01, aspect=35)
            bar.set_label("layer" if single else "relative depth (layer / last layer)")
            if single:
                bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle("Mode spectra of the attention tensors" + (f" — {names[0]}" if single else ""),
                     fontsize=_fs(11))
        extra = [Line2D([], [], color="#555555", ls=":", lw=1.2, label="rank ceiling of the architecture")]
        if any(len(a["layers"]) > MAX_SPECTRUM_LINES for a in analyses):
            extra.append(Line2D([], [], color="#777777", lw=6, alpha=0.35,
                                label="median over layers, band: 10–90% of layers"))
        _model_legend(fig, names, extra)
        return fig


def _spectrum_band(ax, layers: list[dict], key: str, mode: str, ls: str, color) -> None:
    """Many layers: the median spectrum over layers and the 10-90% band, not one line each."""
    spectra = [np.asarray(layer[key]["modes"][mode]["singular_values"], dtype=float) for layer in layers]
    spectra = [s / s[0] for s in spectra if len(s) and s[0] > 0]
    if not spectra:
        return
    width = max(len(s) for s in spectra)
    y = np.full((len(spectra), width), np.nan)
    for i, s in enumerate(spectra):
        y[i, :len(s)] = np.where(s > 0, s, np.nan)  # exact zeros cannot be drawn on a log axis
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns beyond a ceiling
            lo, mid, hi = np.nanpercentile(y, [10, 50, 90], axis=0)
    x = np.arange(1, width + 1)
    ax.fill_between(x, lo, hi, color=color, alpha=0.22, lw=0)
    ax.plot(x, mid, color=color, ls=ls, lw=1.5)


def _panel_tol(analyses: list[dict], key: str, mode: str) -> float | None:
    """The smallest numerical-rank tolerance (relative to sigma_1) used in a panel: the
    mode's own storage-noise tolerance, else the analysis-wide --tol."""
    tols = [layer[key]["modes"][mode].get("tol") or a["settings"].get("tol")
            for a in analyses for layer in a["layers"]]
    tols = [t for t in tols if isinstance(t, (int, float)) and t > 0]
    return min(tols) if tols else None


def _clip_at_roundoff(ax, tol: float | None) -> None:
    """Start the log axis a decade below the numerical-rank tolerance: what lies lower is
    round-off of the stored weights (or exact zeros), not structure. The tolerance is drawn.
    Without one, float64 round-off (1e-13) is the floor."""
    if tol is None:
        ax.set_ylim(max(ax.get_ylim()[0], 1e-13), ax.get_ylim()[1])
        return
    floor = tol / 10
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, floor), hi)
    if tol < max(lo, floor):
        return  # the whole spectrum lies above the tolerance: nothing to mark
    ax.axhline(tol, color="#999999", ls=(0, (1, 2)), lw=0.9, zorder=0)
    ax.text(0.99, tol, f"tol {tol:g}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
            fontsize=_fs(6.5), color="#777777")


def _sizes(sizes: list[int]) -> str:
    """"64" or, for two models of different sizes, "64 / 32"."""
    return " / ".join(str(v) for v in dict.fromkeys(sizes))


def _log_decades(ax, min_decades: float = 1.0):
    """Log y axis spanning at least ``min_decades`` below 1, labelled at decades only
    (a narrow log range otherwise gets unreadable "9x10^-1" tick labels)."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, 10 ** -min_decades), max(hi, 1.3))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))


def _mark_ceiling(ax, ceil: int, size: int, ls: str, tag: str | None):
    """Vertical line at the rank ceiling, shading where the spectrum is structurally zero.
    ``tag``: None for a single model, "A"/"B" in the compare mode (labels stacked)."""
    ax.axvline(ceil, color="#555555", ls=":" if ls == "-" else (0, (4, 3)), lw=1.2, zorder=0)
    y = 0.97 - 0.17 * (TAGS.index(tag) if tag else 0)
    prefix = "" if tag is None else f"{tag}: "
    box = dict(boxstyle="square,pad=0.15", fc="white", ec="none", alpha=0.8)
    if ceil < size:
        ax.axvspan(ceil, size, color="#999999", alpha=0.07, lw=0, zorder=0)
        ax.text(ceil + 0.015 * size, y, f"{prefix}ceiling {ceil}\nσ = 0 beyond", transform=ax.get_xaxis_transform(),
                va="top", ha="left", fontsize=_fs(7.5), color="#444444", bbox=box)
    else:
        ax.text(ceil - 0.015 * size, y, f"{prefix}ceiling = size {ceil}", transform=ax.get_xaxis_transform(),
                va="top", ha="right", fontsize=_fs(7.5), color="#444444", bbox=box)


# ----------------------------------------------------------------------------- figure 2

def ceiling_lines(model: dict, key: str, mode: str, size: int, own_only: bool = False) -> list[tuple]:
    """Horizontal reference lines for figure 2: (value, label, colour, is the model's own)."""
    d, H, G = int(model["d"]), int(model["heads"]), int(model["kv_heads"])
    width = int(model["head_dim"]) if key == "pre" else int(model.get("value_dim") or model["head_dim"])
    att = model["attention"]
    full = min(size, min(d, H * width) + (size - d))  # + the bias row in homogeneous coordinates
    out: list[tuple] = []
    if mode == "head":
        return [(H, "H (every family)", FAMILY_COLORS["MHA"], True)]
    if mode in ("query", "output"):
        out.append((full, "MHA / GQA / MQA", FAMILY_COLORS["MHA"], att != "MLA" or mode == "output"))
        if att == "MLA" and mode == "query" and model.get("q_lora_rank"):
            out.append((min(size, int(model["q_lora_rank"])), "MLA q_lora (this model)", FAMILY_COLORS["MLA"], True))
    else:
        out.append((full, "MHA", FAMILY_COLORS["MHA"], att == "MHA"))
        for g in pareto.gqa_groups(H, G if att != "MLA" else None):
            if g == H and att == "MHA":
                continue
            own = att in ("GQA", "MQA") and g == G
            name = "MQA" if g == 1 else f"GQA G={g}"
            out.append((min(size, g * width), name + (" (this model)" if own else ""), FAMILY_COLORS["GQA"], own))
        if att == "MLA":
            c = int(model["kv_lora_rank"]) + (int(model.get("qk_rope_head_dim") or 0) if mode == "key" else 0)
            lab = "MLA d_c + d_r" if mode == "key" else "MLA d_c"
            out.append((min(size, c), lab + " (this model)", FAMILY_COLORS["MLA"], True))
        else:
            out.append((min(size, 2 * G * width), "MLA, equal KV cache", FAMILY_COLORS["MLA"], False))
    if own_only:
        out = [o for o in out if o[3]]
    # One line per value: merge the labels of coinciding ceilings.
    merged: dict[int, list] = {}
    for v, lab, c, own in out:
        if v in merged:
            merged[v][1] += ", " + lab
            if own and not merged[v][3]:  # the model's own family decides the colour
                merged[v][2], merged[v][3] = c, True
        else:
            merged[v] = [v, lab, c, own]
    return [tuple(m) for m in sorted(merged.values())]


def _spread(ys: list[float], gap: float, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """Move sorted label positions apart by at least ``gap`` (axes fraction), inside [lo, hi]."""
    out = list(ys)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + gap)
    if out and out[-1] > hi:
        out[-1] = hi
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - gap)
    return [max(lo - 0.1, y) for y in out]


def fig_ranks(analyses: list[dict]) -> Figure:
    """Energy ranks per mode against layer index, with the family rank ceilings."""
    with matplotlib.rc_context(_rc()):
        fig = _figure(figure_size("ranks"))
        axes = fig.subplots(2, 3)
        names = _names(analyses)
        energies = [f"{t:g}" for t in analyses[0]["settings"]["energy"]]
        styles = _energy_styles(energies)
        for row, key in enumerate(TENSORS):
            for col, mode in enumerate(MODE_NAMES[key]):
                ax = axes[row, col]
                sizes = [a["layers"][0][key]["modes"][mode]["size"] for a in analyses]
                size = max(layer[key]["modes"][mode]["size"] for a in analyses for layer in a["layers"])
                color = MODE_COLORS[mode]
                for a, ls in zip(analyses, MODEL_STYLES):
                    x = [layer["index"] for layer in a["layers"]]
                    ms = [layer[key]["modes"][mode] for layer in a["layers"]]
                    size_m = 4.5 if len(x) <= 16 else 3.0  # many layers: smaller markers
                    for e, (amount, marker) in zip(energies, styles):
                        y = [m["energy_ranks"].get(e, np.nan) for m in ms]
                        ax.plot(x, y, color=_shade(color, amount), ls=ls, marker=marker, ms=size_m, lw=1.4)
                    ax.plot(x, [m["numerical_rank"] for m in ms], color="#222222", ls="none", marker="x",
                            ms=size_m + 0.5, mew=1.0, zorder=3)
                ax.set_ylim(0, size * 1.06)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
                ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
                _draw_ceilings(ax, analyses, key, mode, size)
                ax.set_title(f"{TENSOR_TITLES[key].split(' (')[0]} · {mode} mode (size {_sizes(sizes)})")
                if row == 1:
                    ax.set_xlabel("layer index")
                if col == 0:
                    ax.set_ylabel("rank (count of singular values)")
        handles = [Line2D([], [], color=_shade("#666666", a), marker=m, ms=5, lw=1.4, label=f"energy rank r({e})")
                   for e, (a, m) in zip(energies, styles)]
        handles.append(Line2D([], [], color="#222222", ls="none", marker="x", ms=6,
                              label="numerical rank (σ > " + (f"{analyses[0]['settings']['tol']:g}·σ_1"
                                                   if analyses[0]["settings"].get("tol") is not None
                                                   else "storage noise") + ")"))
        handles.append(Line2D([], [], color="#777777", ls="--", lw=1, label="rank ceiling of a family"))
        fig.suptitle("Effective ranks by layer against the MHA / GQA / MLA ceilings"
                     + (f" — {names[0]}" if len(names) == 1 else ""), fontsize=_fs(11))
        _model_legend(fig, names, handles, ncol=len(handles) + len(names) if len(names) > 1 else len(handles))
        return fig


def _draw_ceilings(ax, analyses: list[dict], key: str, mode: str, size: int):
    """Dashed horizontal ceilings with labels outside the right edge, spread apart."""
    ymax = ax.get_ylim()[1]
    lines = []
    for i, (a, ls) in enumerate(zip(analyses, MODEL_STYLES)):
        # Each model's ceilings from its own mode size (with two widths, the larger one
        # would move the smaller model's ceilings). Compare mode: only each model's own
        # ceilings (all alternatives twice would be clutter).
        own_size = a["layers"][0][key]["modes"][mode]["size"]
        for v, lab, c, own in ceiling_lines(a["model"], key, mode, own_size, own_only=len(analyses) > 1):
            if len(analyses) > 1:
                tag = "model " + TAGS[i]
                lab = lab.replace("this model", tag) if "this model" in lab else f"{lab} ({tag})"
            if any(abs(v - w) < 1e-9 and lab == m for w, m, *_ in lines):
                continue
            lines.append((v, lab, c, own, ls))
    lines.sort(key=lambda t: t[0])
    for v, _, c, own, ls in lines:
        ax.axhline(v, color=c, ls=(0, (5, 3)) if ls == "-" else (0, (2, 2)), lw=1.6 if own else 0.9,
                   alpha=0.9, zorder=1)
    ys = _spread([v / ymax for v, *_ in lines], gap=0.075)
    for (v, lab, c, own, _), y in zip(lines, ys):
        ax.text(1.035, y, f"{lab}: {v}", transform=ax.transAxes, color=c, fontsize=_fs(7.5), va="center", ha="left",
                fontweight="bold" if own else "normal", clip_on=False)
        # A short leader from the line's end to its label (labels are moved apart when lines are close).
        ax.plot([1.0, 1.03], [v / ymax, y], transform=ax.transAxes, color=c, lw=0.7, clip_on=False)


# ----------------------------------------------------------------------------- figure 3

def head_layers(analysis: dict, limit: int = MAX_HEAD_LAYERS) -> list[int]:
    """Positions (into ``analysis["layers"]``) of at most ``limit`` evenly spread layers."""
    n = len(analysis["layers"])
    if n <= limit:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, limit)})


def fig_heads(analysis: dict) -> Figure:
    """Head cosine similarity (pre and post) and head-mode spectra for a few layers."""
    with matplotlib.rc_context(_rc()):
        picks = head_layers(analysis)
        k = len(picks)
        fig = _figure(figure_size("heads", analysis))
        axes = fig.subplots(3, k, squeeze=False, gridspec_kw={"height_ratios": [1, 1, 0.8]})
        H = int(analysis["model"]["heads"])
        cos = {key: [np.asarray(analysis["layers"][p][key]["head_cosine"], dtype=float) for p in picks]
               for key in TENSORS}
        off = [np.abs(c[~np.eye(len(c), dtype=bool)]).max() if len(c) > 1 else 0.0
               for key in TENSORS for c in cos[key]]
        vmax = min(1.0, max(0.05, math.ceil(max(off, default=0.05) / 0.05) * 0.05))
        image = None
        for j, p in enumerate(picks):
            layer = analysis["layers"][p]
            for row, key in enumerate(TENSORS):
                ax = axes[row, j]
                image = ax.imshow(cos[key][j], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
                ax.grid(False)
                loc = MaxNLocator(nbins=min(H, 8), integer=True)
                ax.xaxis.set_major_locator(loc)
                ax.yaxis.set_major_locator(MaxNLocator(nbins=min(H, 8), integer=True))
                ax.tick_params(length=2, labelsize=_fs(7))
                if row == 0:
                    ax.set_title(f"layer {layer['index']}")
                if j == 0:
                    ax.set_ylabel(f"{'pre-softmax W' if key == 'pre' else 'post-softmax W̃'}\nhead h")
                if row == 1:
                    ax.set_xlabel("head h′", labelpad=1)
            ax = axes[2, j]
            for key, ls, marker in (("pre", "-", "o"), ("post", "--", "s")):
                s = np.asarray(layer[key]["modes"]["head"]["singular_values"], dtype=float)
                if len(s) and s[0] > 0:
                    y = s / s[0]
                    x = np.arange(1, len(s) + 1)
                    ax.semilogy(x[y > 0], y[y > 0], ls=ls, marker=marker if len(s) <= 16 else None, ms=3.5, lw=1.2,
                                color=MODE_COLORS["head"] if key == "pre" else _shade(MODE_COLORS["head"], -0.45),
                                label="pre-softmax W" if key == "pre" else "post-softmax W̃")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=min(H, 6), integer=True))
            ax.set_xlabel("head-mode index i")
            _log_decades(ax)
            if j:
                ax.tick_params(labelleft=False)  # same y range as the first panel
            if j == 0:
                ax.set_ylabel("head-mode σ_i / σ_1")
                ax.legend(loc="lower left", frameon=True, framealpha=0.85, fontsize=_fs(7.5))
        lows = [ax.get_ylim()[0] for ax in axes[2]]
        for ax in axes[2]:  # one y range for the row, so layers compare at a glance
            ax.set_ylim(min(lows), 1.3)
        bar = fig.colorbar(image, ax=axes[:2, :], shrink=0.9, pad=0.01, aspect=30)
        bar.set_label("cosine of head slices ⟨W[h], W[h′]⟩ / (‖W[h]‖ ‖W[h′]‖)"
                      + ("" if vmax >= 1 else f"\n(colour range ±{vmax:g}; diagonal = 1)"), fontsize=_fs(8))
        shown = "" if k == len(analysis["layers"]) else f" ({k} of {len(analysis['layers'])} layers)"
        fig.suptitle(f"Head-mode structure{shown} — {model_name(analysis)}", fontsize=_fs(11))
        return fig


# ----------------------------------------------------------------------------- figure 4

def fig_tradeoff(analyses: list[dict]) -> Figure:
    """Relative error against parameters: Tucker, MLA-, GQA-shaped formats (exact truncated-HOSVD
    and exact GQA errors where the analysis has them, else HOSVD tail bounds, labelled so)."""
    with matplotlib.rc_context(_rc()):
        fig = _figure(figure_size("tradeoff"))
        axes = fig.subplots(1, 2)
        names = _names(analyses)
        data = [[pareto.tradeoff(a, key) for key in TENSORS] for a in analyses]
        floor = _error_floor([t for row in data for t in row])
        has_exact = has_lower = has_contiguous = False
        all_exact = all(t.exact for row in data for t in row)
        for col, key in enumerate(TENSORS):
            ax = axes[col]
            for i, (a, ls) in enumerate(zip(analyses, MODEL_STYLES)):
                t = data[i][col]
                clip = lambda e: np.maximum(np.asarray(e, dtype=float), floor)  # noqa: E731
                ax.plot(t.tucker.params, clip(t.tucker.errors), drawstyle="steps-post", color=FAMILY_COLORS["Tucker"],
                        ls=ls, lw=1.8, zorder=3)
                ax.plot(t.mla.params, clip(t.mla.errors), drawstyle="steps-post", color=FAMILY_COLORS["MLA"],
                        ls=ls, lw=1.6, zorder=2)
                marker = GQA_MARKERS[i]
                for x, e, lab, low in zip(t.gqa.params, clip(t.gqa.errors), t.gqa.labels, t.gqa.lower):
                    if a["model"]["attention"] != "MLA" and lab == f"G={a['model']['kv_heads']}":
                        continue  # the model itself: drawn as the star below
                    ax.plot([x], [e], ls="none", marker=marker, ms=6.5, mew=1.4, color=FAMILY_COLORS["GQA"],
                            mfc="white" if low else FAMILY_COLORS["GQA"], zorder=4)
                    has_exact |= not low
                    has_lower |= low
                    # Label where the curves are not: below the marker on the floor, left of a
                    # point under the Tucker frontier (that region is empty), else up and right.
                    at_floor = e <= floor * 1.0001
                    best = [b for b in (pareto.best_error(t.tucker, x), pareto.best_error(t.mla, x)) if b == b]
                    under = bool(best) and e < min(best)
                    xy = (0, -13 - 11 * i) if at_floor else ((-8, -9 * i) if under else (7, 6 + 9 * i))
                    ax.annotate(lab, (x, e), xytext=xy, textcoords="offset points", fontsize=_fs(7.5),
                                color=FAMILY_COLORS["GQA"], va="baseline" if at_floor else "center",
                                ha="center" if at_floor else ("right" if under else "left"))
                if t.gqa_contiguous is not None:
                    for x, e, eb, lab in zip(t.gqa_contiguous.params, clip(t.gqa_contiguous.errors),
                                             clip(t.gqa.errors), t.gqa_contiguous.labels):
                        if e > eb * (1 + 1e-6) and not (a["model"]["attention"] != "MLA"
                                                      and lab == f"G={a['model']['kv_heads']}"):
                            ax.plot([x], [e], ls="none", marker="_", ms=11, mew=1.6, color=FAMILY_COLORS["GQA"],
                                    zorder=4)
                            has_contiguous = True
                p = t.model
                ax.axvline(p.params, color=FAMILY_COLORS["model"], ls=ls, lw=0.8, alpha=0.5, zorder=0)
                ax.plot([p.params], [max(p.error, floor)], ls="none", marker="*", ms=15, mew=0.8,
                        mec="black", color=FAMILY_COLORS["model"], zorder=5)
                what = "exact, error 0" if p.error < floor else f"error {p.error:.2g}"
                who = "this model" if len(analyses) == 1 else "model " + TAGS[i]
                # Two models: the cheaper one is labelled on the left, so the leaders never cross.
                left = p.params <= min(row[col].model.params for row in data) if i else \
                    p.params < max(row[col].model.params for row in data) or len(data) == 1
                ax.annotate(f"{who} ({_arch(a['model'])}):\n{what}", (p.params, max(p.error, floor)),
                            xytext=(-14, 30) if left else (14, 30), textcoords="offset points",
                            ha="right" if left else "left", fontsize=_fs(7.5), color="#333333",
                            arrowprops=dict(arrowstyle="-", color="#777777", lw=0.7))
            ax.set_xscale("log")
            left, right = _param_range([row[col] for row in data])
            ax.set_xlim(left, right)
            # Plain counts (500, 2k, 1M) at 1, 2 and 5 of each decade (1 only on wide ranges),
            # not 2x10^2 labels crowding the axis.
            wide = math.log10(right / left) > 3.2
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _count_label(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(floor / 4, 1.6)
            ax.axhline(floor, color="#999999", ls=":", lw=1, zorder=0)
            ax.text(0.01, floor, " error 0 (exact) is drawn on this line", transform=ax.get_yaxis_transform(),
                    ha="left", va="bottom", fontsize=_fs(7), color="#666666")
            ax.set_title(TENSOR_TITLES[key])
            ax.set_xlabel("attention parameters of this tensor, all layers (log scale)")
            if col == 0:
                ax.set_ylabel("relative error ‖W − Ŵ‖ / ‖W‖ ("
                              + ("exact" if all_exact else "HOSVD tail bound") + ", log scale)")
            p0 = data[0][col].model.params
            sec = ax.secondary_xaxis("top", functions=(lambda x, p0=p0: x / p0, lambda x, p0=p0: x * p0))
            sec.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
            sec.set_xlabel("parameters relative to " + ("this model" if len(analyses) == 1 else "model A")
                           + " (×)", fontsize=_fs(8))
        handles = [
            Line2D([], [], color=FAMILY_COLORS["Tucker"], lw=1.8,
                   label="Tucker (r1 ≤ H, r2, r3), truncated HOSVD: frontier"),
            Line2D([], [], color=FAMILY_COLORS["MLA"], lw=1.6,
                   label="MLA-shaped: separate K and V latents, no decoupled RoPE"),
        ]
        if has_exact:
            handles.append(Line2D([], [], color=FAMILY_COLORS["GQA"], ls="none", marker="D", ms=6,
                                  label="GQA-shaped, G groups, best grouping found (exact)"))
        if has_contiguous:
            handles.append(Line2D([], [], color=FAMILY_COLORS["GQA"], ls="none", marker="_", ms=11, mew=1.6,
                                  label="GQA-shaped, contiguous groups (exact)"))
        if has_lower:
            handles.append(Line2D([], [], color=FAMILY_COLORS["GQA"], mfc="white", ls="none", marker="D", ms=6,
                                  mew=1.4, label="GQA-shaped, G groups: lower bound only"))
        handles.append(Line2D([], [], color=FAMILY_COLORS["model"], mec="black", ls="none", marker="*", ms=12,
                              label="the model's own architecture"))
        fig.suptitle("Error against parameters at equal parameter counts"
                     + (" (exact errors)" if all_exact else " (Tucker/MLA: HOSVD tail bounds)")
                     + (f" — {names[0]}" if len(names) == 1 else ""), fontsize=_fs(11))
        _model_legend(fig, names, handles, ncol=3 if len(names) == 1 else 4, markers=True)
        return fig


def _param_range(tradeoffs) -> tuple[float, float]:
    """x limits: from where the cheapest formats stop being useless (error about 1 is the
    same at every budget) or a decade and a bit below the model, to the most expensive point."""
    lo, hi, first_drop, own = np.inf, 0.0, np.inf, np.inf
    for t in tradeoffs:
        ps = np.concatenate([t.tucker.params, t.mla.params, t.gqa.params, [t.model.params]])
        lo, hi = min(lo, ps.min()), max(hi, ps.max())
        useful = t.tucker.params[t.tucker.errors < 0.98]
        if len(useful):
            first_drop = min(first_drop, useful.min())
        own = min(own, t.model.params)
    left = max(lo, min(own / 20, first_drop / 1.5))
    return left / 1.15, hi * 1.15


def _count_label(v: float) -> str:
    """500, 2k, 1.5M, 7B: parameter counts as readers say them."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"


def _error_floor(tradeoffs) -> float:
    """A log-axis stand-in for error 0: a decade below the smallest positive error shown."""
    errs = np.concatenate([np.concatenate([t.tucker.errors, t.mla.errors, t.gqa.errors, [t.model.error]])
                           for t in tradeoffs])
    pos = errs[errs > 1e-12]
    if not len(pos):
        return 1e-3
    return float(min(1e-2, max(1e-8, 10 ** (math.floor(math.log10(pos.min())) - 1))))


# ----------------------------------------------------------------------------- figure 5

def fig_evolution(analyses: list[dict], xs: list[float], xlabel: str, ticklabels: list[str] | None = None,
                  log_x: bool = False) -> Figure:
    """Effective ranks of every mode across several analyses (training steps or model sizes).

    Per model and energy level, the median over layers (line) and the range over layers
    (band); the numerical rank's median (crosses); each model's ceiling (dashed, drawn
    through the models so that a change of width shows)."""
    with matplotlib.rc_context(_rc()):
        fig = _figure(figure_size("ranks"))
        axes = fig.subplots(2, 3)
        energies = [f"{t:g}" for t in analyses[0]["settings"]["energy"]]
        styles = _energy_styles(energies)
        order = np.argsort(xs, kind="stable")
        x = np.asarray(xs, dtype=float)[order]
        runs = [analyses[i] for i in order]
        for row, key in enumerate(TENSORS):
            for col, mode in enumerate(MODE_NAMES[key]):
                ax = axes[row, col]
                color = MODE_COLORS[mode]
                per_model = [[layer[key]["modes"][mode] for layer in a["layers"]] for a in runs]
                for e, (amount, marker) in zip(energies, styles):
                    ranks = [np.array([m["energy_ranks"].get(e, np.nan) for m in ms], dtype=float)
                             for ms in per_model]
                    c = _shade(color, amount)
                    ax.fill_between(x, [r.min() for r in ranks], [r.max() for r in ranks], color=c, alpha=0.18,
                                    lw=0)
                    ax.plot(x, [np.median(r) for r in ranks], color=c, marker=marker, ms=4.5, lw=1.5)
                ax.plot(x, [np.median([m["numerical_rank"] for m in ms]) for ms in per_model], color="#222222",
                        ls="none", marker="x", ms=6, mew=1.0, zorder=3)
                ceilings = [max(m["ceiling"] for m in ms) for ms in per_model]
                sizes = [ms[0]["size"] for ms in per_model]
                ax.plot(x, ceilings, color=FAMILY_COLORS["model"], ls=(0, (5, 3)), lw=1.4, drawstyle="steps-mid")
                ax.plot(x, sizes, color=FAMILY_COLORS["MHA"], ls=":", lw=1.0, drawstyle="steps-mid")
                ax.set_ylim(0, max(sizes) * 1.08)
                ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
                if log_x:
                    ax.set_xscale("log")
                    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _count_label(v)))
                if ticklabels is not None:
                    ax.set_xticks(x, [ticklabels[i] for i in order], rotation=30, ha="right", fontsize=_fs(7))
                    ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_title(f"{TENSOR_TITLES[key].split(' (')[0]} · {mode} mode (size {_sizes(sizes)})")
                if row == 1:
                    ax.set_xlabel(xlabel)
                if col == 0:
                    ax.set_ylabel("rank (median over layers; band: range)")
        handles = [Line2D([], [], color=_shade("#666666", a), marker=m, ms=5, lw=1.4, label=f"energy rank r({e})")
                   for e, (a, m) in zip(energies, styles)]
        handles += [Line2D([], [], color="#222222", ls="none", marker="x", ms=6, label="numerical rank (median)"),
                    Line2D([], [], color=FAMILY_COLORS["model"], ls=(0, (5, 3)), lw=1.4,
                           label="rank ceiling of the architecture"),
                    Line2D([], [], color=FAMILY_COLORS["MHA"], ls=":", lw=1.0, label="mode size")]
        fig.suptitle(f"Effective ranks across {len(runs)} analyses", fontsize=_fs(11))
        fig.legend(handles=handles, loc="outside lower center", ncol=_legend_columns(len(handles)), frameon=False)
        return fig
