"""Many checkpoints: multi-source analyze, reports of several analyses (rank evolution
across training, model families), CSV export, and the compare mode with different widths.

The training series is real: ``examples/train_example.py`` trains the shipped example's
architecture for a few steps and saves checkpoints at three steps."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as tf
from oracle import run_cli, save_tiny

from tuckerctl import plotting
from tuckerctl.analysis import analyze
from tuckerctl.errors import InputError
from tuckerctl.report import build_report, load_analyses, ranks_csv, series_axis, training_step

ROOT = Path(__file__).resolve().parents[1]
STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def widths(tmp_path_factory):
    """Two GQA Llamas of widths 32 and 64 (same heads): analyses of different mode sizes."""
    out = []
    for d in (32, 64):
        path = tmp_path_factory.mktemp(f"llama-d{d}")
        save_tiny(tf.LlamaForCausalLM, tf.LlamaConfig(vocab_size=64, hidden_size=d, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=4), path)
        out.append(analyze(path, device="cpu"))
    return out


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """The example model trained 30 steps, saved at steps 10, 20 and 30."""
    out = tmp_path_factory.mktemp("run")
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "train_example.py"), "--steps", str(STEPS[-1]),
                          "--save-every", str(STEPS[0]), "--batch", "4", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return out


def test_training_step_from_names():
    assert [training_step(s) for s in ("step-1000", "checkpoint-2000", "global_step3k", "iter_500", "1500",
                                       "2k", "run7/ckpt_40")] == [1000, 2000, 3000, 500, 1500, 2000, 40]
    assert training_step("SmolLM2-135M") is None and training_step("final") is None


def test_compare_draws_each_models_own_ceiling(widths):
    """Regression: with widths 32 and 64, model A's query ceiling is 16 (H*d_h), not B's 64."""
    a, b = widths
    fig = plotting.fig_ranks([a, b])
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("pre-softmax W · query"))
    texts = [t.get_text() for t in ax.texts]
    assert "MHA / GQA / MQA (model A): 16" in texts, texts
    assert "MHA / GQA / MQA (model B): 16" in texts, texts  # H*d_h = 16 for both
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("post-softmax W̃ · output"))
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("MHA / GQA / MQA (model A): 16") for t in texts), texts


@pytest.mark.slow
def test_compare_generalised_to_four(widths, tmp_path):
    a, b = widths
    written = build_report([a, b, a], tmp_path, labels=["a", "b", "c"])
    assert "fig5-evolution.png" in {p.name for p in written}
    fig = plotting.fig_spectra([a, b, a, b])
    styles = {line.get_linestyle() for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) > 1}
    assert {"-", "--", ":", "-."} <= styles


def test_model_size_axis(widths):
    xs, label, ticks, log_x = series_axis(widths + [widths[0]], ["small", "big", "small again"])
    assert label == "analysis" and xs == [0, 1, 2]  # two equal sizes: the given order
    xs, label, ticks, log_x = series_axis(widths, ["small", "big"])
    assert log_x and "parameters" in label and ticks == ["small", "big"]
    per_layer = [w["layers"][0]["params"]["original"] * w["model"]["layers"] for w in widths]
    assert xs == per_layer


def test_csv_holds_every_number(widths, tmp_path):
    build_report(widths, tmp_path, formats=("csv",), labels=["d32", "d64"])
    rows = list(csv.DictReader((tmp_path / "ranks.csv").open()))
    assert len(rows) == sum(len(a["layers"]) * 6 for a in widths)
    for a, label in zip(widths, ["d32", "d64"]):
        for layer in a["layers"]:
            for key, modes in (("pre", ("head", "query", "key")), ("post", ("head", "output", "value"))):
                for mode in modes:
                    M = layer[key]["modes"][mode]
                    row = next(r for r in rows if (r["label"], int(r["layer"]), r["tensor"], r["mode"]) ==
                               (label, layer["index"], key, mode))
                    assert int(row["numerical_rank"]) == M["numerical_rank"] and int(row["ceiling"]) == M["ceiling"]
                    assert int(row["energy_rank_0.99"]) == M["energy_ranks"]["0.99"]
                    assert float(row["sigma_1"]) == pytest.approx(M["singular_values"][0], rel=1e-8)
                    assert int(row["params_original"]) == layer["params"]["original"]
    # csv alone: no figures
    assert {p.name for p in tmp_path.iterdir()} == {"ranks.csv", "summary.md", "index.html"}


@pytest.mark.slow
def test_rank_evolution_of_the_example_across_training(training_run, tmp_path):
    """analyze A B C --json -> one document; report of three analyses at steps 10/20/30."""
    dirs = [training_run / f"step-{s}" for s in STEPS]
    res = run_cli("analyze", *dirs, "--json", "--quiet")
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "tuckerctl.analyses/1" and len(doc["models"]) == 3
    assert [m["source"]["path"] for m in doc["models"]] == [str(d) for d in dirs]
    # Separate files, one per step (what a training script would write), through the CLI:
    files = []
    for d, m in zip(dirs, doc["models"]):
        files.append(tmp_path / f"{d.name}.json")
        files[-1].write_text(json.dumps(m))
    out = tmp_path / "report"
    res = run_cli("report", *files, "-o", out, "--format", "png,csv",
              *[x for s in STEPS for x in ("--label", f"step-{s}")])
    assert res.code == 0, res.stderr
    assert (out / "fig5-evolution.png").stat().st_size > 10_000
    rows = list(csv.DictReader((out / "ranks.csv").open()))
    assert sorted({float(r["step"]) for r in rows}) == list(STEPS)
    # The figure's x values are the steps, its y values the layers' median ranks.
    analyses = [load_analyses(f)[0] for f in files]
    xs, xlabel, _, _ = series_axis(analyses, [f"step-{s}" for s in STEPS])
    assert xs == list(STEPS) and xlabel == "training step"
    fig = plotting.fig_evolution(analyses, xs, xlabel)
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("pre-softmax W · key"))
    import numpy as np

    medians = [float(np.median([layer["pre"]["modes"]["key"]["energy_ranks"]["0.99"] for layer in a["layers"]]))
               for a in analyses]
    assert any(list(line.get_xdata()) == list(STEPS) and list(line.get_ydata()) == medians for line in ax.get_lines())
    ceiling = [line for line in ax.get_lines() if list(line.get_ydata()) == [32, 32, 32]]
    assert ceiling  # the GQA ceiling G*d_h = 32 at every step
    # One multi-model document and a glob, with labels from the folder names:
    (tmp_path / "all.json").write_text(res_json := json.dumps(doc))
    assert json.loads(res_json)["models"]
    res = run_cli("report", tmp_path / "all.json", "-o", tmp_path / "r2", "--format", "csv", "--quiet")
    assert res.code == 0, res.stderr
    assert {r["label"] for r in csv.DictReader((tmp_path / "r2" / "ranks.csv").open())} == \
        {f"step-{s}" for s in STEPS}
    res = run_cli("report", str(training_run / "step-*"), "-o", tmp_path / "r3", "--format", "csv", "--layers", "0-1",
              "--quiet")
    assert res.code == 0, res.stderr
    rows = list(csv.DictReader((tmp_path / "r3" / "ranks.csv").open()))
    assert [float(r["step"]) for r in rows[::12]] == list(STEPS) and {r["layer"] for r in rows} == {"0", "1"}


def test_label_count_must_match(widths, tmp_path):
    with pytest.raises(InputError, match="labels: 1 labels for 2 analyses"):
        build_report(widths, tmp_path, labels=["x"])


def test_csv_text_is_plain(widths):
    text = ranks_csv(widths, ["a", "b"])
    assert text.splitlines()[0].startswith("model,label,step,layer,tensor,mode,size,ceiling,numerical_rank")


# ----------------------------------------------------------------------------- figures for papers

def many_layers(a: dict, n: int) -> dict:
    """``a`` with its layers repeated to ``n`` layers (only the plotting needs many)."""
    import copy

    out = copy.deepcopy(a)
    out["layers"] = [dict(copy.deepcopy(a["layers"][i % len(a["layers"])]), index=i) for i in range(n)]
    out["model"]["layers"] = n
    return out


def test_style_presets_set_print_size(widths):
    a = widths[0]
    for name, width, dpi, font in (("paper", 7.0, 300, 7.2), ("slides", 13.33, 150, 13.5)):
        with plotting.using_style(name):
            fig = plotting.fig_ranks([a])
            assert fig.get_size_inches()[0] == pytest.approx(width) and fig.dpi == dpi
            ax = fig.axes[0]
            assert ax.title.get_fontsize() == pytest.approx(10 * font / 9)
            assert ax.xaxis.label.get_fontsize() == pytest.approx(font)
    assert plotting.fig_ranks([a]).get_size_inches()[0] == pytest.approx(15.0)  # back to the screen preset
    with pytest.raises(InputError, match="^style: "):
        build_report(a, Path("unused"), style="poster")


def test_many_layer_spectra_are_median_and_band(widths):
    import numpy as np

    a = many_layers(widths[1], 14)
    fig = plotting.fig_spectra([a])
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("pre-softmax W · key"))
    assert len(ax.collections) >= 1  # the band
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]
    assert len(curves) == 1  # one median, not 14 lines
    sv = np.array([layer["pre"]["modes"]["key"]["singular_values"] for layer in a["layers"]], dtype=float)
    sv = sv / sv[:, :1]
    want = np.median(np.where(sv > 0, sv, np.nan), axis=0)
    got = curves[0].get_ydata()
    ok = np.isfinite(want)
    assert np.allclose(got[ok], want[ok])
    # Axes clipped at round-off: a decade below the tolerance, not at 1e-16.
    for ax in fig.axes:
        if ax.get_title().startswith(("pre-softmax", "post-softmax")):
            key = "pre" if ax.get_title().startswith("pre") else "post"
            mode = ax.get_title().split(" · ")[1].split(" ")[0]
            tol = min(layer[key]["modes"][mode].get("tol") or a["settings"]["tol"] for layer in a["layers"])
            assert ax.get_ylim()[0] >= tol / 10 * (1 - 1e-9) and tol > 1e-15
    # Few layers: one line per layer, as before.
    few = plotting.fig_spectra([widths[1]])
    ax = next(ax for ax in few.axes if ax.get_title().startswith("pre-softmax W · key"))
    assert len([line for line in ax.get_lines() if len(line.get_xdata()) > 2]) == len(widths[1]["layers"])


@pytest.mark.slow  # renders every panel: ~50 s on 2 cores
def test_one_file_per_panel(widths, tmp_path):
    import matplotlib.image as mpimg

    written = build_report(widths[0], tmp_path, formats=("png",), style="paper", panels=True)
    names = {p.name for p in written}
    assert {f"fig2-ranks-p{k}.png" for k in range(1, 7)} <= names and "fig2-ranks-p7.png" not in names
    whole = mpimg.imread(tmp_path / "fig2-ranks.png")
    assert whole.shape[1] == 2100  # 7 in at 300 dpi
    for k in range(1, 7):
        panel = mpimg.imread(tmp_path / f"fig2-ranks-p{k}.png")
        assert 200 < panel.shape[1] < whole.shape[1] and panel.shape[0] < whole.shape[0]
        assert float(panel[..., :3].std()) > 0.05
