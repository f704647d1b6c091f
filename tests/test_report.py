"""``tuckerctl.report``: figures, index.html and summary.md for MHA, GQA, MQA and MLA
analyses of tiny transformers checkpoints, the compare mode, and analysis-JSON validation.

The analyses come from the real pipeline (save_pretrained -> analyze). PNGs are checked
by decoding them (matplotlib's reader), their IHDR size against the declared figure size
at 150 dpi and their pHYs resolution.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import transformers as tf
from oracle import save_tiny

from tuckerctl import plotting
from tuckerctl.analysis import analyze
from tuckerctl.errors import InputError
from tuckerctl.report import _md, build_report, load_analysis

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, max_position_embeddings=64)
MODELS = {
    "mha": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(LLAMA, num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=4)),
    # 8 layers: the head figure must pick 6 of them, evenly spread.
    "gqa": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(LLAMA, num_hidden_layers=8, num_attention_heads=8,
                                                       num_key_value_heads=2, head_dim=4)),
    "mqa": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(LLAMA, num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=1, attention_bias=True)),
    "mla": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
            dict(LLAMA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 first_k_dense_replace=2, n_routed_experts=4, moe_intermediate_size=16, num_experts_per_tok=2,
                 n_group=1, topk_group=1)),
}
EXPECTED = {"mha": ("MHA", 4, 4), "gqa": ("GQA", 8, 2), "mqa": ("MQA", 4, 1), "mla": ("MLA", 4, 4)}
STEMS = ["fig1-spectra", "fig2-ranks", "fig3-heads", "fig4-tradeoff"]


@pytest.fixture(scope="module")
def analyses(tmp_path_factory):
    out = {}
    for name, (cfg_cls, model_cls, kw) in MODELS.items():
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        save_tiny(model_cls, cfg_cls(**kw), path)
        out[name] = analyze(path, device="cpu")
        att, H, G = EXPECTED[name]
        assert (out[name]["model"]["attention"], out[name]["model"]["heads"], out[name]["model"]["kv_heads"]) == \
            (att, H, G)
    return out


def png_info(path) -> tuple[int, int, float]:
    """(width, height, dpi) from the PNG's IHDR and pHYs chunks."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    at = data.find(b"pHYs")
    assert at > 0, "no pHYs chunk"
    ppm_x, ppm_y, unit = struct.unpack(">IIB", data[at + 4:at + 13])
    assert unit == 1 and ppm_x == ppm_y
    return width, height, ppm_x * 0.0254


def check_png(path, size_in):
    width, height, dpi = png_info(path)
    assert (width, height) == (round(size_in[0] * 150), round(size_in[1] * 150)), path.name
    assert round(dpi) == 150
    import matplotlib.image as mpimg

    pixels = mpimg.imread(path)  # decodes the whole file: a truncated or corrupt PNG fails here
    assert pixels.shape[:2] == (height, width)
    assert float(np.std(pixels[..., :3])) > 0.05  # not a blank canvas


def tree(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


# Rendering takes 10-45 s per family on 2 cores: one family in the quick run, the rest marked slow.
@pytest.mark.parametrize("name", [n if n == "mla" else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_report_for_each_family(analyses, tmp_path, name):
    a = analyses[name]
    (tmp_path / "other.txt").write_text("untouched")
    before = tree(tmp_path)
    out = tmp_path / "report"
    formats = ("png", "svg", "pdf") if name == "mqa" else ("png",)  # vector formats once is enough
    written = build_report(a, out, formats=formats)
    # Exactly the returned files exist, all inside out_dir, no temp files left behind.
    assert sorted(p.name for p in written) == sorted(os.listdir(out))
    assert sorted(p.name for p in written) == sorted([f"{s}.{f}" for s in STEMS for f in formats]
                                                     + ["index.html", "summary.md"])
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("report" + os.sep)} == before
    for stem in STEMS:
        size = plotting.figure_size(stem.split("-")[1], a)
        check_png(out / f"{stem}.png", size)
    page = (out / "index.html").read_text()
    md = (out / "summary.md").read_text()
    for stem in STEMS:
        assert f'<img src="{stem}.png"' in page
        assert f"]({stem}.png)" in md
    if "pdf" in formats:
        for stem in STEMS:
            assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
            assert "<svg" in (out / f"{stem}.svg").read_text()[:2000]
        assert f'href="{STEMS[0]}.svg"' in page and f'href="{STEMS[0]}.pdf"' in page
    # Self-contained: inline script and CSS only, no remote resources (the SVG namespace URI is a name).
    assert "<script src" not in page and "<style>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page) and "@import" not in page and "url(" not in page
    for verdict in a["summary"]["verdicts"]:
        assert _md(verdict) in md  # escaped: brackets and bars are literal, not links or cells
    # Per-layer rank table: one row per analysed layer, in both documents.
    for layer in a["layers"]:
        q = layer["pre"]["modes"]["query"]
        cell = "/".join(str(q["energy_ranks"][f"{e:g}"]) for e in a["settings"]["energy"]) + \
            f" · {q['numerical_rank']}/{q['ceiling']}"
        key = q["energy_ranks"]["0.99"]  # the page's rank cells sort by the 0.99-energy rank
        assert f"| {layer['index']} | " in md and cell in md and f'<td data-sort="{key}">{cell}</td>' in page


def test_head_figure_spreads_six_layers(analyses):
    a = analyses["gqa"]
    picks = plotting.head_layers(a)
    assert picks == [0, 1, 3, 4, 6, 7] and len(a["layers"]) == 8
    fig = plotting.fig_heads(a)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"layer {i}" for i in picks]


def test_tradeoff_figure_marks_the_model_and_names_families(analyses):
    fig = plotting.fig_tradeoff([analyses["gqa"]])
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("Tucker" in s for s in labels) and any("MLA-shaped" in s for s in labels)
    assert any("GQA-shaped" in s for s in labels) and any("own architecture" in s for s in labels)
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum("this model (GQA G=2)" in s and "error 0" in s for s in notes) == 2  # both panels
    panels = [ax for ax in fig.axes if ax.get_title().startswith(("pre-softmax", "post-softmax"))]
    assert len(panels) == 2
    for ax in panels:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and "parameters" in ax.get_xlabel()
    assert "relative error" in panels[0].get_ylabel()


@pytest.mark.slow
def test_compare_mode(analyses, tmp_path):
    a, b = analyses["gqa"], analyses["mla"]
    written = build_report(a, tmp_path, compare=b)
    names = {p.name for p in written}
    assert {f"{s}.png" for s in STEMS} | {"fig3-heads-compare.png", "index.html", "summary.md"} == names
    check_png(tmp_path / "fig3-heads-compare.png", plotting.figure_size("heads", b))
    page = (tmp_path / "index.html").read_text()
    name_a, name_b = plotting.model_name(a), plotting.model_name(b)
    assert "Model A: " + name_a in page and "Model B: " + name_b in page
    assert '<img src="fig3-heads-compare.png"' in page
    for fn in (plotting.fig_spectra, plotting.fig_ranks, plotting.fig_tradeoff):
        fig = fn([a, b])
        labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert name_a in labels and name_b in labels, fn.__name__
        styles = {line.get_linestyle() for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) > 1}
        assert {"-", "--"} <= styles, fn.__name__


def test_compare_with_itself_keeps_names_apart(analyses):
    a = analyses["mha"]
    assert plotting._names([a, copy.deepcopy(a)]) == [plotting.model_name(a) + " [A]", plotting.model_name(a) + " [B]"]


def test_vector_only_page_embeds_svg(analyses):
    """Without PNGs the page embeds the SVGs and links the PDFs (page text only)."""
    from tuckerctl import pareto, report

    a = analyses["mha"]
    t = [{key: pareto.tradeoff(a, key) for key in ("pre", "post")}]
    page = report._html([a], [plotting.model_name(a)], t, STEMS, ("pdf", "svg"))
    assert '<img src="fig1-spectra.svg"' in page and 'href="fig1-spectra.pdf"' in page and ".png" not in page


def test_bad_format_and_out_dir(analyses, tmp_path):
    with pytest.raises(InputError, match="formats: jpg"):
        build_report(analyses["mha"], tmp_path / "r", formats=("jpg",))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        build_report(analyses["mha"], tmp_path / "file")
    with pytest.raises(InputError, match="not a tuckerctl report"):
        build_report(analyses["mha"], tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- load_analysis

def test_load_analysis_round_trip(analyses, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(analyses["mla"]))
    assert load_analysis(path) == json.loads(json.dumps(analyses["mla"]))


def _drop(doc, *keys):
    for k in keys[:-1]:
        doc = doc[k]
    del doc[keys[-1]]


def _set(value, *keys):
    def mutate(doc):
        for k in keys[:-1]:
            doc = doc[k]
        doc[keys[-1]] = value
    return mutate


MUTATIONS = {
    "schema": (_set("tuckerctl.other/1", "schema"), "'schema'"),
    "no-model": (lambda d: _drop(d, "model"), "'model' is missing"),
    "attention": (_set("XYZ", "model", "attention"), "'model.attention'"),
    "heads-bool": (_set(True, "model", "heads"), "'model.heads'"),
    "no-layers": (_set([], "layers"), "'layers'"),
    "no-sv": (lambda d: _drop(d, "layers", 1, "pre", "modes", "key", "singular_values"),
              "'layers[1].pre.modes.key.singular_values' is missing"),
    "sv-ascending": (_set([1.0, 2.0], "layers", 0, "post", "modes", "value", "singular_values"),
                     "'layers[0].post.modes.value.singular_values'"),
    "sv-nan": (_set([1.0, float("nan")], "layers", 0, "post", "modes", "head", "singular_values"),
               "'layers[0].post.modes.head.singular_values'"),
    "energy-rank": (lambda d: _drop(d, "layers", 0, "pre", "modes", "head", "energy_ranks", "0.99"),
                    "'layers[0].pre.modes.head.energy_ranks.0.99'"),
    "cosine": (_set([[1.0]], "layers", 0, "pre", "head_cosine"), "'layers[0].pre.head_cosine'"),
    "shape": (_set([4, 64], "layers", 0, "post", "shape"), "'layers[0].post.shape'"),
    "size": (_set(99, "layers", 0, "pre", "modes", "query", "size"), "'layers[0].pre.modes.query.size'"),
    "verdicts": (lambda d: _drop(d, "summary", "verdicts"), "'summary.verdicts'"),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_load_analysis_names_file_and_field(analyses, tmp_path, case):
    doc = copy.deepcopy(analyses["mla"])
    mutate, field = MUTATIONS[case]
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError) as err:
        load_analysis(path)
    msg = str(err.value)
    assert str(path) in msg and field in msg and "\n" not in msg


def test_load_analysis_unreadable(tmp_path):
    with pytest.raises(InputError, match="missing.json: cannot read"):
        load_analysis(tmp_path / "missing.json")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(InputError, match=r"t.json: not valid JSON \(line 1"):
        load_analysis(tmp_path / "t.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(InputError, match="list.json: not a JSON object"):
        load_analysis(tmp_path / "list.json")


def test_build_report_validates_its_input(analyses, tmp_path):
    doc = copy.deepcopy(analyses["gqa"])
    del doc["layers"][0]["post"]["norm"]
    with pytest.raises(InputError, match=r"compare: field 'layers\[0\].post.norm' is missing"):
        build_report(analyses["gqa"], tmp_path, compare=doc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_example_model_report_renders(tmp_path):
    """The shipped example renders a complete report through the CLI (as CI does)."""
    from oracle import run_cli

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-gqa"
    res = run_cli("report", example, "-o", tmp_path / "r")
    assert res.code == 0, res.stderr
    html = (tmp_path / "r" / "index.html").read_text()
    for fig in ("fig1-spectra.png", "fig2-ranks.png", "fig3-heads.png", "fig4-tradeoff.png"):
        assert (tmp_path / "r" / fig).stat().st_size > 10_000 and fig in html
    assert (tmp_path / "r" / "summary.md").exists()
