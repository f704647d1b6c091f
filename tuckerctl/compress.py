"""``tuckerctl compress``: Tucker-factorise every layer's attention and write a checkpoint.

Per layer and tensor: truncated HOSVD from the structured mode factors, then
``hooi_iters`` HOOI sweeps from the factors (never from the dense tensor). Ranks come
from a fixed triple, a per-mode energy threshold, or a global parameter budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .adapters import detect
from .allocate import TensorSpectra, allocate_budget, energy_ranks
from .analysis import iter_layers
from .checkpoint import open_checkpoint
from .device import resolve_device
from .errors import InputError
from .multilinear import clamp_ranks, mode_spectra, reduce, tucker
from .ranks import tucker_params
from .tucker_format import PARTS, SCHEMA, TENSOR_PREFIX, content_hash, factor_name, write_checkpoint

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_ranks(text: str | None, option: str) -> tuple[int, int, int] | None:
    """``"8,128,64"`` -> (8, 128, 64); errors name the option."""
    if text is None:
        return None
    try:
        ranks = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise InputError(f"{option}: cannot parse {text!r} (use three integers, e.g. 8,128,64)") from None
    if len(ranks) != 3 or min(ranks) <= 0:
        raise InputError(f"{option}: need three positive ranks (head,query,key), got {text!r}")
    return ranks


def _validate(ranks, ranks_post, energy, params):
    chosen = sum(x is not None for x in (ranks, energy, params))
    if chosen != 1:
        raise InputError("give exactly one of --ranks, --energy or --params")
    if ranks_post is not None and ranks is None:
        raise InputError("--ranks-post needs --ranks")
    if energy is not None and not 0 < energy <= 1:
        raise InputError(f"--energy: {energy} is not in (0, 1]")
    if params is not None and not 0 < params <= 1:
        raise InputError(f"--params: {params} is not in (0, 1] (a fraction of the attention parameters)")


def _budget_ranks(adapter, ckpt, spec, indices, params, dev, progress):
    """Pass 1 for --params: spectra of every tensor, then a global allocation."""
    tensors, original = [], 0
    for k, layer in enumerate(iter_layers(adapter, ckpt, spec, indices, dev)):
        original += layer.params
        for key in ("pre", "post"):
            stack = getattr(layer, key).to(device=dev, dtype=torch.float64)
            s = mode_spectra(reduce(stack))
            tensors.append(TensorSpectra(stack.shape, tuple(x.cpu().tolist() for x in s)))
        if progress:
            progress(k + 1, 2 * len(indices))
    budget = int(params * original)
    try:
        chosen = allocate_budget(tensors, budget)
    except ValueError as e:
        raise InputError(f"--params {params}: {e}") from None
    return {(i, key): chosen[2 * j + (key == "post")] for j, i in enumerate(indices) for key in ("pre", "post")}


def compress(path, out, *, ranks: str | None = None, ranks_post: str | None = None,
             energy: float | None = None, params: float | None = None, hooi_iters: int = 2,
             device: str = "auto", dtype: str = "float32", overwrite: bool = False,
             config=None, heads=None, kv_heads=None, head_dim=None, family=None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Compress ``path`` into the directory ``out``; returns the compression record
    (also stored as the checkpoint's ``tuckerctl`` metadata)."""
    fixed_pre = parse_ranks(ranks, "--ranks")
    fixed_post = parse_ranks(ranks_post, "--ranks-post") or fixed_pre
    _validate(fixed_pre, ranks_post, energy, params)
    if hooi_iters < 0:
        raise InputError(f"--hooi-iters: {hooi_iters} is negative")
    if dtype not in STORE_DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(STORE_DTYPES)}")
    store = STORE_DTYPES[dtype]
    dev = resolve_device(device)
    start = time.perf_counter()
    ckpt = open_checkpoint(path, config, attention_only=False)
    adapter, spec = detect(ckpt, heads=heads, kv_heads=kv_heads, head_dim=head_dim, family=family)
    out = Path(out)
    if out.exists() and not overwrite:  # fail before the expensive part
        raise InputError(f"{out}: already exists (use --overwrite to replace it)")
    indices = list(range(spec.layers))
    steps = len(indices) * (3 if params is not None else 1)
    budget = _budget_ranks(adapter, ckpt, spec, indices, params, dev,
                           (lambda d, t: progress(d, steps)) if progress else None) if params is not None else None
    factors: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    records, notes = [], []
    for k, layer in enumerate(iter_layers(adapter, ckpt, spec, indices, dev)):
        rec = {"index": layer.index, "params_original": layer.params, "source_tensors": layer.tensors}
        replaced.update(layer.tensors)
        for key in ("pre", "post"):
            stack = getattr(layer, key).to(device=dev, dtype=torch.float64)
            if budget is not None:
                want = budget[(layer.index, key)]
            elif energy is not None:
                s = mode_spectra(reduce(stack))
                want = energy_ranks(TensorSpectra(stack.shape, tuple(x.cpu().tolist() for x in s)), energy)
            else:
                want = fixed_pre if key == "pre" else fixed_post
            got = clamp_ranks(stack, want)
            if tuple(got) != tuple(want):
                notes.append(f"layer {layer.index} {key}: ranks {list(want)} clamped to the mode ceilings {list(got)}")
            t = tucker(stack, got, hooi_iters=hooi_iters)
            for part, tensor in zip(PARTS[key], [t.core, *t.factors]):
                factors[factor_name(layer.index, key, part)] = tensor.to(store).cpu().contiguous()
            rec[key] = {"shape": list(stack.shape), "ranks": list(t.ranks), "rel_error": t.rel_error,
                        "rel_error_hosvd": t.errors[0], "params": tucker_params(stack.shape, t.ranks)}
        if layer.out_bias is not None:
            factors[f"{TENSOR_PREFIX}.{layer.index}.out_bias"] = layer.out_bias.to(store).cpu().contiguous()
        records.append(rec)
        if progress:
            progress(k + 1 + (steps - len(indices)), steps)
    # Same-named notes for every layer read badly; keep the first few.
    if len(notes) > 4:
        notes = notes[:3] + [f"... and {len(notes) - 3} more clamped tensors"]
    original = sum(r["params_original"] for r in records)
    compressed = sum(r[k]["params"] for r in records for k in ("pre", "post"))
    info = {
        "schema": SCHEMA,
        "tool_version": __version__,
        "source": {"path": str(path), "format": ckpt.format, "sha256": content_hash(ckpt, sorted(replaced))},
        "model": spec.as_dict(),
        "flags": {
            "latent_rope_needed": spec.rope,
            "qk_norm": spec.qk_norm,
            **{k: spec.extras[k] for k in ("softcap", "alibi", "clip_qkv", "causal") if k in spec.extras},
        },
        "settings": {"ranks": list(fixed_pre) if fixed_pre else None,
                     "ranks_post": list(fixed_post) if fixed_post else None,
                     "energy": energy, "params": params, "hooi_iters": hooi_iters, "dtype": dtype,
                     "device": str(dev)},
        "layers": records,
        "summary": {"params_original": original, "params_tucker": compressed,
                    "ratio": compressed / original if original else None,
                    "max_rel_error": max(max(r["pre"]["rel_error"], r["post"]["rel_error"]) for r in records),
                    "kv_cache_per_token": {
                        "original": _kv_cache(spec),
                        "tucker_max": max(r["pre"]["ranks"][2] + r["post"]["ranks"][2] for r in records)}},
        "notes": notes + ([
            "RoPE model: the factors hold the zero-offset (content) bilinear forms; running them needs latent "
            "RoPE, which changes the positional kernel (fine-tune after compressing)"] if spec.rope else []),
    }
    if ckpt.format != "safetensors":
        info["notes"].append(f"{ckpt.format} source: only the attention factors are written, "
                             "non-attention tensors are not copied")
    write_checkpoint(out, ckpt, replaced, factors, info, overwrite=overwrite)
    info["summary"]["seconds"] = round(time.perf_counter() - start, 3)
    return info


def _kv_cache(spec) -> int:
    """Numbers cached per token by the original attention (DESIGN section 3)."""
    if spec.attention == "MLA":
        return int(spec.extras.get("kv_lora_rank", 0)) + int(spec.extras.get("qk_rope_head_dim", 0))
    return spec.kv_heads * (spec.head_dim + spec.value_dim)
