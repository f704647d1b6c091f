"""Hostile inputs: every one is a one-line exit 2 naming the file, never a hang or a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct

import pytest
import torch
from oracle import assert_user_error, run_cli
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def model(small_llama):
    return small_llama


def _copy(model, dst):
    shutil.copytree(model, dst)
    return dst


class Hung(Exception):
    pass


def _in_thread_with_timeout(fn, seconds=60):
    """``fn()`` under an alarm: a hang fails the test instead of stalling the suite."""
    def alarm(signum, frame):
        raise Hung(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("where", ["argument", "weights", "config", "index"])
def test_fifo_and_devices_do_not_hang(model, tmp_path, where):
    d = _copy(model, tmp_path / "m")
    if where == "argument":
        os.mkfifo(tmp_path / "x.safetensors")
        args = ["analyze", tmp_path / "x.safetensors"]
    elif where == "weights":
        (d / "model.safetensors").unlink()
        os.mkfifo(d / "model.safetensors")
        args = ["analyze", d]
    elif where == "config":
        (d / "config.json").unlink()
        os.mkfifo(d / "config.json")
        args = ["analyze", d]
    else:
        os.mkfifo(d / "model.safetensors.index.json")
        args = ["analyze", d]
    assert_user_error(_in_thread_with_timeout(lambda: run_cli(*args)), "not a regular file")
    assert_user_error(run_cli("analyze", "/dev/zero"), "/dev/zero")


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "link.safetensors"])
def test_shard_index_confined_to_the_model_folder(model, tmp_path, shard):
    d = _copy(model, tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes(b"SECRET-BYTES" * 10)
    os.symlink(tmp_path / "outside.safetensors", d / "link.safetensors")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.0.self_attn.q_proj.weight": shard,
                        "x": "model-00001-of-00001.safetensors"}}))
    line = assert_user_error(run_cli("analyze", d), "model folder")
    assert "SECRET" not in line and "root:" not in line


def test_hf_cache_snapshot_links_are_accepted(model, tmp_path):
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    shutil.copy(model / "model.safetensors", blobs / "b1")
    shutil.copy(model / "config.json", blobs / "b2")
    os.symlink("../../blobs/b1", snap / "model-00001-of-00001.safetensors")
    os.symlink("../../blobs/b2", snap / "config.json")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00001.safetensors"}}))
    res = run_cli("analyze", snap, "--layers", "0", "-q")
    assert res.code == 0, res.stderr


@pytest.mark.parametrize("value", [10**12, 10**8])
def test_absurd_layer_count_fails_before_allocating(model, tmp_path, value):
    d = _copy(model, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = value
    (d / "config.json").write_text(json.dumps(cfg))
    assert_user_error(_in_thread_with_timeout(lambda: run_cli("analyze", d), 30), "missing tensor", str(value))


def _rewrite_header(path, edit, trailing=b""):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    text = edit(header)
    text = text if isinstance(text, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:] + trailing)


def test_unread_unknown_dtypes_do_not_make_the_file_unreadable(model, tmp_path):
    d = _copy(model, tmp_path / "m")
    from safetensors.torch import load_file

    tensors = load_file(str(d / "model.safetensors"))
    tensors["extra.scales"] = torch.zeros(4, dtype=torch.uint8)
    tensors["extra.complex"] = torch.zeros(2, dtype=torch.float64)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})

    def retag(h):
        h["extra.scales"]["dtype"] = "F8_E8M0"
        h["extra.complex"]["dtype"] = "C64"

    _rewrite_header(d / "model.safetensors", retag)
    res = run_cli("analyze", d, "--layers", "0", "-q")
    assert res.code == 0, res.stderr
    res = run_cli("compress", d, "-o", tmp_path / "out", "--ranks", "2,4,4", "--no-check", "-q")
    assert res.code == 0, res.stderr  # copied byte for byte


@pytest.mark.parametrize("case", ["overlap", "out-of-order", "trailing", "duplicate", "nan", "deep", "types"])
def test_malformed_headers_match_the_library(model, tmp_path, case):
    d = _copy(model, tmp_path / "m")
    path = d / "model.safetensors"
    if case == "trailing":
        _rewrite_header(path, lambda h: None, trailing=b"\0" * 8)
    elif case == "overlap":
        def overlap(h):
            names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
            a, b = h[names[0]], h[names[1]]
            if a["dtype"] == b["dtype"] and a["shape"] == b["shape"]:
                b["data_offsets"] = list(a["data_offsets"])
            else:
                a["data_offsets"][1] += 4
        _rewrite_header(path, overlap)
    elif case == "out-of-order":
        def swap(h):
            names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
            h[names[0]]["data_offsets"] = [o + 4 for o in h[names[0]]["data_offsets"]]
        _rewrite_header(path, swap)
    elif case == "duplicate":
        _rewrite_header(path, lambda h: json.dumps(h).encode()[:-1] + b', "model.norm.weight": '
                        + json.dumps(h["model.norm.weight"]).encode() + b"}")
    elif case == "nan":
        _rewrite_header(path, lambda h: json.dumps({**h, "__metadata__": {"x": "y"}}).encode()[:-1]
                        + b', "z": NaN}')
    elif case == "deep":
        _rewrite_header(path, lambda h: b"[" * 50000 + b"]" * 50000)
    else:
        _rewrite_header(path, lambda h: h["model.norm.weight"].update(shape=["16"]))
    assert_user_error(run_cli("analyze", d), "model.safetensors")


@pytest.mark.parametrize("name", ["[v1]", "[/x]", "[link=https://e.com]a[/link]", "a\x1b[31mred", "[bold]b"])
def test_markup_and_escapes_in_paths_are_printed_literally(tmp_path, name):
    p = tmp_path / name / "model.safetensors"
    line = assert_user_error(run_cli("analyze", p))
    shown = name.replace("\x1b", "\\x1b")
    assert shown in line.replace("https:/e", "https://e"), line
    assert "\x1b" not in line


def test_summary_md_escapes_what_it_embeds():
    from tuckerctl.report import _md

    text = _md("| [x](javascript:alert(1)) <script>\x1b *b* # h")
    assert "<script>" not in text and "[x](" not in text and "\x1b" not in text
    assert "\\|" in text and "\\[x\\]" in text


@pytest.mark.parametrize("args,fragment", [
    (["--max-error", "nan"], "--max-error"), (["--max-error", "-1"], "--max-error"), (["--tokens", "0"], "--tokens"),
    (["--no-check", "--max-error", "0.1"], "--no-check"), (["--energy", "nan"], "--energy"),
    (["--params", "inf"], "--params")])
def test_argument_errors_before_any_output(model, tmp_path, args, fragment):
    rank = [] if "--energy" in args or "--params" in args else ["--ranks", "2,4,4"]
    assert_user_error(run_cli("compress", model, "-o", tmp_path / "out", *rank, *args), fragment)
    assert not (tmp_path / "out").exists()
