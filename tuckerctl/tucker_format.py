"""The compressed checkpoint format: safetensors holding Tucker factors per layer.

Layout of an output directory::

    config.json                     copied from the source
    model.safetensors               or model-0000k-of-0000n.safetensors + model.safetensors.index.json (> 5 GB)

Tensors (float32 unless ``--dtype`` says otherwise), for every compressed layer ``i``::

    tucker.layers.{i}.pre.core    (r1, r2, r3)    pre-softmax (query-key) tensor W
    tucker.layers.{i}.pre.head    (H, r1)
    tucker.layers.{i}.pre.query   (m, r2)         m = d + 1 when q/k biases exist (last row: bias)
    tucker.layers.{i}.pre.key     (n, r3)
    tucker.layers.{i}.post.core   (r1', r2', r3') post-softmax (value-output) tensor Wt
    tucker.layers.{i}.post.head   (H, r1')
    tucker.layers.{i}.post.output (d, r2')
    tucker.layers.{i}.post.value  (n', r3')       n' = d + 1 when v has a bias
    tucker.layers.{i}.out_bias    (d,)            only when o_proj has a bias

and every non-attention tensor of the source, byte for byte. ``__metadata__`` holds
``"format": "pt"`` and ``"tuckerctl"``: a JSON string (schema ``tuckerctl.tucker/1``)
with the tool version, source path and content hash, the model spec, per-layer ranks
and measured errors, and the flags that lie outside the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .errors import InputError

SCHEMA = "tuckerctl.tucker/1"
SHARD_BYTES = 5 * 1024 ** 3
TENSOR_PREFIX = "tucker.layers"
PARTS = {"pre": ("core", "head", "query", "key"), "post": ("core", "head", "output", "value")}
_TORCH_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def factor_name(layer: int, tensor: str, part: str) -> str:
    return f"{TENSOR_PREFIX}.{layer}.{tensor}.{part}"


def content_hash(ckpt: Checkpoint, names: list[str]) -> str:
    """sha256 over the stored bytes of ``names`` (sorted) and the config: identifies
    the weights a compressed checkpoint came from."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update(ckpt.raw_bytes(name) if hasattr(ckpt, "raw_bytes") and ckpt.format == "safetensors"
                 else ckpt.get(name).numpy().tobytes())
    h.update(json.dumps(ckpt.config or {}, sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ writing

@dataclass
class _Entry:
    """One tensor to write: either bytes copied from the source or a torch tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: Checkpoint | None = None
    tensor: torch.Tensor | None = None

    def data(self) -> bytes:
        if self.tensor is not None:
            return self.tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        return self.source.raw_bytes(self.name)


def _write_shard(path: Path, entries: list[_Entry], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep data 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:  # one tensor in memory at a time
            f.write(e.data())
        f.flush()
        os.fsync(f.fileno())


def _shards(entries: list[_Entry], limit: int) -> list[list[_Entry]]:
    out: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if out[-1] and size + e.nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(e)
        size += e.nbytes
    return out


def write_checkpoint(out_dir: Path, source: Checkpoint, replaced: set[str], factors: dict[str, torch.Tensor],
                     info: dict, overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write a compressed checkpoint directory atomically.

    Everything is written into a temp directory beside ``out_dir`` and renamed into
    place at the end, so an interrupted run leaves no partial output. ``replaced``
    are the source tensors not copied (the attention projections)."""
    out_dir = Path(out_dir)
    src_root = (source.path if source.path.is_dir() else source.path.parent).resolve()
    if out_dir.resolve() == src_root or out_dir.resolve() == source.path.resolve():
        raise InputError(f"{out_dir}: refusing to write over the input checkpoint")
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir}: already exists (use --overwrite to replace it)")
    entries = [_Entry(n, source.dtype(n), source.shape(n), source.tensors[n].nbytes, source=source)
               for n in source.names() if n not in replaced] if source.format == "safetensors" else []
    for name, t in factors.items():
        entries.append(_Entry(name, _TORCH_DTYPES[t.dtype], tuple(t.shape), t.numel() * t.element_size(),
                              tensor=t))
    metadata = {"format": "pt", "tuckerctl": json.dumps(info)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the output is an ordinary directory
    try:
        groups = _shards(entries, shard_bytes)
        if len(groups) == 1:
            _write_shard(tmp / "model.safetensors", groups[0], metadata)
        else:
            n = len(groups)
            weight_map = {}
            for k, group in enumerate(groups, 1):
                fname = f"model-{k:05d}-of-{n:05d}.safetensors"
                _write_shard(tmp / fname, group, metadata)
                weight_map.update({e.name: fname for e in group})
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries), "tuckerctl": info},
                     "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if source.config is not None:
            (tmp / "config.json").write_text(json.dumps(source.config, indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(out_dir.iterdir())


# ------------------------------------------------------------------ reading

@dataclass
class TuckerLayer:
    """One compressed layer: cores and factors of both tensors, plus the output bias."""

    index: int
    pre_core: torch.Tensor
    pre_factors: list[torch.Tensor]
    post_core: torch.Tensor
    post_factors: list[torch.Tensor]
    out_bias: torch.Tensor | None
    info: dict  # the layer's metadata record (ranks, errors)


class TuckerCheckpoint:
    """A compressed checkpoint opened lazily (``tuckerctl.load``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ckpt = open_checkpoint(self.path)
        raw = self.ckpt.metadata.get("tuckerctl")
        if raw is None:
            raise InputError(f"{self.path}: not a tuckerctl checkpoint (no 'tuckerctl' metadata)")
        try:
            self.info = json.loads(raw)
        except ValueError:
            raise InputError(f"{self.path}: corrupted 'tuckerctl' metadata (not JSON)") from None
        if self.info.get("schema") != SCHEMA:
            raise InputError(f"{self.path}: unsupported schema {self.info.get('schema')!r} (expected {SCHEMA})")
        self.spec: dict = self.info["model"]
        self._layers = {rec["index"]: rec for rec in self.info["layers"]}

    @property
    def layers(self) -> list[int]:
        return sorted(self._layers)

    def layer(self, i: int, device=None, dtype=torch.float32) -> TuckerLayer:
        if i not in self._layers:
            raise InputError(f"{self.path}: layer {i} is not in this checkpoint (has {self.layers})")

        def get(name):
            return self.ckpt.get(name, dtype).to(device)

        parts = {t: [get(factor_name(i, t, p)) for p in PARTS[t]] for t in PARTS}
        bias_name = f"{TENSOR_PREFIX}.{i}.out_bias"
        bias = get(bias_name) if bias_name in self.ckpt else None
        for t, (core, *fs) in parts.items():
            if tuple(core.shape) != tuple(f.shape[1] for f in fs):
                raise InputError(f"{self.path}: layer {i} {t}: core {list(core.shape)} does not match its "
                                 f"factors {[list(f.shape) for f in fs]}")
        return TuckerLayer(i, parts["pre"][0], parts["pre"][1:], parts["post"][0], parts["post"][1:], bias,
                           self._layers[i])

    def __getitem__(self, i: int) -> TuckerLayer:
        return self.layer(i)

    def __iter__(self):
        return (self.layer(i) for i in self.layers)

    def __repr__(self) -> str:
        return (f"TuckerCheckpoint({str(self.path)!r}, family={self.spec.get('family')!r}, "
                f"layers={len(self.layers)})")


def load(path) -> TuckerCheckpoint:
    """Open a compressed checkpoint directory (or its model.safetensors)."""
    return TuckerCheckpoint(Path(path))


def read_layer(path, layer: int, device=None):
    """(spec, pre_core, pre_factors, post_core, post_factors, out_bias) of one layer."""
    ck = load(path)
    t = ck.layer(layer, device)
    return ck.spec, t.pre_core, t.pre_factors, t.post_core, t.post_factors, t.out_bias

