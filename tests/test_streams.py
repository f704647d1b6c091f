"""analyze's concurrent path (tuckerctl.streams: several tensors at once, one CUDA stream per
thread) gives the document the one-after-the-other path gives."""

import json
import threading

import pytest
import torch
from oracle import save_llama_attention

from tuckerctl import analysis
from tuckerctl.streams import StreamPool

LAYERS = 5  # save_llama_attention's default


def without_timing(doc):
    doc = json.loads(json.dumps(doc))
    doc["summary"].pop("seconds")
    return doc


def run(monkeypatch, model, device, threads):
    """analyze with ``threads`` solver threads; also returns the threads analyze_tensor ran on."""
    seen = set()
    inner = analysis.analyze_tensor

    def spy(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(analysis, "analyze_tensor", spy)
    if threads is not None:
        monkeypatch.setattr(analysis, "solver_threads", lambda dev: threads)
    doc = analysis.analyze(model, device=device)
    monkeypatch.undo()
    return without_timing(doc), seen


def test_threaded_pipeline_gives_the_sequential_document(tmp_path, monkeypatch):
    model = save_llama_attention(tmp_path / "m", torch.bfloat16, seed=11)
    one, seen_one = run(monkeypatch, model, "cpu", None)  # the CPU default: inline
    assert seen_one == {threading.current_thread().name}
    three, seen_three = run(monkeypatch, model, "cpu", 3)
    assert len(seen_three) > 1 and threading.current_thread().name not in seen_three
    assert [layer["index"] for layer in three["layers"]] == list(range(LAYERS))
    assert three == one
    assert one["settings"]["rope_form"].startswith("RoPE offset-averaged")  # the cached averager is shared


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
    streams, seen = run(monkeypatch, model, "cuda", None)  # the CUDA default: SOLVER_STREAMS streams
    one, _ = run(monkeypatch, model, "cuda", 1)
    assert analysis.solver_threads(torch.device("cuda")) > 1 and len(seen) > 1
    assert streams == one
