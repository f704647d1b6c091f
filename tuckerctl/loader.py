"""Opening a model: source → checkpoint → family adapter → layers.

Every command that reads weights goes through here: :func:`open_checkpoint` resolves a
path, cache folder or Hub id and dispatches on the format (safetensors in
:mod:`tuckerctl.checkpoint`, GGUF in :mod:`tuckerctl.gguf_reader`, which imports only
the former: no cycle), :func:`open_model` adds the family detection, and
:meth:`Model.layers` is the layer pipeline the commands iterate over.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from .adapters import Adapter, LayerWeights, ModelSpec, detect
from .checkpoint import Checkpoint, load_config, open_safetensors


def open_checkpoint(path: str | os.PathLike, config: str | os.PathLike | None = None,
                    revision: str | None = None, attention_only: bool = True) -> Checkpoint:
    """Open a ``.safetensors`` file, a sharded directory, a directory with one file,
    a ``.gguf`` file, a Hugging Face cache folder or a Hub model id (``org/name``, at
    ``revision``; see :mod:`tuckerctl.sources`). ``config`` overrides the
    ``config.json`` found beside it. ``attention_only``: a Hub download may skip the
    shards without attention tensors."""
    from .sources import display_name, resolve

    source = resolve(path, revision, attention_only)
    path = source.path
    if path.suffix == ".gguf":
        from .gguf_reader import open_gguf  # optional dependency

        ckpt = open_gguf(path)
    else:
        ckpt = open_safetensors(path, source.partial)
        beside = (path if path.is_dir() else path.parent) / "config.json"
        if config is None and beside.exists():
            config = beside
    if config is not None:
        ckpt.config = load_config(Path(config))
        ckpt.config_path = Path(config)
    ckpt.name = display_name(source, ckpt.config, ckpt.metadata)
    ckpt.revision = revision
    return ckpt


def iter_layers(adapter: Adapter, ckpt: Checkpoint, spec: ModelSpec, indices: Iterable[int],
                device: torch.device | None = None) -> Iterator[LayerWeights]:
    """Yield layers in order, reading layer i+1 in the background while i is used.

    With a CUDA ``device`` the background thread also uploads the layer (as read,
    float32), so the main thread only computes."""
    indices = list(indices)

    def read(i: int) -> LayerWeights:
        layer = adapter.layer(ckpt, spec, i)
        if device is None or device.type == "cpu":
            return layer
        return replace(layer, pre=layer.pre.to(device=device), post=layer.post.to(device=device),
                       out_bias=None if layer.out_bias is None else layer.out_bias.to(device))

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, indices[0]) if indices else None
        for k in range(len(indices)):
            current = pending.result()
            pending = pool.submit(read, indices[k + 1]) if k + 1 < len(indices) else None
            yield current


class Model(NamedTuple):
    """An opened checkpoint with its detected family (unpacks as ``ckpt, adapter, spec``)."""

    ckpt: Checkpoint
    adapter: Adapter
    spec: ModelSpec

    def layers(self, indices: Iterable[int], device: torch.device | None = None) -> Iterator[LayerWeights]:
        """The layers ``indices`` in order, prefetched (:func:`iter_layers`)."""
        return iter_layers(self.adapter, self.ckpt, self.spec, indices, device)


def open_model(path, config=None, *, revision: str | None = None, attention_only: bool = True,
               heads: int | None = None, kv_heads: int | None = None, head_dim: int | None = None,
               family: str | None = None) -> Model:
    """:func:`open_checkpoint` then :func:`tuckerctl.adapters.detect` (``heads`` etc. override
    or stand in for the config's fields)."""
    ckpt = open_checkpoint(path, config, revision=revision, attention_only=attention_only)
    adapter, spec = detect(ckpt, heads=heads, kv_heads=kv_heads, head_dim=head_dim, family=family)
    return Model(ckpt, adapter, spec)
