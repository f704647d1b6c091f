"""Reading safetensors: single files, shards, and every kind of broken input."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from tuckerctl.errors import InputError
from tuckerctl.loader import open_checkpoint


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


def test_single_file_reads_lazily_and_upcasts(tmp_path):
    a = torch.randn(4, 3).to(torch.bfloat16)
    write(tmp_path / "m.safetensors", {"a": a, "b": torch.ones(2)})
    ck = open_checkpoint(tmp_path / "m.safetensors")
    assert set(ck.names()) == {"a", "b"} and ck.dtype("a") == "BF16" and ck.shape("a") == (4, 3)
    got = ck.get("a")
    assert got.dtype == torch.float32 and torch.equal(got, a.float())


def test_sharded_directory_with_index(tmp_path):
    write(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    write(tmp_path / "model-00002-of-00002.safetensors", {"b": torch.zeros(3)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 20},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    ck = open_checkpoint(tmp_path)
    assert torch.equal(ck.get("b"), torch.zeros(3)) and torch.equal(ck.get("a"), torch.ones(2))


def test_missing_shard_names_it(tmp_path):
    write(tmp_path / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(InputError, match="missing shard model-00002-of-00002.safetensors"):
        open_checkpoint(tmp_path)


def test_truncated_file(tmp_path):
    p = tmp_path / "m.safetensors"
    write(p, {"a": torch.randn(64, 64)})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=r"truncated.*'a'"):
        open_checkpoint(p)


def test_header_that_lies_about_sizes(tmp_path):
    p = tmp_path / "m.safetensors"
    write(p, {"a": torch.randn(8, 8)})
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["a"]["shape"] = [16, 8]
    new = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    with pytest.raises(InputError, match=r"'a' header lies about its size"):
        open_checkpoint(p)


@pytest.mark.parametrize("content", [b"", b"abc", b"\xff" * 64])
def test_not_safetensors(tmp_path, content):
    p = tmp_path / "m.safetensors"
    p.write_bytes(content)
    with pytest.raises(InputError, match=str(p)):
        open_checkpoint(p)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(InputError, match="no .safetensors file"):
        open_checkpoint(tmp_path)


def test_config_beside_and_override(tmp_path, tiny_llama):
    ck = open_checkpoint(tiny_llama)
    assert ck.config["model_type"] == "llama"
    other = tmp_path / "c.json"
    other.write_text("{not json")
    with pytest.raises(InputError, match="c.json: not valid JSON"):
        open_checkpoint(tiny_llama, other)


def test_single_file_inside_directory_with_config(tmp_path, tiny_llama):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_llama, dst)
    ck = open_checkpoint(dst / "model.safetensors")
    assert ck.config is not None and ck.config["num_attention_heads"] == 8


def _raw_file(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case, header, data, reason", [
    ("overlapping offsets", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "invalid offset"),
    ("a gap before the data", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "invalid offset"),
    ("trailing bytes", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "not fully covered"),
])
def test_the_safetensors_library_judges_validity(tmp_path, case, header, data, reason):
    """Files our own size checks accept but the format forbids: the library's parser rejects
    them, as a one-line error naming the file."""
    from oracle import one_line_error

    p = tmp_path / "m.safetensors"
    _raw_file(p, header, b"\0" * data)
    one_line_error(lambda: open_checkpoint(p), str(p), "not a valid safetensors file", reason)
    _raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)  # control
    assert open_checkpoint(p).names() == ["a"]
