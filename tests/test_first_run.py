"""A first run that explains itself: the plain reading after the table, tables that fit
80 columns, progress that shows at once, usage errors before torch is imported, and
``tuckerctl.load`` as a proper sequence. On the shipped example model."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

import tuckerctl
from tuckerctl.analysis import analyze
from tuckerctl.compress import compress
from tuckerctl.tables import print_analysis

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-gqa"


@pytest.fixture(scope="module")
def example():
    return analyze(EXAMPLE, device="cpu")


def test_headline_states_the_ceiling_and_the_parameter_ratio(example):
    head = example["summary"]["headline"]
    assert 2 <= len(head) <= 4
    # Independent check of the facts the sentences state.
    key = [layer["pre"]["modes"]["key"] for layer in example["layers"]]
    assert all(m["numerical_rank"] == m["ceiling"] == 32 for m in key)
    assert any(line.startswith("The key and value modes sit exactly at the GQA ceiling (32") and "every layer" in line
               for line in head)
    orig = sum(layer["params"]["original"] for layer in example["layers"])
    tuck = sum(layer["params"]["tucker_0.99"] for layer in example["layers"])
    assert tuck > orig  # the example is not compressible at 0.99 energy
    pct = f"{100 * tuck / orig:.0f}%"
    assert any(pct in line and "not compressible" in line for line in head)
    # The same facts lead the JSON verdicts.
    assert example["summary"]["verdicts"][:len(head)] == head


def test_compressible_wording_when_tucker_is_smaller(example):
    import copy

    from tuckerctl.adapters import ModelSpec  # noqa: F401  (the spec type headline takes)
    from tuckerctl.analysis import headline

    doc = copy.deepcopy(example)
    for layer in doc["layers"]:
        layer["params"]["tucker_0.99"] = layer["params"]["original"] // 4

    class Spec:
        attention, kv_heads, head_dim, extras = "GQA", 2, 16, {}

    lines = headline(Spec(), doc["layers"])
    assert any("25% of today's" in line and "compressible at that accuracy" in line and "not" not in line
               for line in lines)


def test_tables_fit_80_columns_and_keep_the_ratio(example):
    c = Console(width=80, file=io.StringIO(), record=True, color_system=None)
    print_analysis(example, c)
    text = c.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for layer in example["layers"]:
        p = layer["params"]
        assert f"{100 * p['tucker_0.99'] / p['original']:.0f}%" in text
    assert "pre-softmax W (query-key)" in text and "post-softmax W̃ (value-output)" in text


def blocked_torch(*args):
    """Run the CLI in a process where importing torch fails: a usage error must come first."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['tuckerctl'] + sys.argv[1:]; "
            "from tuckerctl.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, hint", [
    (["analyze", EXAMPLE, "--layers", "3-1"], "'3-1' is a reversed range (did you mean 1-3?)"),
    (["analyze", EXAMPLE, "--layers", "one"], "cannot parse 'one'"),
    (["compress", EXAMPLE, "--ranks-post", "4,16,8", "-o", "/nonexistent/out"], "--ranks-post needs --ranks"),
    (["compress", EXAMPLE, "--ranks", "4,16,8", "--energy", "0.9", "-o", "/nonexistent/out"],
     "choose one way"),
    (["analyze", "no-such-model"], "org/name"),
])
def test_usage_errors_before_torch(args, hint):
    res = blocked_torch(*args)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and hint in lines[0], res.stderr


def test_analysis_json_given_as_checkpoint(example, tmp_path):
    import json

    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(example))
    for cmd in (["analyze", path], ["inspect", path], ["compress", path, "--ranks", "4,16,8", "-o", tmp_path / "o"]):
        res = blocked_torch(*cmd)
        assert res.returncode == 2 and "this is an analysis JSON" in res.stderr and "tuckerctl report" in res.stderr
    assert not (tmp_path / "o").exists()


def test_family_did_you_mean():
    from tuckerctl.adapters import family_adapter
    from tuckerctl.errors import InputError

    with pytest.raises(InputError, match="did you mean 'llama'"):
        family_adapter("lama")


def test_progress_shows_at_once_with_eta_and_unit():
    """On a terminal, something is drawn within a second or two of the start (not after
    torch's import), and the bar names what it counts and the time left."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "150", "TERM": "xterm"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tuckerctl", "analyze", str(EXAMPLE)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    out, first = b"", None
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        first = first or time.monotonic() - start
        out += chunk
    proc.wait(timeout=120)
    os.close(master)
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert first is not None and first < 5, first
    assert "starting (importing torch" in text and "layers" in text and "ETA" in text


def test_load_is_a_sequence(tmp_path):
    compress(EXAMPLE, tmp_path / "out", ranks="4,16,8", device="cpu")
    tk = tuckerctl.load(tmp_path / "out")
    assert len(tk) == 4 and tk.layers == [0, 1, 2, 3]
    assert tk[-1].index == 3 and [layer.index for layer in tk[1:3]] == [1, 2]
    assert [layer.index for layer in tk] == [0, 1, 2, 3]
    with pytest.raises(IndexError):
        tk[4]
    with pytest.raises(TypeError):
        tk["0"]
    with pytest.raises(KeyError):
        tk.layer(7)
    assert "layer 7 is not in this checkpoint" in str(pytest.raises(KeyError, tk.layer, 7).value)
