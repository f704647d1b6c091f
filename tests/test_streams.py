"""analyze's concurrent path (tuckerctl.streams: several tensors at once, one CUDA stream per
thread) gives the document the one-after-the-other path gives."""

import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from tuckerctl import analysis
from tuckerctl.streams import StreamPool

D, H, G, DH, LAYERS = 48, 6, 2, 8, 5


def write_model(path):
    """A 5-layer Llama-named GQA checkpoint in bf16 (attention tensors only) with its config."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for i in range(LAYERS):
        a = f"model.layers.{i}.self_attn."
        tensors.update({a + "q_proj.weight": torch.randn(H * DH, D, generator=g),
                        a + "k_proj.weight": torch.randn(G * DH, D, generator=g),
                        a + "v_proj.weight": torch.randn(G * DH, D, generator=g),
                        a + "o_proj.weight": torch.randn(D, H * DH, generator=g),
                        f"model.layers.{i}.input_layernorm.weight": 1 + 0.1 * torch.randn(D, generator=g)})
    path.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": D, "num_attention_heads": H, "num_key_value_heads": G,
        "head_dim": DH, "num_hidden_layers": LAYERS, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}))
    return path


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
    model = write_model(tmp_path / "m")
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
    model = write_model(tmp_path / "m")
    # Streams first: torch's first CUDA linear algebra from several threads at once failed
    # ("lazy wrapper should be called at most once") before StreamPool loaded it up front.
    streams, seen = run(monkeypatch, model, "cuda", None)  # the CUDA default: SOLVER_STREAMS streams
    one, _ = run(monkeypatch, model, "cuda", 1)
    assert analysis.solver_threads(torch.device("cuda")) > 1 and len(seen) > 1
    assert streams == one
