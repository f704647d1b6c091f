"""Property-based fuzzing of every parser tuckerctl owns, in-process.

Property, for any input: the parser (and what a command does next with its result)
returns normally, or raises an InputError whose message is one line; never another
exception, never a hang (an alarm per example), never an allocation beyond a bound
(the address space is capped at the current size + 2 GiB while the suite runs).

Parsers: safetensors headers (structured and raw bytes), shard indexes, config.json,
GGUF metadata, the compressed checkpoint's ``tuckerctl`` metadata, analysis JSON.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuckerctl.adapters import detect
from tuckerctl.errors import InputError
from tuckerctl.loader import open_checkpoint

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SLOW = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SECONDS_PER_EXAMPLE = 20

# JSON values, including the awkward ones: huge/negative ints, floats, deep-ish nesting.
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 10**12]),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


class Hang(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def bounded():
    """Cap the address space (bounded memory) and arm a per-example alarm (no hangs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), hard))

    def alarm(signum, frame):
        raise Hang("no answer within the time limit")

    old = signal.signal(signal.SIGALRM, alarm)
    yield
    signal.signal(signal.SIGALRM, old)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def holds(fn) -> str:
    """Run ``fn``; 'ok' or 'error' when the property holds, else raise."""
    signal.alarm(SECONDS_PER_EXAMPLE)
    try:
        fn()
        return "ok"
    except InputError as e:
        assert str(e).strip(), "an error must say what is wrong"
        return "error"
    finally:
        signal.alarm(0)


def _write_st(path: Path, header_bytes: bytes, data: bytes, length: int | None = None) -> None:
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header_bytes + data)


def _read_all(path) -> None:
    ckpt = open_checkpoint(path)
    for name in ckpt.names():
        if ckpt.dtype(name) in ("F32", "F16", "BF16", "F64"):
            ckpt.get(name)


# ----------------------------------------------------------------------------- safetensors headers

DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "F8_E4M3", "F8_E8M0", "C64", "F4", "XX", ""])
ENTRY = st.one_of(
    st.fixed_dictionaries({"dtype": DTYPES, "shape": st.lists(st.integers(-2, 10**7), max_size=3),
                           "data_offsets": st.lists(st.integers(-4, 400), min_size=0, max_size=3)}),
    JSON)


@FAST
@given(entries=st.dictionaries(st.text(max_size=6), ENTRY, max_size=4), meta=st.one_of(st.none(), JSON),
       data=st.binary(max_size=400), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       pad=st.sampled_from([b"", b" ", b"\0"]))
def test_safetensors_headers(tmp_path_factory, entries, meta, data, length, pad):
    header = dict(entries)
    if meta is not None:
        header["__metadata__"] = meta
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    _write_st(path, json.dumps(header).encode() + pad, data, length)
    holds(lambda: _read_all(path))


@FAST
@given(blob=st.binary(max_size=600))
def test_safetensors_raw_bytes(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("raw") / "model.safetensors"
    path.write_bytes(blob)
    holds(lambda: _read_all(path))


def test_deep_nesting_and_duplicates(tmp_path):
    path = tmp_path / "model.safetensors"
    for header in (b"[" * 100000 + b"]" * 100000, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                   b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b'{"x": NaN}'):
        _write_st(path, header, b"\0" * 4)
        assert holds(lambda: open_checkpoint(path)) == "error"


# ----------------------------------------------------------------------------- shard indexes

@pytest.fixture(scope="module")
def tiny(small_llama):
    return small_llama


SHARD = st.one_of(st.sampled_from(["model.safetensors", "../model.safetensors", "/etc/passwd", "./model.safetensors",
                                   "sub/../model.safetensors", "", ".", "..", "missing.safetensors",
                                   "link.safetensors"]), JSON)


@FAST
@given(doc=st.one_of(st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=8), SHARD, max_size=3)}),
                     JSON))
def test_shard_indexes(tiny, tmp_path_factory, doc):
    d = tmp_path_factory.mktemp("idx")
    shutil.copy(tiny / "model.safetensors", d / "model.safetensors")
    shutil.copy(tiny / "config.json", d / "config.json")
    os.symlink("/etc/hostname", d / "link.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))
    holds(lambda: open_checkpoint(d))


# ----------------------------------------------------------------------------- configs

CONFIG_KEYS = ["model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers", "attention_bias", "rope_theta", "text_config", "quantization_config",
               "query_pre_attn_scalar", "partial_rotary_factor", "tie_word_embeddings"]
CONFIG_VALUES = st.one_of(st.sampled_from(["llama", "qwen2", "gemma2", "gpt2", "bert", "deepseek_v3", "mamba"]),
                          st.sampled_from([0, 1, 2, 4, 16, -1, 10**8, 10**18, 1e8, 2.5, True]), JSON)


@SLOW
@given(edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), CONFIG_VALUES, max_size=4))
def test_configs(tiny, tmp_path_factory, edits):
    d = tmp_path_factory.mktemp("cfg")
    shutil.copy(tiny / "model.safetensors", d / "model.safetensors")
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(edits)
    (d / "config.json").write_text(json.dumps(cfg))

    def run():
        ckpt = open_checkpoint(d)
        adapter, spec = detect(ckpt)
        adapter.layer(ckpt, spec, 0)

    holds(run)


# ----------------------------------------------------------------------------- GGUF metadata

GGUF_FIELDS = {"block_count": "uint32", "embedding_length": "uint32", "attention.head_count": "uint32",
               "attention.head_count_kv": "uint32", "attention.key_length": "uint32",
               "attention.value_length": "uint32", "rope.dimension_count": "uint32", "rope.freq_base": "float32"}


@SLOW
@given(values=st.dictionaries(st.sampled_from(sorted(GGUF_FIELDS)),
                              st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 4, 8, 16, 10**6])),
                              max_size=4),
       arch=st.sampled_from(["llama", "qwen2", "gemma2", "phi3", "mamba"]),
       cut=st.one_of(st.none(), st.integers(0, 2000)))
def test_gguf_metadata(tiny, tmp_path_factory, values, arch, cut):
    import gguf

    from tuckerctl.gguf_reader import open_gguf

    d = tmp_path_factory.mktemp("gguf")
    path = d / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    base = {"block_count": 1, "embedding_length": 16, "attention.head_count": 4, "attention.head_count_kv": 2}
    for key, value in {**base, **values}.items():
        if GGUF_FIELDS[key] == "uint32":
            w.add_uint32(f"{arch}.{key}", int(value))
        else:
            w.add_float32(f"{arch}.{key}", float(value))
    gen = torch.Generator().manual_seed(0)
    for name, shape in (("attn_q", (16, 16)), ("attn_k", (8, 16)), ("attn_v", (8, 16)), ("attn_output", (16, 16))):
        w.add_tensor(f"blk.0.{name}.weight", torch.randn(*shape, generator=gen).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[:cut])

    def run():
        ckpt = open_gguf(path)
        adapter, spec = detect(ckpt)
        adapter.layer(ckpt, spec, 0)

    holds(run)


# ----------------------------------------------------------------------------- mutated documents

def _paths(doc, at=()):
    yield at
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield from _paths(v, (*at, i))


def _mutate(doc, data):
    """``doc`` with one node (drawn) replaced by a drawn JSON value, or deleted."""
    paths = list(_paths(doc))
    at = data.draw(st.sampled_from(paths[1:]))
    new = json.loads(json.dumps(doc))
    parent = new
    for k in at[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[at[-1]]
    else:
        parent[at[-1]] = data.draw(JSON)
    return new


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    from tuckerctl.compress import compress

    out = tmp_path_factory.mktemp("fuzz-ck") / "ck"
    compress(tiny, out, ranks="2,4,4", device="cpu", structure="tucker", hooi_iters=0)
    with open(out / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return out, header


@FAST
@given(data=st.data())
def test_compressed_metadata(compressed, tmp_path_factory, data):
    import tuckerctl

    src, header = compressed
    info = _mutate(json.loads(header["__metadata__"]["tuckerctl"]), data)
    d = tmp_path_factory.mktemp("ckm")
    shutil.copy(src / "config.json", d / "config.json")
    head = dict(header, __metadata__={"format": "pt", "tuckerctl": json.dumps(info)})
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])

    def run():
        ck = tuckerctl.load(d)
        for i in ck.layers:
            ck.layer(i)

    holds(run)


@pytest.fixture(scope="module")
def analysis(tiny):
    from tuckerctl.analysis import analyze

    return analyze(tiny, device="cpu", layers="0")


@FAST
@given(data=st.data())
def test_analysis_json(analysis, tmp_path_factory, data):
    from tuckerctl.report import load_analysis

    doc = _mutate(analysis, data)
    path = tmp_path_factory.mktemp("aj") / "a.json"
    path.write_text(json.dumps(doc))
    holds(lambda: load_analysis(path))
