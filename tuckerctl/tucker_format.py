"""The compressed checkpoint format: safetensors holding Tucker factors per layer.

Layout of an output directory::

    config.json                     {"model_type": "tuckerctl", "source_config": <the source's config>, ...}:
                                    transformers refuses it (unknown model type) instead of loading the
                                    original architecture with random attention; `tuckerctl export` or
                                    `tuckerctl.patch` run it
    tokenizer*, generation_config.json, chat template, ...   copied from the source directory
    model.safetensors               or model-0000k-of-0000n.safetensors + model.safetensors.index.json (> 5 GB)

Tensors (in the source's dtype unless ``--dtype`` says otherwise), for every compressed
layer ``i``. The pre-softmax (query-key) tensor ``W`` is stored in one of two structures,
recorded per layer as ``"structure"`` in the metadata:

``tucker`` (3-mode Tucker, heads mixed through the core; exact only without RoPE)::

    tucker.layers.{i}.pre.core    (r1, r2, r3)
    tucker.layers.{i}.pre.head    (H, r1)
    tucker.layers.{i}.pre.query   (m, r2)         m = d + 1 when q/k biases exist (last row: bias)
    tucker.layers.{i}.pre.key     (n, r3)

``qk_input`` (only the input sides truncated; each head keeps its d_h coordinates, so the
model's own RoPE and qk-norm apply exactly: q_h = [x,1] U2 Q_h, k_g = [x,1] U3 K_g)::

    tucker.layers.{i}.pre.query        (m, r2)        U2
    tucker.layers.{i}.pre.key          (n, r3)        U3; the latent key [x,1] U3 is what a cache holds
    tucker.layers.{i}.pre.query_heads  (H, r2, d_h)   Q_h = U2^T A_h (before any qk-norm gain)
    tucker.layers.{i}.pre.key_groups   (G, r3, d_h)   K_g = U3^T B_g
    tucker.layers.{i}.pre.query_gain   (H, d_h)       only for qk-norm models: the norm gains
    tucker.layers.{i}.pre.key_gain     (G, d_h)       (as multiplied, i.e. 1 + w for Gemma3)

The post-softmax (value-output) tensor is always a 3-mode Tucker (it carries no RoPE)::

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
import math
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import InputError
from .loader import open_checkpoint
from .outputs import claim, dumps_strict
from .strict import loads_strict

SCHEMA = "tuckerctl.tucker/1"
TUCKER, QK_INPUT = "tucker", "qk_input"  # structures of the pre-softmax tensor
PER_HEAD = "per_head"  # the value-output tensor's per-head structure (its record's "structure")
SHARD_BYTES = 5 * 1024 ** 3
TENSOR_PREFIX = "tucker.layers"
PARTS = {"pre": ("core", "head", "query", "key"), "post": ("core", "head", "output", "value")}
QK_INPUT_PARTS = ("query", "key", "query_heads", "key_groups")
PER_HEAD_PARTS = ("output", "value", "output_heads", "value_groups")
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


def source_record(path, ckpt: Checkpoint, names) -> dict:
    """A compressed checkpoint's ``source`` record (both methods): the source's path and
    format, and the :func:`content_hash` of the tensors it was made from."""
    return {"path": str(path), "format": ckpt.format, "sha256": content_hash(ckpt, sorted(names))}


# ------------------------------------------------------------------ writing

# Files beside the weights that users expect to travel with a model.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
             "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
             "generation_config.json", "preprocessor_config.json")
CONFIG_MODEL_TYPE = "tuckerctl"


def wrapped_config(config: dict) -> dict:
    """The compressed directory's config.json: NOT loadable as the source architecture
    (its attention tensors are gone), with the source's config kept for export/patch."""
    return {"model_type": CONFIG_MODEL_TYPE, "architectures": ["TuckerctlCompressed"],
            "note": "a tuckerctl compressed checkpoint: run it with tuckerctl.patch(model, dir) on the original "
                    "model, or convert it with `tuckerctl export DIR -o HF_DIR` for plain transformers",
            "source_config": config}

@dataclass
class _Entry:
    """One tensor to write: either bytes copied from the source or a torch tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: Checkpoint | None = None
    tensor: torch.Tensor | None = None
    loader: object = None  # () -> torch.Tensor, read when written (dequantised GGUF tensors)

    def data(self) -> bytes:
        t = self.tensor if self.tensor is not None else (self.loader() if self.loader is not None else None)
        if t is not None:
            return t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
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
                     info: dict, overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                     converted: dict[str, str] | None = None, config: dict | None = None) -> list[Path]:
    """Write a compressed checkpoint directory atomically.

    Everything is written into a temp directory beside ``out_dir`` and renamed into
    place at the end, so an interrupted run leaves no partial output. ``replaced``
    are the source tensors not copied (the attention projections). ``converted``
    (non-safetensors sources): {source name: output name} of tensors written as float32,
    read one at a time. ``config``: the source config to record (default the source's)."""
    out_dir = Path(out_dir)
    files = sorted({t.file for t in source.tensors.values()})
    target = claim(out_dir, "checkpoint", inputs=[source.path, source.config_path, *files], overwrite=overwrite)
    entries = [_Entry(n, source.dtype(n), source.shape(n), source.tensors[n].nbytes, source=source)
               for n in source.names() if n not in replaced] if source.format == "safetensors" else []
    for name, new in (converted or {}).items():
        if name not in replaced:
            shape = tuple(source.shape(name))
            entries.append(_Entry(new, "F32", shape, 4 * math.prod(shape),
                                  loader=lambda n=name: source.get(n, torch.float32)))
    for name, t in factors.items():
        entries.append(_Entry(name, _TORCH_DTYPES[t.dtype], tuple(t.shape), t.numel() * t.element_size(),
                              tensor=t))
    # Per-tensor sha256 of the written factor bytes: load()/verify recompute them, so bytes
    # overwritten after writing (even with finite values) are caught.
    info["digests"] = {e.name: hashlib.sha256(e.data()).hexdigest() for e in entries if e.tensor is not None}
    metadata = {"format": "pt", "tuckerctl": dumps_strict(info, "compressed metadata")}
    with target.staging() as tmp:
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
            (tmp / "model.safetensors.index.json").write_text(dumps_strict(index, indent=1))
        config = config if config is not None else source.config
        if config is not None:
            (tmp / "config.json").write_text(dumps_strict(wrapped_config(config), "config", indent=2))
        src_dir = source.path if source.path.is_dir() else source.path.parent
        if source.format == "safetensors":  # a GGUF's directory is not the model's
            for fname in AUX_FILES:
                if (src_dir / fname).is_file():
                    shutil.copyfile(src_dir / fname, tmp / fname)
    return sorted(out_dir.iterdir())


# ------------------------------------------------------------------ reading

@dataclass
class TuckerLayer:
    """One compressed layer: both tensors' factors, plus the output bias.

    ``structure`` ``tucker``: ``pre_core`` and ``pre_factors`` = [U1, U2, U3].
    ``structure`` ``qk_input``: ``pre_core`` is None, ``pre_factors`` = [None, U2, U3] and
    ``query_heads`` (H, r2, d_h), ``key_groups`` (G, r3, d_h) hold the per-head coordinates;
    ``query_gain``/``key_gain`` the qk-norm gains (None without qk-norm). A query or key
    subspace not written (that side kept whole) reads as the identity.

    ``post_structure`` ``per_head``: ``output_heads`` (H, r2, d_v) and ``value_groups``
    (G, r3, d_v) hold the stored coordinates; ``post_core``/``post_factors`` are their
    exact 3-mode view (U1 = I, core_h = O_h V_g^T, absent subspaces = I), which every
    runner reads (it is H r2 r3 numbers in memory, more than the stored form)."""

    index: int
    pre_core: torch.Tensor | None
    pre_factors: list[torch.Tensor | None]
    post_core: torch.Tensor
    post_factors: list[torch.Tensor]
    out_bias: torch.Tensor | None
    info: dict  # the layer's metadata record (ranks, errors)
    structure: str = TUCKER
    query_heads: torch.Tensor | None = None
    key_groups: torch.Tensor | None = None
    query_gain: torch.Tensor | None = None
    key_gain: torch.Tensor | None = None
    post_structure: str = TUCKER
    output_heads: torch.Tensor | None = None
    value_groups: torch.Tensor | None = None

    @property
    def pre(self) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The query-key tensor as a plain Tucker ``(core, [U1, U2, U3])``, which unpacks and
        feeds ``tensorly.tucker_to_tensor`` like TensorLy's own; None in the qk_input structure
        (no core: see :meth:`pre_mixers`)."""
        return None if self.pre_core is None else (self.pre_core, self.pre_factors)

    @property
    def post(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The value-output tensor as a plain Tucker ``(core, [U1, U2, U3])`` (see :attr:`pre`)."""
        return self.post_core, self.post_factors

    def pre_mixers(self) -> torch.Tensor:
        """M_h (H, r2, r3) with W_hat[h] = U2 M_h U3^T, whatever the structure (the
        zero-offset form; qk-norm gains included, the per-token 1/rms factors not)."""
        if self.structure == TUCKER:
            return torch.einsum("hj,jab->hab", self.pre_factors[0], self.pre_core)
        Q, K = self.query_heads, self.key_groups
        H, G = Q.shape[0], K.shape[0]
        if self.query_gain is not None:
            Q = Q * self.query_gain[:, None, :]
        if self.key_gain is not None:
            K = K * self.key_gain[:, None, :]
        return Q @ K[torch.arange(H, device=Q.device) // (H // G)].transpose(1, 2)


class MissingLayer(InputError, KeyError):
    """``TuckerCheckpoint.layer(i)`` for a layer index the checkpoint does not hold: a
    ``KeyError`` for library users, an input error (exit 2) for the command line."""

    __str__ = Exception.__str__  # KeyError would quote the message


def digests_of(path, info: dict) -> dict:
    """The per-tensor sha256 digests of a compressed checkpoint's metadata record."""
    digests = info.get("digests") if isinstance(info, dict) else None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise InputError(f"{path}: 'tuckerctl' metadata has no per-tensor digests (altered, or written "
                         f"before digests existed: compress again)")
    return digests


def check_digest(ckpt: Checkpoint, digests: dict, name: str) -> None:
    """InputError unless the stored bytes of tensor ``name`` hash to the digest written with them."""
    want = digests.get(name)
    if want is None:
        raise InputError(f"{ckpt.path}: tensor {name!r} has no digest in the metadata (altered checkpoint)")
    if hashlib.sha256(ckpt.raw_bytes(name)).hexdigest() != want:
        raise InputError(f"{ckpt.path}: tensor {name!r} does not match its sha256 digest "
                         f"(corrupted or altered bytes)")


class TuckerCheckpoint(Sequence):
    """A compressed checkpoint opened lazily (``tuckerctl.load``): a sequence of its
    layers in order (``len``, ``ck[k]``, negative positions, slices, iteration; a
    position out of range raises ``IndexError``). ``ck.layer(i)`` reads by the model's
    layer index and raises :class:`MissingLayer` (a ``KeyError``) for an absent one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ckpt = open_checkpoint(self.path)
        raw = self.ckpt.metadata.get("tuckerctl")
        if raw is None:
            raise InputError(f"{self.path}: not a tuckerctl checkpoint (no 'tuckerctl' metadata)")
        self.info = loads_strict(raw, f"{self.path}: 'tuckerctl' metadata")
        if not isinstance(self.info, dict) or self.info.get("schema") != SCHEMA:
            schema = self.info.get("schema") if isinstance(self.info, dict) else None
            raise InputError(f"{self.path}: unsupported schema {schema!r} (expected {SCHEMA})")
        self.spec, layers, self._digests = (self.info.get(k) for k in ("model", "layers", "digests"))
        if not isinstance(self.spec, dict):
            raise InputError(f"{self.path}: 'tuckerctl' metadata field 'model' must be an object")
        if not isinstance(layers, list) or not all(
                isinstance(r, dict) and isinstance(r.get("index"), int) and not isinstance(r["index"], bool)
                and all(isinstance(r.get(k, {}), dict) for k in ("pre", "post")) for r in layers):
            raise InputError(f"{self.path}: 'tuckerctl' metadata field 'layers' must be a list of layer records "
                             f"with an integer 'index'")
        digests_of(self.path, self.info)
        self._layers = {rec["index"]: rec for rec in layers}

    def check_digest(self, name: str) -> None:
        """InputError unless the stored bytes of ``name`` hash to the digest written with them."""
        check_digest(self.ckpt, self._digests, name)

    @property
    def source_config(self) -> dict | None:
        """The source model's config.json (kept under ``source_config``)."""
        cfg = self.ckpt.config or None
        if cfg and cfg.get("model_type") == CONFIG_MODEL_TYPE:
            return cfg.get("source_config")
        return cfg

    @property
    def layers(self) -> list[int]:
        return sorted(self._layers)

    def layer(self, i: int, device=None, dtype=torch.float32) -> TuckerLayer:
        if i not in self._layers:
            raise MissingLayer(f"{self.path}: layer {i} is not in this checkpoint (has {self.layers})")

        def get(name):
            self.check_digest(name)
            return self.ckpt.get(name, dtype).to(device)

        rec = self._layers[i]
        structure = rec.get("structure", TUCKER)
        if structure not in (TUCKER, QK_INPUT):
            raise InputError(f"{self.path}: layer {i} has unknown structure {structure!r}")
        post_structure = rec.get("post", {}).get("structure", TUCKER)
        if post_structure not in (TUCKER, PER_HEAD):
            raise InputError(f"{self.path}: layer {i} post has unknown structure {post_structure!r}")
        kinds = {}
        if post_structure == TUCKER:
            kinds["post"] = PARTS["post"]
        if structure == TUCKER:
            kinds["pre"] = PARTS["pre"]
        parts = {t: [get(factor_name(i, t, p)) for p in kinds[t]] for t in kinds}
        bias_name = f"{TENSOR_PREFIX}.{i}.out_bias"
        bias = get(bias_name) if bias_name in self.ckpt else None
        for t, (core, *fs) in parts.items():
            if tuple(core.shape) != tuple(f.shape[1] for f in fs):
                raise InputError(f"{self.path}: layer {i} {t}: core {list(core.shape)} does not match its "
                                 f"factors {[list(f.shape) for f in fs]}")
        H = self.spec.get("heads")
        if post_structure == PER_HEAD:
            U2, U3, Oc, Vc = self._per_head(i, "post", PER_HEAD_PARTS, get, H, self.spec.get("value_dim"))
            # The 3-mode view every runner reads: no head mixing (U1 = I), core_h = O_h V_g^T.
            heads = Oc.shape[0]
            core = Oc @ Vc[torch.arange(heads, device=Oc.device) // (heads // Vc.shape[0])].transpose(1, 2)
            post = (core, [torch.eye(heads, dtype=Oc.dtype, device=Oc.device), U2, U3])
        else:
            Oc = Vc = None
            post = (parts["post"][0], parts["post"][1:])
        if structure == TUCKER:
            return TuckerLayer(i, parts["pre"][0], parts["pre"][1:], *post, bias, rec,
                               post_structure=post_structure, output_heads=Oc, value_groups=Vc)
        U2, U3, Q, K = self._per_head(i, "pre", QK_INPUT_PARTS, get, H, self.spec.get("head_dim"))
        gains = [get(factor_name(i, "pre", p)) if factor_name(i, "pre", p) in self.ckpt else None
                 for p in ("query_gain", "key_gain")]
        for name, g, rows in (("query_gain", gains[0], Q.shape[0]), ("key_gain", gains[1], K.shape[0])):
            if g is not None and tuple(g.shape) != (rows, Q.shape[2]):
                raise InputError(f"{self.path}: layer {i} pre.{name} has shape {list(g.shape)}, "
                                 f"expected {[rows, Q.shape[2]]}")
        return TuckerLayer(i, None, [None, U2, U3], *post, bias, rec, QK_INPUT, Q, K, gains[0], gains[1],
                           post_structure=post_structure, output_heads=Oc, value_groups=Vc)

    def _per_head(self, i: int, tensor: str, names, get, H, width):
        """(U2, U3, per-head coordinates, per-group coordinates) of a per-head structure;
        a subspace not written (a side kept whole) is the identity."""
        L, R = (get(factor_name(i, tensor, p)) for p in names[2:])
        U2, U3 = (get(factor_name(i, tensor, p)) if factor_name(i, tensor, p) in self.ckpt else None
                  for p in names[:2])
        if L.dim() != 3 or R.dim() != 3:
            raise InputError(f"{self.path}: layer {i} {tensor}: {names[2]} {list(L.shape)} and {names[3]} "
                             f"{list(R.shape)} must have 3 dimensions")
        U2 = torch.eye(L.shape[1], dtype=L.dtype, device=L.device) if U2 is None else U2
        U3 = torch.eye(R.shape[1], dtype=R.dtype, device=R.device) if U3 is None else U3
        if (U2.dim() != 2 or U3.dim() != 2 or L.shape[1] != U2.shape[1] or R.shape[1] != U3.shape[1]
                or L.shape[2] != R.shape[2] or (H is not None and L.shape[0] != H)
                or (width is not None and L.shape[2] != width) or R.shape[0] == 0 or L.shape[0] % R.shape[0]):
            raise InputError(f"{self.path}: layer {i} {tensor}: factors {list(U2.shape)}, {list(U3.shape)} "
                             f"do not match {names[2]} {list(L.shape)} and {names[3]} {list(R.shape)}")
        return U2, U3, L, R

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.layer(i) for i in self.layers[k]]
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"layer positions are integers or slices, not {type(k).__name__}")
        try:
            i = self.layers[k]
        except IndexError:
            raise IndexError(f"layer position {k} out of range ({len(self)} layers)") from None
        return self.layer(i)

    def __iter__(self):
        return (self.layer(i) for i in self.layers)

    def __repr__(self) -> str:
        return (f"TuckerCheckpoint({str(self.path)!r}, family={self.spec.get('family')!r}, "
                f"layers={len(self.layers)})")


def load(path) -> TuckerCheckpoint:
    """Open a compressed checkpoint directory (or its model.safetensors)."""
    return TuckerCheckpoint(Path(path))
