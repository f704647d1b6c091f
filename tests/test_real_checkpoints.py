"""Real public checkpoints from the package registry (installed by .ci/run with --no-deps):
MiniLM-L6 (BERT, safetensors) and SmolLM2-135M-Instruct (Llama GQA, GGUF Q4_1)."""

import json
from pathlib import Path

import pytest
from realmodels import MINILM, SMOL, needs_minilm, needs_smol

import tuckerctl
from tuckerctl.analysis import analyze


@pytest.mark.slow
@needs_minilm
def test_minilm_analyze_and_full_rank_compression(minilm_full_rank):
    doc = analyze(MINILM / "model")
    m = doc["model"]
    assert (m["family"], m["attention"], m["layers"], m["d"], m["heads"], m["head_dim"], m["bias"]) == \
        ("bert", "MHA", 6, 384, 12, 32, True)
    for layer in doc["layers"]:
        # Homogeneous coordinates: the query/key modes have size d + 1, but the stacked
        # [W_Q^h; b^h] is (d+1) x (H d_h) = 385 x 384, so the ceiling is 384.
        assert layer["pre"]["shape"] == [12, 385, 385] and layer["pre"]["modes"]["key"]["ceiling"] == 384
        assert layer["pre"]["modes"]["head"]["numerical_rank"] == 12
    _, out, doc = minilm_full_rank  # compress --ranks 12,385,385 --hooi-iters 0 --json
    check = doc["check"]
    for row in check["layers"]:
        assert row["pre"]["rel_error"] <= 1e-6 and row["post"]["rel_error"] <= 1e-6
        assert row["output_rel_error"] <= 1e-5
    # Non-attention weights are copied: the compressed directory still holds the embeddings.
    names = tuckerctl.load(out).ckpt.names()
    assert "embeddings.word_embeddings.weight" in names


@pytest.mark.slow
@needs_smol
def test_smollm2_gguf_ranks_follow_gqa_theory():
    doc = analyze(SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf")
    m = doc["model"]
    assert (m["family"], m["attention"], m["layers"], m["d"], m["heads"], m["kv_heads"], m["head_dim"]) == \
        ("llama", "GQA", 30, 576, 9, 3, 64)
    assert doc["source"]["format"] == "gguf"
    for layer in doc["layers"]:
        for key, mode in (("pre", "key"), ("post", "value")):
            mm = layer[key]["modes"][mode]
            # G * d_h = 192 exactly: the ceiling, reached structurally, and nothing beyond it; the
            # 4-bit quantisation noise (relative rms 0.08) hides the small directions.
            assert mm["ceiling"] == 192 and mm["structural_rank"] == 192 and len(mm["singular_values"]) == 192
            assert mm["singular_values"][-1] / mm["singular_values"][0] > 1e-5
            assert 0 < mm["numerical_rank"] <= 192 and mm["tol"] > 1e-2
        assert layer["pre"]["modes"]["key"]["numerical_rank"] < 192
        assert layer["pre"]["modes"]["head"]["structural_rank"] == 9
        assert layer["pre"]["modes"]["query"]["ceiling"] == 576
    assert any("GQA ceiling 192" in v and "30 of 30" in v for v in doc["summary"]["verdicts"])
    assert doc["settings"]["noise_model"]["dtype"] == "Q4_1"
    assert any("quantisation noise of the stored Q4_1" in v for v in doc["summary"]["verdicts"])


@pytest.mark.slow
@needs_smol
def test_smollm2_full_rank_compression_is_exact(smollm2_full_rank):
    _, _, doc = smollm2_full_rank  # compress --ranks 9,576,192 --hooi-iters 0 --max-error 1e-6 --json
    assert doc["check"]["passed"] and doc["check"]["max_rel_error"] <= 1e-6
    assert len(doc["check"]["layers"]) == 30


def test_gguf_source_is_named_by_its_general_name(smollm2_gguf):
    import gguf

    path = smollm2_gguf.path
    field = gguf.GGUFReader(path).fields["general.name"]  # read by gguf-py, the independent reader
    want = bytes(field.parts[field.data[0]]).decode()
    assert smollm2_gguf.name == want != path.stem


def test_config_name_or_path_names_the_model(tmp_path):
    import shutil

    from tuckerctl.loader import open_checkpoint

    example = Path(__file__).parents[1] / "examples" / "tiny-gqa"
    shutil.copytree(example, tmp_path / "snap")
    config = json.loads((tmp_path / "snap" / "config.json").read_text())
    (tmp_path / "snap" / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-gqa-v2"}))
    assert open_checkpoint(tmp_path / "snap").name == "org/tiny-gqa-v2"
    config["_name_or_path"] = "/abs/local/path"  # a local path says nothing: fall back to the folder name
    (tmp_path / "snap" / "config.json").write_text(json.dumps(config))
    assert open_checkpoint(tmp_path / "snap").name == "snap"
