"""index.html in a real headless Chromium (Debian's ``chromium``): the page opens from the
file system with no server, its script runs without console errors, it draws the
interactive chart, sorts its per-layer table (the page's own #selftest), and the
screenshot is not blank.

``.ci/run`` installs chromium when it is missing and sets TUCKERCTL_REQUIRE_BROWSER=1,
so in CI this test runs rather than skips."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tuckerctl.analysis import analyze
from tuckerctl.report import build_report

ROOT = Path(__file__).resolve().parents[1]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a headless start as root on a machine without network or display.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files"]

pytestmark = pytest.mark.skipif(BROWSER is None and not os.environ.get("TUCKERCTL_REQUIRE_BROWSER"),
                                reason="chromium not installed (.ci/run installs it)")


def chromium(tmp_path, *args):
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    a = analyze(ROOT / "examples" / "tiny-gqa", device="cpu", layers="0-2")
    b = analyze(ROOT / "examples" / "tiny-gqa", device="cpu", layers="1-3", energy=(0.5, 0.99))
    out = tmp_path_factory.mktemp("report")
    build_report([a, b], out, formats=("svg",))
    return out / "index.html"


@pytest.mark.slow  # starts chromium: ~45 s on 2 cores
def test_page_runs_clean_in_headless_chromium(page, tmp_path):
    assert BROWSER is not None, "TUCKERCTL_REQUIRE_BROWSER is set but chromium is missing"
    url = page.as_uri() + "#selftest"
    dom = chromium(tmp_path, "--virtual-time-budget=3000", "--enable-logging=stderr", "--v=0", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-ready="1"' in body and 'data-selftest="ok"' in body, body
    assert "data-error" not in body, body
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    # The script drew one point per layer and model, with tooltips naming the values.
    assert dom.stdout.count('class="point"') == 3 + 3
    assert "layer 2 · r(0.99) = " in dom.stdout
    # A click-free check of the sort: the table came back in ascending layer order.
    first_table = dom.stdout.split('class="sortable"')[1].split("</table>")[0]
    layers = [int(x) for x in re.findall(r'<tr><td data-sort="(\d+)"', first_table)]
    assert layers == sorted(layers) == [0, 1, 2]

    shot = tmp_path / "shot.png"
    res = chromium(tmp_path, "--window-size=1200,2400", "--hide-scrollbars", f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    assert float(np.std(pixels)) > 0.05  # not blank
    assert float((pixels.sum(axis=2) < 1.5).mean()) > 0.01  # dark text and lines drawn
