"""The benchmark script runs end to end on tiny shapes (``--smoke``), so it cannot rot unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_runs_every_benchmark(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as bench

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--suite", "full",
                          "--device", "cpu", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    (doc,) = [json.loads(f.read_text()) for f in (tmp_path / "out").glob("*-smoke.json")]
    assert doc["benchmarks"] == list(bench.BENCHMARKS)
    errors = [(r["benchmark"], r["note"]) for r in doc["rows"] if r["met?"] == "error"]
    assert not errors, errors
    assert {name for name in bench.BENCHMARKS} <= set(doc["details"])
    # torchrun with 2 processes gave the single process's results, also through the script.
    (same,) = [r for r in doc["rows"] if r["benchmark"].startswith("torchrun")]
    assert same["met?"] == "yes", same["note"]


def test_profile_analyze_runs_on_main(tmp_path, capsys):
    """benchmarks/profile_analyze.py drives main's stages (it once needed another branch's API)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_analyze

    assert profile_analyze.main([str(ROOT / "examples" / "tiny-gqa"), "--layers", "0-1", "--device", "cpu",
                                 "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "profile-analyze.json").read_text())
    assert rec["documents_equal"] is True and [r["layers"] for r in rec["analyze"]] == [2, 2]
    assert rec["stages"][0]["pre"]["analyze_tensor_s"] > 0 and "exact_gqa_s" in rec["stages"][0]["post"]
