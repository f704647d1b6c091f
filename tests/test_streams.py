"""analyze's and compress's concurrent paths (tuckerctl.streams: several tensors at once, one
CUDA stream per thread) give the document / checkpoint the one-after-the-other path gives."""

import json
import threading
from pathlib import Path

import pytest
import torch
from oracle import save_llama_attention

from tuckerctl import analysis, compress
from tuckerctl.multilinear import SpectrumProblem
from tuckerctl.streams import StreamPool, pipelined

LAYERS = 5  # save_llama_attention's default


def without_timing(doc):
    doc = json.loads(json.dumps(doc))
    doc["summary"].pop("seconds")
    return doc


def run(monkeypatch, model, device, threads):
    """analyze with ``threads`` = (tensor threads, eigensolver threads); also returns the threads
    analyze_tensor ran on and those the eigenvalue problems were solved on."""
    seen, solved = set(), set()
    inner, solve = analysis.analyze_tensor, SpectrumProblem.solve

    def spy(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return inner(*args, **kwargs)

    def solve_spy(self, *args):
        solved.add(threading.current_thread().name)
        return solve(self, *args)

    monkeypatch.setattr(analysis, "analyze_tensor", spy)
    monkeypatch.setattr(SpectrumProblem, "solve", solve_spy)
    if threads is not None:
        monkeypatch.setattr(analysis, "concurrency", lambda dev: threads)
    doc = analysis.analyze(model, device=device)
    monkeypatch.undo()
    return without_timing(doc), seen, solved


def test_threaded_pipeline_gives_the_sequential_document(tmp_path, monkeypatch):
    model = save_llama_attention(tmp_path / "m", torch.bfloat16, seed=11)
    here = threading.current_thread().name
    one, seen_one, solved_one = run(monkeypatch, model, "cpu", None)  # the CPU default: inline
    assert seen_one == solved_one == {here}
    three, seen_three, solved_three = run(monkeypatch, model, "cpu", (3, 2))
    assert len(seen_three) > 1 and all(name.startswith("tuckerctl-tensor") for name in seen_three)
    assert len(solved_three) > 1 and all(name.startswith("tuckerctl-eig") for name in solved_three)
    assert [layer["index"] for layer in three["layers"]] == list(range(LAYERS))
    assert three == one
    assert one["settings"]["rope_form"].startswith("RoPE offset-averaged")  # the cached averager is shared
    solved_here = run(monkeypatch, model, "cpu", (3, 1))  # eigensolves inline, on the tensor threads
    assert solved_here[0] == one and all(name.startswith("tuckerctl-tensor") for name in solved_here[2])


def test_pool_runs_inline_with_one_thread_and_raises_where_asked():
    pool = StreamPool(torch.device("cpu"), 1)
    here = threading.current_thread().name
    assert pool.submit(lambda: threading.current_thread().name).result() == here
    failed = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result()
    with StreamPool(torch.device("cpu"), 2) as pool:
        assert pool.submit(lambda x: x + 1, 41).result() == 42

        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streams_give_the_one_stream_document(tmp_path, monkeypatch):
    model = save_llama_attention(tmp_path / "m", torch.bfloat16, seed=11)
    # Streams first: torch's first CUDA linear algebra from several threads at once failed
    # ("lazy wrapper should be called at most once") before StreamPool loaded it up front.
    streams, seen, solved = run(monkeypatch, model, "cuda", None)  # the CUDA default: several streams
    one, _, _ = run(monkeypatch, model, "cuda", (1, 1))
    assert min(analysis.concurrency(torch.device("cuda"))) > 1 and len(seen) > 1 and len(solved) > 1
    assert streams == one


def test_pool_threads_sum_like_the_creating_thread(monkeypatch):
    # OpenMP's thread count is per thread: with one BLAS thread set here, workers that started from
    # the process default (one per core) summed in another order (tiny-gqa: 3.9e-14 apart in CI).
    model = Path(__file__).parents[1] / "examples" / "tiny-gqa"
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inline, _, _ = run(monkeypatch, model, "cpu", None)
        threaded, seen, _ = run(monkeypatch, model, "cpu", (3, 2))
    finally:
        torch.set_num_threads(saved)
    assert len(seen) > 1 and threaded == inline


def compressed(monkeypatch, model, out, device, setting):
    """compress at fixed ranks with ``setting`` = (threads, layers in flight) or None (the
    device's default): (record without timing, {file: bytes}, threads the tensors ran on)."""
    seen = set()
    inner = compress._compress_tensor

    def spy(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(compress, "_compress_tensor", spy)
    if setting is not None:
        monkeypatch.setattr(compress, "concurrency", lambda dev: setting)
    info = compress.compress(model, out, ranks="4,24,12", hooi_iters=2, device=device)
    monkeypatch.undo()
    info["summary"].pop("seconds")
    return info, {f.name: f.read_bytes() for f in sorted(Path(out).iterdir())}, seen


def test_compress_threads_give_the_sequential_checkpoint(tmp_path, monkeypatch):
    model = save_llama_attention(tmp_path / "m", torch.bfloat16, seed=5)
    here = threading.current_thread().name
    one, files_one, seen_one = compressed(monkeypatch, model, tmp_path / "one", "cpu", None)  # CPU: inline
    assert seen_one == {here}
    many, files_many, seen_many = compressed(monkeypatch, model, tmp_path / "many", "cpu", (3, 2))
    assert len(seen_many) > 1 and all(name.startswith("tuckerctl-tensor") for name in seen_many)
    assert [rec["index"] for rec in many["layers"]] == list(range(LAYERS))
    assert many == one
    assert files_many.keys() == files_one.keys() and files_many == files_one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compress_cuda_streams_give_the_one_stream_checkpoint(tmp_path, monkeypatch):
    model = save_llama_attention(tmp_path / "m", torch.bfloat16, seed=5)
    streams, files_streams, seen = compressed(monkeypatch, model, tmp_path / "streams", "cuda", None)
    one, files_one, _ = compressed(monkeypatch, model, tmp_path / "one", "cuda", (1, 1))
    assert compress.concurrency(torch.device("cuda"))[0] > 1 and len(seen) > 1
    assert streams == one and files_streams == files_one


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_pipelined_starts_window_minus_one_ahead_in_order(window):
    started = []
    handed = []
    for item, value in pipelined(range(6), lambda i: started.append(i) or i * i, window):
        handed.append(item)
        assert value == item * item
        # what has been started: the item handed out and up to window - 1 after it
        assert started == list(range(min(6, item + max(window, 1))))
    assert handed == list(range(6))
