"""Acceptance on real weights: full-rank (ceiling) compressed checkpoints of SmolLM2-135M
(GGUF) and MiniLM (safetensors) evaluated with ``tuckerctl eval`` on real text reproduce
the original models."""

import json

import pytest
from oracle import run_cli
from realmodels import needs_minilm, needs_smol
from textdata import write_texts


@pytest.mark.slow
@needs_smol
def test_smollm2_gguf_full_rank_round_trip_through_eval(smollm2_full_rank, tmp_path):
    src, out, comp = smollm2_full_rank  # compress --ranks 9,576,192 --hooi-iters 0
    _, text = write_texts(tmp_path / "text")
    assert comp["structure"] == "qk_input"  # the model's own RoPE, exactly
    res = run_cli("eval", out, "--against", src, "--text", text, "--max-tokens", "384", "--seq-len", "192",
                  "--json", "--quiet", "--max-kld", "1e-6", "--max-ppl-ratio", "1.0001")
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["model_kind"] == "causal_lm" and doc["method"] == "tucker" and doc["tokens"] == 382
    p = doc["perplexity"]
    assert abs(p["compressed"] / p["original"] - 1) <= 1e-4
    assert 5 < p["original"] < 100  # real text through a real model, not noise
    assert doc["kl_divergence"]["mean"] <= 1e-6
    assert doc["top1_agreement"] >= 0.999


@pytest.mark.slow
@needs_minilm
def test_minilm_full_rank_round_trip_through_eval(minilm_full_rank, tmp_path):
    src, out, _ = minilm_full_rank  # compress --ranks 12,385,385 --hooi-iters 0
    _, text = write_texts(tmp_path / "text")
    res = run_cli("eval", out, "--against", src, "--text", text, "--max-tokens", "500", "--seq-len", "256",
                  "--json", "--quiet")
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["model_kind"] == "encoder" and doc["tokens"] >= 500
    assert doc["cosine"]["mean"] >= 0.99999 and doc["cosine"]["min"] >= 0.9999
    assert doc["cosine"]["pooled_min"] >= 0.99999
