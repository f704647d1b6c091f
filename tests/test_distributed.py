"""`analyze` and `compress` under torchrun (2 gloo ranks on the CPU) give what one process gives,
and the eigensolver precision follows the stored dtype's tolerance."""

import json
import os
import subprocess
import sys

import pytest
import torch
from oracle import save_llama_attention
from safetensors.torch import load_file

from tuckerctl.analysis import analyze
from tuckerctl.checkpoint import read_header
from tuckerctl.compress import compress
from tuckerctl.multilinear import HeadStack, reduce, spectrum_problems

LAYERS = 5  # save_llama_attention's default


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tuckerctl", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def without_timing(doc):
    doc = json.loads(json.dumps(doc))
    doc["summary"].pop("seconds", None)
    return doc


@pytest.mark.slow
def test_analyze_two_ranks_equals_one_process(tmp_path):
    model = save_llama_attention(tmp_path / "m", torch.bfloat16, seed=7)
    single = analyze(model, device="cpu")
    out = tmp_path / "two.json"
    res = torchrun("analyze", model, "--device", "cpu", "--quiet", "--output", out)
    assert res.stdout == ""  # only rank 0 writes, and it writes the file
    two = json.loads(out.read_text())
    assert [layer["index"] for layer in two["layers"]] == list(range(LAYERS))
    assert without_timing(two) == without_timing(single)


@pytest.mark.slow
def test_compress_two_ranks_equals_one_process(tmp_path):
    model = save_llama_attention(tmp_path / "m", torch.float32, seed=7)
    one = compress(model, tmp_path / "one", params=0.5, hooi_iters=1, device="cpu")
    torchrun("compress", model, "-o", tmp_path / "two", "--params", "0.5", "--hooi-iters", "1",
             "--device", "cpu", "--no-check", "--quiet")
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("tucker.layers.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    info_a = json.loads(read_header(tmp_path / "one" / "model.safetensors")[1]["tuckerctl"])
    info_b = json.loads(read_header(tmp_path / "two" / "model.safetensors")[1]["tuckerctl"])
    assert info_a["layers"] == info_b["layers"] == one["layers"]
    assert info_a["settings"] == info_b["settings"]


def test_float32_eigensolver_within_its_stated_error():
    """The float32 eigensolve (mode_spectra's eig_dtype) errs by <= ~sqrt(eps32) sigma_1
    against float64."""
    g = torch.Generator().manual_seed(3)
    st = HeadStack(torch.randn(16, 640, 48, generator=g, dtype=torch.float64),
                   torch.randn(4, 640, 48, generator=g, dtype=torch.float64))
    _, problems = spectrum_problems(reduce(st))
    assert problems[1].gram  # the big left mode goes through its Gram
    for pb in problems:
        s64, s32 = pb.solve(torch.float64), pb.solve(torch.float32)
        assert s32.dtype == torch.float64 and s32.shape == s64.shape
        err = float((s32 - s64).abs().max() / s64[0])
        assert err < 3.5e-4, err


@pytest.mark.parametrize("env, cores, expected", [
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 32, "OMP_NUM_THREADS=16"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 8, "OMP_NUM_THREADS=4"),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 2, None),  # one core each: right
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "8"}, 32, None),  # the user chose
    ({"WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}, 32, None),  # not under torchrun
])
def test_thread_hint_only_when_torchrun_left_cores_idle(monkeypatch, env, cores, expected):
    from tuckerctl.distributed import thread_hint

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    hint = thread_hint()
    assert hint is None if expected is None else (expected in hint and "\n" not in hint)
