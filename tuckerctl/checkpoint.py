"""Lazy, validated reading of safetensors checkpoints (single file or sharded).

A :class:`Checkpoint` maps tensor names to lazily read float32 tensors. Nothing is
read until :meth:`Checkpoint.get` is called, so peak memory is bounded by what the
caller holds (one layer's attention weights). Headers are validated up front so that
a truncated file or a header that lies about sizes is a one-line :class:`InputError`,
not a crash halfway through an analysis.

GGUF files are read by :mod:`tuckerctl.gguf_reader`, which presents the same
interface with Hugging Face tensor names and config keys; :func:`tuckerctl.loader.open_checkpoint`
chooses between the two.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .strict import loads_strict, read_json, regular_file

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
    "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8,
}
# Other dtypes (sub-byte F4/F6, future ones) are accepted when the safetensors library
# accepts the file; they only fail if a tensor of that dtype is actually read.
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what the header says about it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in ``file``
    nbytes: int = 0


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return (tensors, __metadata__).

    The safetensors library is the judge of a file's validity (:func:`_library_check`, once
    per file). This parser stays because the library cannot do the rest of the job: it does
    not expose data offsets, which positioned reads (memory flat in the number of layers),
    byte-exact copies and content hashes need; and its errors do not name the tensor."""
    try:
        size = regular_file(path).stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise InputError(f"{path}: truncated or not safetensors (header length {n} "
                                 f"exceeds file size {size})")
            header_bytes = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    header = loads_strict(header_bytes, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not isinstance(dtype, str) or not all(_count(x) for x in (*shape, begin, end)):
            raise InputError(f"{path}: tensor {name!r}: dtype must be a string, shape and data_offsets "
                             f"non-negative integers")
        if dtype not in DTYPE_SIZES:
            tensors[name] = TensorInfo(path, dtype, shape, 8 + n + begin, end - begin)
            continue  # the library below decides whether the file is valid
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected or begin < 0:
            raise InputError(f"{path}: tensor {name!r} header lies about its size "
                             f"({end - begin} bytes for {dtype}{list(shape)}, expected {expected})")
        if end > data_size:
            raise InputError(f"{path}: truncated: tensor {name!r} ends at byte {end} "
                             f"but the file holds {data_size} data bytes")
        tensors[name] = TensorInfo(path, dtype, shape, 8 + n + begin, end - begin)
    _library_check(path)
    return tensors, metadata


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _library_check(path: Path) -> None:
    """Let the safetensors library's parser (Rust, fuzzed upstream) validate the header: it
    rejects overlapping, out-of-order or gapped offsets and trailing bytes, which the checks
    above do not look for. Opening maps the file lazily; no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise InputError(f"{path}: not a valid safetensors file ({reason})") from None


def _find_files(path: Path) -> tuple[list[Path], Path | None]:
    """Resolve a user path to (safetensors files, index file or None)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not path.is_dir():
        regular_file(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return [], path
        return [path], None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise InputError(f"{path}: several index files ({', '.join(p.name for p in indexes)})")
    if indexes:
        return [], indexes[0]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: no .safetensors file and no *.safetensors.index.json")
    if len(files) > 1 and (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    elif len(files) > 1:
        raise InputError(f"{path}: {len(files)} .safetensors files but no index.json to tie them")
    return files, None


def _read_index(index: Path, partial: bool = False) -> list[Path]:
    """The shards an index names; with ``partial``, only those present (a Hub snapshot
    fetched for analysis holds just the attention shards)."""
    data = read_json(index, "a safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: not a valid safetensors index ('weight_map' must map names to shard files)")
    files = sorted({_confined(index, v) for v in weight_map.values()})
    if partial:
        return [f for f in files if f.exists()]
    for f in files:
        if not f.exists():
            raise InputError(f"{index}: missing shard {f.name}")
    return files


def _confined(index: Path, name: str) -> Path:
    """The shard ``name`` of ``index``, which must stay inside the index's folder: no
    absolute paths, no ``..``, no symlink leading out (except into the ``blobs`` folder
    of the same Hugging Face cache repository, where snapshot files point)."""
    folder = index.parent
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\x00" in name:
        raise InputError(f"{index}: shard path {name!r} leaves the model folder")
    target = folder / rel
    real, home = Path(os.path.realpath(target)), Path(os.path.realpath(folder))
    blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else None
    if home not in real.parents and not (blobs is not None and blobs in real.parents):
        raise InputError(f"{index}: shard {name!r} is a link leading out of the model folder")
    return target


@dataclass
class Checkpoint:
    """A safetensors checkpoint opened lazily: names, shapes, dtypes; data on demand."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict | None = None
    config_path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "safetensors"
    name: str = ""  # what people call the model (Hub id, _name_or_path, GGUF general.name)
    revision: str | None = None

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> str:
        return self._info(name).dtype

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.path}: missing tensor {name!r}") from None

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Read one tensor, dequantising block-FP8 (``*_scale_inv``), as ``dtype``."""
        info = self._info(name)
        if info.dtype not in TORCH_DTYPES:
            raise InputError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, not a float")
        # A plain positioned read, not safetensors' mmap: mapped pages of every layer
        # read would stay in the resident set and make memory grow with model size.
        buf = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            if f.readinto(buf) != info.nbytes:
                raise InputError(f"{info.file}: truncated while reading tensor {name!r}")
        t = torch.frombuffer(buf, dtype=TORCH_DTYPES[info.dtype]).reshape(info.shape) if buf else \
            torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
        if info.dtype.startswith("F8"):
            t = self._dequantise_fp8(name, t)
        return require_finite(t.to(dtype), info.file, name)

    def _dequantise_fp8(self, name: str, t: torch.Tensor) -> torch.Tensor:
        scale_name = name + "_scale_inv"
        if scale_name not in self.tensors:
            raise InputError(f"{self.path}: FP8 tensor {name!r} has no {scale_name!r}")
        scale = self.get(scale_name, torch.float32)
        if t.ndim != 2 or scale.ndim != 2:
            raise InputError(f"{self.path}: FP8 tensor {name!r} or its scale is not a matrix")
        rows, cols = t.shape
        # The block cannot be read off the scale's shape (200 rows over 2 scale rows fits
        # any block from 100 to 199): take the config's, else DeepSeek's 128 x 128.
        quant = (self.config or {}).get("quantization_config") or {}
        br, bc = quant.get("weight_block_size") or (128, 128)
        if scale.shape != (math.ceil(rows / br), math.ceil(cols / bc)):
            raise InputError(f"{self.path}: {scale_name!r} has shape {tuple(scale.shape)}, "
                             f"which does not tile {name!r} {tuple(t.shape)} in {br}x{bc} blocks")
        if rows % br == 0 and cols % bc == 0:  # whole tiles: broadcast the scales, no scale-sized copy of W
            tiles = t.to(torch.float32).view(rows // br, br, cols // bc, bc)
            return tiles.mul_(scale[:, None, :, None]).view(rows, cols)
        full = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
        return t.to(torch.float32) * full

    def raw_bytes(self, name: str) -> bytes:
        """The tensor's stored bytes, exactly as on disk (for copying and hashing)."""
        info = self._info(name)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            return f.read(info.nbytes)

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))


def require_finite(t: torch.Tensor, file, name: str) -> torch.Tensor:
    """``t``, or an InputError naming the tensor when it holds NaN or Inf: corrupted
    weights must stop the command, not flow into spectra, factors or "passed" checks."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{file}: tensor {name!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''} "
                         f"(corrupted weights?)")
    return t


def load_config(path: Path) -> dict:
    """Read a config.json, naming the file in any error."""
    cfg = read_json(path, "config JSON")
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: config is not a JSON object")
    return cfg


def open_safetensors(path: Path, partial: bool = False) -> Checkpoint:
    """The safetensors checkpoint at ``path`` (a file, a sharded directory with its index, or a
    directory with one file); ``partial``: an index may name shards that are absent (a Hub
    download that skipped them). Every header is validated here."""
    files, index = _find_files(path)
    if index is not None:
        files = _read_index(index, partial)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for f in files:
        found, meta = read_header(f)
        metadata.update(meta)
        for name, info in found.items():
            if name in tensors:
                raise InputError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    return Checkpoint(path=path, tensors=tensors, metadata=metadata)
