#!/usr/bin/env python
"""Where analyze's time goes, stage by stage, on one checkpoint (the numbers behind the pipeline).

    python benchmarks/profile_analyze.py MODEL [--layers 0-7] [--device cuda] [--out DIR]

For the first listed layer, each tensor's stages timed alone (float64 upload and thin QRs,
RoPE offset-averaged spectra, zero-offset spectra, zero-offset spectra with the HOSVD bases
when the exact table is computed, exact GQA errors, the exact table, the rounding-noise
estimate, the whole ``analyze_tensor``), repeated twice (the first includes warm-up); then
``analyze()`` over the listed layers inline (one thread) and with analyze's default
(``concurrency``: CUDA streams) or the ``--streams`` settings given, and whether the
documents are all equal. ``--trace``: the first layer's tensors once more, inline, with every
stage function and torch.linalg solver timed by ``synctrace`` (calls, inclusive and self
seconds). MODEL is any
checkpoint ``tuckerctl analyze`` reads, e.g. one that ``benchmarks/run.py --workdir`` wrote.
Prints JSON and writes ``<out>/profile-analyze.json`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from run import emit  # noqa: E402
from synctrace import SyncTrace  # noqa: E402

from tuckerctl import analysis  # noqa: E402
from tuckerctl.device import resolve_device  # noqa: E402
from tuckerctl.exact import EXACT_TABLE_MAX_FLOPS, gqa_errors, hosvd_residuals, table_flops  # noqa: E402
from tuckerctl.loader import open_model  # noqa: E402
from tuckerctl.multilinear import mode_spectra, mode_spectra_with_bases, reduce  # noqa: E402
from tuckerctl.noise import mode_noise  # noqa: E402
from tuckerctl.pareto import gqa_groups  # noqa: E402
from tuckerctl.rope import averaged_spectra  # noqa: E402
from tuckerctl.schema import MODE_NAMES  # noqa: E402


def timed(dev, fn, *args):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    out = fn(*args)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t, out


def upload_reduce(stack, dev):
    st = stack.to(device=dev, dtype=torch.float64)
    return st, reduce(st)


def stages(layer, dev, rope, groups, eps) -> dict:
    """Seconds per stage for both tensors of one layer."""
    out = {}
    for key in ("pre", "post"):
        stack = getattr(layer, key)
        r = rope if key == "pre" else None
        width = stack.left.shape[2]
        rec = {}
        rec["upload_reduce_s"], (st, red) = timed(dev, upload_reduce, stack, dev)
        if r:
            rec["rope_averaged_spectra_s"], _ = timed(dev, averaged_spectra, red, *r)
        rec["zero_offset_spectra_s"], _ = timed(dev, mode_spectra, red)
        table = table_flops(red) <= EXACT_TABLE_MAX_FLOPS
        if table:
            rec["zero_offset_spectra_with_bases_s"], (_, bases) = timed(dev, mode_spectra_with_bases, red)
            grids = analysis.tradeoff_grids(red, groups, width, st.ceilings)
            rec["exact_table_s"], _ = timed(dev, hosvd_residuals, red, grids, bases)
        rec["exact_gqa_s"], _ = timed(dev, gqa_errors, red, groups, width)
        rec["noise_s"], _ = timed(dev, mode_noise, red, st.shape[1], st.shape[2], eps, eps)
        rec["analyze_tensor_s"], _ = timed(dev, analysis.analyze_tensor, stack, MODE_NAMES[key],
                                           analysis.DEFAULT_ENERGY, None, dev, groups, width, r, eps)
        rec["exact_table"] = table
        out[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}
    return out


TRACED = ["tuckerctl.analysis.analyze_tensor", "tuckerctl.multilinear.reduce", "tuckerctl.multilinear.head_gram",
          "tuckerctl.multilinear._sandwich_sum", "tuckerctl.multilinear._side_problem",
          "tuckerctl.multilinear.SpectrumProblem.solve", "tuckerctl.rope.averaged_problems",
          "tuckerctl.noise.mode_noise", "tuckerctl.noise._spectral", "tuckerctl.noise.resolution",
          "tuckerctl.analysis.exact_tradeoff", "tuckerctl.exact._key_side_blocks",
          "tuckerctl.exact._key_side_similarity", "tuckerctl.exact._gqa_residual", "tuckerctl.exact._greedy_groups",
          "tuckerctl.ranks.mode_summary", "torch.linalg.eigvalsh", "torch.linalg.eigh", "torch.linalg.qr",
          "torch.linalg.svdvals", "torch.linalg.svd", "torch.linalg.cholesky"]


def traced(layer, dev, rope, groups, eps) -> dict:
    """Both tensors of ``layer`` through analyze_tensor inline, every TRACED function timed."""
    out = {}
    for key in ("pre", "post"):
        stack = getattr(layer, key).to(device=dev, dtype=torch.float64)
        with SyncTrace(dev, TRACED) as tr:
            analysis.analyze_tensor(stack, MODE_NAMES[key], analysis.DEFAULT_ENERGY, None, dev, groups,
                                    stack.left.shape[2], rope if key == "pre" else None, eps)
        out[key] = tr.table()
    return out


def largest_difference(a, b) -> float:
    """Largest difference between two documents' numbers, relative to each list's (or number's)
    largest magnitude; inf where their structure or any non-number differs."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max((largest_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return float("inf")
        if a and all(isinstance(x, float) for x in a) and all(isinstance(x, float) for x in b):
            scale = max(abs(x) for x in a) or 1.0
            return max(abs(x - y) for x, y in zip(a, b)) / scale
        return max((largest_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) / max(abs(a), 1e-300) if a != b else 0.0
    return 0.0 if a == b else float("inf")


def streams_setting(text: str, window: int) -> tuple[int, int, int]:
    """``TENSOR:SOLVER[:LAYERS]`` -> (tensor threads, solver threads, layers in flight)."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise SystemExit(f"--streams: {text!r} is not TENSOR:SOLVER[:LAYERS] (positive integers)")
    tensor, solver, *rest = map(int, parts)
    return tensor, solver, rest[0] if rest else window


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--layers", default="0-3", help="layers for the analyze() runs (default 0-3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--streams", default=None,
                   help="analyze() settings to compare, TENSOR:SOLVER[:LAYERS] threads (CUDA streams) and layers "
                        "in flight, e.g. 1:1,4:1,4:4:3 (default: 1:1 and analyze's default)")
    p.add_argument("--trace", action="store_true", help="also time every stage function (synctrace)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    ckpt, adapter, spec = open_model(args.model)
    indices = analysis.parse_layers(args.layers, spec.layers)
    rope, _ = analysis.rope_setting(spec, analysis.DEFAULT_OFFSETS)
    groups = gqa_groups(spec.heads, spec.kv_heads if spec.attention != "MLA" else None)
    t, layer = timed(dev, adapter.layer, ckpt, spec, indices[0])
    eps, dtype = analysis.storage_eps(analysis.stored_dtype(ckpt, layer))
    rec = {"model": str(args.model), "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda"
           else None, "torch": torch.__version__, "dtype": dtype, "read_layer_s": round(t, 3),
           "stages": [stages(layer, dev, rope, groups, eps) for _ in range(2)]}
    if args.trace:
        rec["trace"] = traced(layer, dev, rope, groups, eps)
    docs = []
    default = (*analysis.concurrency(dev), analysis.LAYERS_IN_FLIGHT)
    settings = [(1, 1, 1), default] if not args.streams else [streams_setting(s, default[2])
                                                              for s in args.streams.split(",")]
    rec["analyze"] = []
    for tensor, solver, window in settings:
        saved = analysis.concurrency, analysis.LAYERS_IN_FLIGHT
        analysis.concurrency = lambda d, n=(tensor, solver): n  # noqa: E731
        analysis.LAYERS_IN_FLIGHT = window
        try:
            t, doc = timed(dev, partial(analysis.analyze, args.model, layers=indices, device=str(dev)))
        finally:
            analysis.concurrency, analysis.LAYERS_IN_FLIGHT = saved
        doc["summary"].pop("seconds")
        docs.append(doc)
        rec["analyze"].append({"tensor_threads": tensor, "solver_threads": solver, "layers_in_flight": window,
                               "layers": len(indices), "seconds": round(t, 2), "per_layer_s": round(t / len(indices), 3)})
    rec["documents_equal"] = all(doc == docs[0] for doc in docs)
    rec["max_relative_difference"] = [largest_difference(docs[0], doc) for doc in docs]
    emit(rec, args.out, "profile-analyze.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
