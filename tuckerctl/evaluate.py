"""``tuckerctl eval``: score a compressed checkpoint as a model against its original.

The original (safetensors directory or GGUF file) is loaded with transformers; a copy
gets the compressed attention swapped in (Tucker checkpoints through
:func:`tuckerctl.patch`, per-matrix SVD checkpoints through
:func:`tuckerctl.lowrank.patch_lowrank`); both run on the same token windows of the
user's text and are compared window by window (:mod:`tuckerctl.metrics`). The copy shares
every weight tensor with the original (only the module tree is copied, and the patch
replaces modules, never tensors), so memory is one model, the compressed attention and
one window's logits.

Windows are consecutive and non-overlapping, ``seq_len`` tokens each; in every window
each token after the first is predicted from the tokens before it in that window.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .calibrate import read_text, token_ids, windows
from .device import resolve_device
from .errors import InputError, arg
from .loader import open_checkpoint
from .metrics import CausalTally, EncoderTally

SCHEMA = "tuckerctl.eval/1"


def _compressed_info(path: Path) -> dict:
    raw = open_checkpoint(path).metadata.get("tuckerctl")
    if raw is None:
        raise InputError(f"{path}: not a tuckerctl checkpoint (no 'tuckerctl' metadata)")
    try:
        return json.loads(raw)
    except ValueError:
        raise InputError(f"{path}: corrupted 'tuckerctl' metadata (not JSON)") from None


def apply_compressed(model, path: Path, info: dict) -> None:
    """Swap the compressed attention of ``path`` into ``model`` (in place)."""
    from .lowrank import SCHEMA as LOWRANK
    from .lowrank import patch_lowrank

    if info.get("schema") == LOWRANK:
        patch_lowrank(model, path)
        return
    import tuckerctl

    patch = getattr(tuckerctl, "patch", None)
    if patch is None:
        raise InputError(f"{path}: running Tucker checkpoints inside transformers needs tuckerctl.patch, "
                         "which this version does not have")
    patch(model, path)


def weight_sharing_copy(model):
    """A copy of ``model``'s module tree that shares every parameter and buffer with it:
    swapping modules in the copy (as patching does) leaves ``model`` as it was, without a
    second copy of the weights."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _check_same_model(info: dict, model, compressed: Path, against: Path) -> None:
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    spec = info.get("model", {})
    for key, attr in (("d", "hidden_size"), ("layers", "num_hidden_layers"), ("heads", "num_attention_heads")):
        have = getattr(cfg, attr, None)
        if have is not None and spec.get(key) is not None and spec[key] != have:
            raise InputError(f"{compressed} was compressed from a different model than {against}: "
                             f"{key} {spec[key]} vs {have}")


def _finite(value, path: str, bad: list[str]):
    """Replace non-finite floats by None (strict JSON), recording where."""
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}" if path else k, bad) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(path)
        return None
    return value


def evaluate(compressed, against, text, *, seq_len: int = 512, max_tokens: int | None = None,
             device: str = "auto", max_kld: float | None = None, max_ppl_ratio: float | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Compare the compressed model with the original on the text file ``text``."""
    if seq_len < 2:
        raise InputError(f"{arg('seq_len')}: {seq_len} must be at least 2")
    if max_tokens is not None and max_tokens < 2:
        raise InputError(f"{arg('max_tokens')}: {max_tokens} must be at least 2")
    for name, bound in (("max_kld", max_kld), ("max_ppl_ratio", max_ppl_ratio)):
        if bound is not None and not (math.isfinite(bound) and bound >= 0):
            raise InputError(f"{arg(name)}: {bound} is not a non-negative number")
    compressed, against = Path(compressed), Path(against)
    body = read_text(text)
    info = _compressed_info(compressed)
    dev = resolve_device(device)
    start = time.perf_counter()

    from .hf import load_model, load_tokenizer

    tokenizer = load_tokenizer(compressed if compressed.is_dir() else compressed.parent, against)
    model, causal = load_model(against, dev)
    _check_same_model(info, model, compressed, against)
    if not causal and (max_kld is not None or max_ppl_ratio is not None):
        raise InputError(f"{against}: an encoder has no next-token distribution; {arg('max_kld')} and "
                         f"{arg('max_ppl_ratio')} apply to causal LMs")
    small = weight_sharing_copy(model)
    apply_compressed(small, compressed, info)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        seq_len = min(seq_len, int(limit))
    ids = token_ids(tokenizer, body, max_tokens)
    wrap = (None, None) if causal else (tokenizer.cls_token_id, tokenizer.sep_token_id)
    tally = CausalTally() if causal else EncoderTally()
    done = 0
    with torch.no_grad():
        for window in windows(ids, seq_len, wrap):
            x = window.reshape(1, -1).to(dev)
            if causal:
                tally.add(model(input_ids=x).logits[0, :-1], small(input_ids=x).logits[0, :-1], x[0, 1:])
            else:
                tally.add(model(input_ids=x).last_hidden_state[0], small(input_ids=x).last_hidden_state[0])
            done += window.numel()
            if progress:
                progress(min(done, ids.numel()), ids.numel())
    bad: list[str] = []
    metrics = _finite(tally.result(), "", bad)
    failures = []
    if causal:
        kld, ratio = metrics["kl_divergence"]["mean"], metrics["perplexity"]["ratio"]
        if max_kld is not None and (kld is None or kld > max_kld):
            failures.append(f"mean KL divergence {kld} exceeds --max-kld {max_kld}")
        if max_ppl_ratio is not None and (ratio is None or ratio > max_ppl_ratio):
            failures.append(f"perplexity ratio {ratio} exceeds --max-ppl-ratio {max_ppl_ratio}")
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "compressed": str(compressed),
        "against": str(against),
        "method": "svd" if info.get("schema", "").startswith("tuckerctl.lowrank") else "tucker",
        "model_kind": "causal_lm" if causal else "encoder",
        "settings": {"text": str(text), "seq_len": seq_len, "max_tokens": max_tokens, "device": str(dev),
                     "max_kld": max_kld, "max_ppl_ratio": max_ppl_ratio},
        **metrics,
        "checks": {"passed": not failures, "failures": failures},
        "notes": [f"non-finite value at {p} (reported as null)" for p in bad],
        "seconds": round(time.perf_counter() - start, 3),
    }
