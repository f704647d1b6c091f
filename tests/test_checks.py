"""Checks that cannot be fooled: corrupted checkpoints, non-finite weights, strict JSON."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from oracle import assert_user_error, run_cli
from safetensors.torch import load_file, save_file

import tuckerctl
from tuckerctl.compress import compress
from tuckerctl.errors import InputError
from tuckerctl.loader import open_checkpoint
from tuckerctl.outputs import dumps_strict
from tuckerctl.verify import worst


def _llama(path: Path, bias: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
                      intermediate_size=16, vocab_size=20, attention_bias=bias)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    src = _llama(root / "src")
    compress(src, root / "ck", ranks="2,8,8", device="cpu", structure="tucker")
    return src, root / "ck"


def _copy(ck: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in ck.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _poke(ck: Path, name: str, values: torch.Tensor) -> None:
    """Overwrite the stored bytes of tensor ``name`` in place (header untouched)."""
    info = open_checkpoint(ck).tensors[name]
    data = values.to(torch.float32).reshape(-1).numpy().tobytes()
    assert len(data) == info.nbytes
    with open(info.file, "r+b") as f:
        f.seek(info.offset)
        f.write(data)


@pytest.mark.parametrize("name,fill", [
    ("tucker.layers.0.pre.head", float("nan")),      # a factor all NaN
    ("tucker.layers.1.post.core", float("inf")),     # a core +Inf
    ("tucker.layers.0.post.value", 9e37),            # finite garbage: error would be ~1e38 and "pass"
])
def test_corrupted_bytes_are_caught(pair, tmp_path, name, fill):
    src, ck = pair
    bad = _copy(ck, tmp_path / "bad")
    shape = open_checkpoint(bad).shape(name)
    _poke(bad, name, torch.full(shape, fill))
    assert_user_error(run_cli("verify", bad, "--against", src, "--device", "cpu"), name, "digest")
    with pytest.raises(InputError, match="digest"):
        tuckerctl.load(bad).layer(int(name.split(".")[2]))
    # The intact original still verifies.
    assert run_cli("verify", ck, "--against", src, "--device", "cpu", "-q").code == 0


def _rewrite(ck: Path, edit_tensors=None, edit_info=None) -> None:
    """Rewrite model.safetensors with edited tensors and/or metadata (a forger's tool)."""
    path = ck / "model.safetensors"
    tensors = load_file(str(path))
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    info = json.loads(meta["tuckerctl"])
    if edit_tensors:
        edit_tensors(tensors, info)
    if edit_info:
        edit_info(info)
    meta["tuckerctl"] = json.dumps(info)
    save_file(tensors, str(path), metadata=meta)


def test_non_finite_with_a_forged_digest_is_still_caught(pair, tmp_path):
    src, ck = pair
    bad = _copy(ck, tmp_path / "bad")
    name = "tucker.layers.0.pre.core"

    def nan_core(tensors, info):
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        info["digests"][name] = hashlib.sha256(tensors[name].numpy().tobytes()).hexdigest()

    _rewrite(bad, nan_core)
    assert_user_error(run_cli("verify", bad, "--against", src, "--device", "cpu"), name, "NaN/Inf")


@pytest.mark.parametrize("edit,fragment", [
    (lambda info: info.pop("digests"), "no per-tensor digests"),
    (lambda info: info["digests"].pop("tucker.layers.1.pre.query"), "has no digest"),
    (lambda info: info.update(layers=[{"index": "0"}]), "'layers'"),
    (lambda info: info.update(model=[]), "'model'"),
    (lambda info: info.update(schema=7), "unsupported schema"),
])
def test_altered_metadata_is_refused(pair, tmp_path, edit, fragment):
    src, ck = pair
    bad = _copy(ck, tmp_path / "bad")
    _rewrite(bad, edit_info=edit)
    assert_user_error(run_cli("verify", bad, "--against", src, "--device", "cpu"), fragment)


def test_worst_keeps_nan_wherever_it_is():
    nan = float("nan")
    assert max([1.0, nan]) == 1.0  # why worst() exists
    for values in ([nan, 1.0, 2.0], [1.0, nan, 2.0], [1.0, 2.0, nan]):
        assert math.isnan(worst(values))
    assert worst([0.5, 2.0, 1.0]) == 2.0 and worst([]) == 0.0


def _set_source(src: Path, dst: Path, name_part: str, value: float) -> str:
    """Copy ``src`` to ``dst`` with one entry of the first tensor whose name contains ``name_part`` set."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(dst / "model.safetensors"))
    name = sorted(n for n in tensors if name_part in n)[0]
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_source_weights_exit_2_naming_the_tensor(pair, tmp_path, value):
    src, _ = pair
    name = _set_source(src, tmp_path / "m", "layers.1.self_attn.k_proj.weight", value)
    assert_user_error(run_cli("analyze", tmp_path / "m", "--device", "cpu", "-q"), name, "NaN/Inf")
    res = run_cli("compress", tmp_path / "m", "-o", tmp_path / "out", "--ranks", "2,8,8", "--device", "cpu")
    assert_user_error(res, name)
    assert not (tmp_path / "out").exists()


def test_nan_bias_is_reported_not_compressed(tmp_path):
    src = _llama(tmp_path / "src", bias=True)
    name = _set_source(src, tmp_path / "m", "layers.0.self_attn.v_proj.bias", float("nan"))
    res = run_cli("compress", tmp_path / "m", "-o", tmp_path / "out", "--ranks", "2,8,8", "--device", "cpu")
    assert_user_error(res, name, "NaN/Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "src"]


def test_json_is_strict(pair, tmp_path, capsys):
    with pytest.raises(InputError, match=r"layers\[1\]\.err"):
        dumps_strict({"layers": [{"err": 0.1}, {"err": float("nan")}]})
    src, ck = pair
    res = run_cli("verify", ck, "--against", src, "--device", "cpu", "--json", "-q", "--output", tmp_path / "v.json")
    assert res.code == 0, res.stderr

    def reject(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    doc = json.loads((tmp_path / "v.json").read_text(), parse_constant=reject)
    assert doc["passed"] is None and doc["max_rel_error"] < 1  # no --max-error: nothing to pass or fail
    meta = json.loads(open_checkpoint(ck).metadata["tuckerctl"], parse_constant=reject)
    assert set(meta["digests"]) == {n for n in open_checkpoint(ck).names() if n.startswith("tucker.")}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
