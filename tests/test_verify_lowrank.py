"""``verify`` on per-matrix SVD checkpoints (``compress --method svd``, schema
``tuckerctl.lowrank/1``): errors checked against transformers' own projection weights,
corrupted bytes and a different source refused."""

from __future__ import annotations

import json

import pytest
import torch
from oracle import assert_user_error, run_cli
from safetensors.torch import load_file

from tuckerctl.compress import compress
from tuckerctl.verify import verify


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """A 2-layer GQA Qwen2 (q/k/v biases: the homogeneous last row of the factors)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(1)
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=32, vocab_size=50)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    model.save_pretrained(path)
    return path


def _reference(path: str) -> dict:
    """{(layer, role): the projection as y = [x, 1] W, from transformers' state dict}."""
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).state_dict()
    out = {}
    for i in range(2):
        for role in "qkvo":
            pre = f"model.layers.{i}.self_attn.{role}_proj"
            W = sd[f"{pre}.weight"].T
            if role != "o" and f"{pre}.bias" in sd:
                W = torch.cat([W, sd[f"{pre}.bias"][None]])
            out[(i, role)] = W
    return out


@pytest.mark.parametrize("params", [0.5, 0.8])
def test_errors_match_the_models_own_weights(biased, tmp_path, params):
    out = tmp_path / "svd"
    compress(biased, out, method="svd", params=params, device="cpu")
    doc = verify(out, biased, device="cpu")
    assert doc["method"] == "svd" and doc["passed"] is None
    stored = load_file(out / "model.safetensors")
    ref = _reference(str(biased))
    some_cut = False
    for row in doc["layers"]:
        for role, m in row["matrices"].items():
            key = f"lowrank.layers.{row['index']}.{role}"
            W_hat = stored.get(f"{key}.weight")
            W_hat = (stored[f"{key}.down"] @ stored[f"{key}.up"] if W_hat is None else W_hat).double()
            W = ref[(row["index"], role)]
            want = float((W_hat - W).norm() / W.norm())
            assert m["rel_error"] == pytest.approx(want, rel=1e-6, abs=1e-12)
            assert m["rel_error"] == pytest.approx(m["reported_error"], rel=1e-6, abs=1e-12)
            some_cut |= m["rank"] is not None and m["rel_error"] > 1e-3
        # a cut shows in the attention itself, and only then
        assert (row["output_rel_error"] > 1e-4) == (max(m["rel_error"] for m in row["matrices"].values()) > 1e-3)
    assert some_cut
    assert doc["max_rel_error"] == max(m["rel_error"] for r in doc["layers"] for m in r["matrices"].values())


def test_kept_dense_is_exact(biased, tmp_path):
    out = tmp_path / "svd"
    compress(biased, out, method="svd", energy=1.0, device="cpu")
    doc = verify(out, biased, device="cpu", max_error=1e-9)
    assert doc["passed"] is True
    for row in doc["layers"]:
        assert row["logits_rel_error"] < 1e-12 and row["output_rel_error"] < 1e-12


def test_cli_bound_and_corruption(biased, tmp_path):
    out = tmp_path / "svd"
    compress(biased, out, method="svd", params=0.5, device="cpu")
    res = run_cli("verify", out, "--against", biased, "--max-error", "1e-6", "--json", "-q")
    assert res.code == 1, res.stderr
    assert json.loads(res.stdout)["passed"] is False
    assert run_cli("verify", out, "--against", biased, "--max-error", "0.99", "-q").code == 0
    # flip one byte in the last stored tensor's data: the digest names it
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-3] ^= 0x40
    (out / "model.safetensors").write_bytes(bytes(blob))
    assert_user_error(run_cli("verify", out, "--against", biased, "-q"), "sha256")


def test_different_source_refused(biased, tiny_llama, tmp_path):
    out = tmp_path / "svd"
    compress(biased, out, method="svd", params=0.5, device="cpu")
    assert_user_error(run_cli("verify", out, "--against", tiny_llama, "-q"), "different model")
