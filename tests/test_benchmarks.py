"""The benchmark script runs end to end on tiny shapes (``--smoke``), so it cannot rot unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuckerctl.checkpoint import open_safetensors

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
                                 "--streams", "1:1:1,3:2:2", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "profile-analyze.json").read_text())
    assert rec["documents_equal"] is True and [r["layers"] for r in rec["analyze"]] == [2, 2]
    assert [(r["tensor_threads"], r["solver_threads"], r["layers_in_flight"]) for r in rec["analyze"]] == \
        [(1, 1, 1), (3, 2, 2)]
    assert rec["stages"][0]["pre"]["analyze_tensor_s"] > 0 and "exact_gqa_s" in rec["stages"][0]["post"]


def test_profile_compress_runs_on_main(tmp_path, capsys):
    """benchmarks/profile_compress.py: stage timings and compress() under two schedules, same records."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_compress

    assert profile_compress.main([str(ROOT / "examples" / "tiny-gqa"), "--ranks", "2,8,4", "--device", "cpu",
                                  "--settings", "1:1,3:2", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "profile-compress.json").read_text())
    assert rec["records_equal"] is True and [(r["threads"], r["layers_in_flight"]) for r in rec["compress"]] == \
        [(1, 1), (3, 2)]
    assert all(rec["stages"][key]["compress_tensor_hooi2_s"] > 0 for key in ("pre", "post"))
    with pytest.raises(SystemExit, match="THREADS:LAYERS"):
        profile_compress.main([str(ROOT / "examples" / "tiny-gqa"), "--settings", "4"])


def test_read_study_reads_back_what_it_wrote(tmp_path, capsys):
    """benchmarks/read_study.py: disk rates for each read plan, tuckerctl's reader on a checkpoint."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import read_study

    ckpt = ROOT / "examples" / "tiny-gqa" / "model.safetensors"
    assert read_study.main(["--dir", str(tmp_path), "--gb", "0.01", "--checkpoint", str(ckpt),
                            "--out", str(tmp_path / "out")]) == 0
    rec = json.loads((tmp_path / "out" / "read-study.json").read_text())
    assert len(rec["reads_MBps"]) == 9 and all(v > 0 for v in rec["reads_MBps"].values())
    assert rec["checkpoint_get"]["bytes"] == sum(i.nbytes for i in open_safetensors(ckpt).tensors.values())
    assert not (tmp_path / "read-study.bin").exists()
