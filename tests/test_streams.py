"""analyze's concurrent path (tuckerctl.streams: several tensors at once, one CUDA stream per
thread) gives the document the one-after-the-other path gives."""

import json
import threading
from pathlib import Path

import pytest
import torch
from oracle import save_llama_attention

from tuckerctl import analysis
from tuckerctl.multilinear import SpectrumProblem
from tuckerctl.streams import StreamPool

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
