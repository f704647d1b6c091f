"""Shared fixtures: tiny checkpoints written by transformers (no network)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
