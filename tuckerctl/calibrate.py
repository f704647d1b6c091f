"""Calibration statistics: second moments of what multiplies each attention weight.

The original model (transformers) runs on calibration text; forward hooks on every
layer's projections accumulate, in float64,

* ``inputs``: E[x^T x] of the hidden states entering q/k/v (after the layer's norm),
  with the mean E[x] so that the homogeneous coordinates [x, 1] of biased layers get
  their exact second moment;
* ``attn_out``: E[z^T z] of the attention output entering o_proj (all heads
  concatenated, H d_v wide).

Text handling (reading a file, tokenizing, cutting windows) is shared with ``eval``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError, arg


def read_text(path) -> str:
    """The text of ``path`` (UTF-8); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a text file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise InputError(f"{path}: empty text")
    return text


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> Tensor:
    """1-D token ids of ``text`` without special tokens, cut to ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    if ids.numel() < 2:
        raise InputError("the text has fewer than 2 tokens")
    return ids


def windows(ids: Tensor, seq_len: int, wrap: tuple[int | None, int | None] = (None, None)) -> Iterator[Tensor]:
    """Consecutive non-overlapping windows of ``seq_len`` tokens (the last may be shorter,
    but has at least 2). ``wrap``: (first, last) special token ids put around each
    window (e.g. BERT's [CLS] ... [SEP]); they count towards ``seq_len``."""
    first, last = wrap
    inner = seq_len - (first is not None) - (last is not None)
    if inner < 2:
        raise InputError(f"{arg('seq_len', seq_len)} is too short")
    for s in range(0, ids.numel(), inner):
        chunk = ids[s:s + inner]
        if chunk.numel() < 2:
            break
        parts = ([torch.tensor([first])] if first is not None else []) + [chunk] + \
                ([torch.tensor([last])] if last is not None else [])
        yield torch.cat(parts)


@dataclass
class LayerMoments:
    """Second moments of one layer's attention inputs (float64, on the CPU)."""

    inputs: Tensor  # (d, d) E[x^T x]
    mean: Tensor  # (d,) E[x]
    attn_out: Tensor  # (H d_v, H d_v) E[z^T z]
    tokens: int
    _whiteners: dict = field(default_factory=dict, repr=False, compare=False)

    def whitener(self, size: int):
        """The :class:`~tuckerctl.whiten.Whitener` of the input moment of ``size`` (cached:
        the query, key and value sides of a layer share it)."""
        if size not in self._whiteners:
            from .whiten import whitener

            self._whiteners[size] = whitener(self.input_moment(size))
        return self._whiteners[size]

    def homogeneous(self) -> Tensor:
        """E[[x, 1]^T [x, 1]]: the moment of biased layers' homogeneous inputs."""
        d = self.mean.numel()
        out = torch.empty(d + 1, d + 1, dtype=torch.float64)
        out[:d, :d] = self.inputs
        out[:d, d] = out[d, :d] = self.mean
        out[d, d] = 1.0
        return out

    def input_moment(self, size: int) -> Tensor:
        """The input moment for a mode of ``size`` d or d + 1."""
        d = self.mean.numel()
        if size == d:
            return self.inputs
        if size == d + 1:
            return self.homogeneous()
        raise ValueError(f"no input moment of size {size} (d = {d})")


class _Accumulator:
    def __init__(self):
        self.xx = None
        self.sx = None
        self.zz = None
        self.n = 0

    def add_input(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        xx, sx = x.T @ x, x.sum(0)
        self.xx = xx if self.xx is None else self.xx + xx
        self.sx = sx if self.sx is None else self.sx + sx
        self.n += x.shape[0]

    def add_output(self, z: Tensor) -> None:
        z = z.reshape(-1, z.shape[-1]).double()
        zz = z.T @ z
        self.zz = zz if self.zz is None else self.zz + zz


def collect_moments(model, batches, progress: Callable[[int, int], None] | None = None,
                    total: int | None = None) -> dict[int, LayerMoments]:
    """Run ``model`` on each window of ``batches`` (1-D token id tensors) and return the
    per-layer moments. The k/v inputs are the q input in self-attention, so only q's
    input is hooked."""
    from .hf import projections

    layers = projections(model)
    acc = {i: _Accumulator() for i in layers}
    handles = []
    for i, roles in layers.items():
        q_parent, q_attr = roles["q"]
        o_parent, o_attr = roles["o"]
        handles.append(getattr(q_parent, q_attr).register_forward_pre_hook(
            lambda _m, args, a=acc[i]: a.add_input(args[0].detach())))
        handles.append(getattr(o_parent, o_attr).register_forward_pre_hook(
            lambda _m, args, a=acc[i]: a.add_output(args[0].detach())))
    device = next(model.parameters()).device
    done = 0
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.reshape(1, -1).to(device))
                done += ids.numel()
                if progress:
                    progress(done, total or done)
    finally:
        for h in handles:
            h.remove()
    if done == 0:
        raise InputError("no calibration tokens")
    return {i: LayerMoments((a.xx / a.n).cpu(), (a.sx / a.n).cpu(), (a.zz / a.n).cpu(), a.n)
            for i, a in acc.items()}


def calibrate(source, text_path, calib_tokens: int, seq_len: int = 512, device=None,
              progress: Callable[[int, int], None] | None = None) -> dict[int, LayerMoments]:
    """Moments of ``source`` (safetensors or GGUF) on the first ``calib_tokens`` tokens of
    the file ``text_path``, run in windows of ``seq_len``."""
    from .hf import load_model, load_tokenizer

    text = read_text(text_path)
    tokenizer = load_tokenizer(source)
    ids = token_ids(tokenizer, text, calib_tokens)
    model, causal = load_model(source, device)
    wrap = (None, None) if causal else (tokenizer.cls_token_id, tokenizer.sep_token_id)
    seq_len = min(seq_len, _max_positions(model))
    moments = collect_moments(model, windows(ids, seq_len, wrap), progress, ids.numel())
    del model
    return moments


def _max_positions(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)
