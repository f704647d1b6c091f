#!/usr/bin/env python
"""Where compress's time goes on one checkpoint, and what its concurrency settings give.

    python benchmarks/profile_compress.py MODEL [--ranks 16,1024,512] [--device cuda]
        [--settings 1:1,2:1,4:2] [--out DIR]

For the first layer, each tensor's ``_compress_tensor`` timed alone with 0, 1 and 2 HOOI
sweeps (so the cost of the HOSVD and of one sweep), and its largest mode Gram's ``eigh``
(with vectors, float64) alone and with k = 2, 4 of them at once on their own streams (the
floor of the sweeps); then ``compress()`` over every layer of MODEL for each
``THREADS:LAYERS`` setting (threads/CUDA streams, layers in flight; 2:1 was compress's
schedule before the layer pipeline) and whether the records are all equal. ``--trace``: the
first layer's tensors once more with every stage function timed (``synctrace``). Prints JSON and
writes ``<out>/profile-compress.json`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from profile_analyze import timed  # noqa: E402
from run import emit  # noqa: E402
from synctrace import SyncTrace  # noqa: E402

from tuckerctl import compress as compress_module  # noqa: E402
from tuckerctl.device import resolve_device  # noqa: E402
from tuckerctl.loader import open_model  # noqa: E402
from tuckerctl.multilinear import _side_problem, reduce  # noqa: E402
from tuckerctl.options import parse_ranks  # noqa: E402
from tuckerctl.streams import StreamPool  # noqa: E402


def setting(text: str) -> tuple[int, int]:
    """``THREADS:LAYERS`` -> (threads, layers in flight)."""
    parts = text.split(":")
    if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise SystemExit(f"--settings: {text!r} is not THREADS:LAYERS (positive integers)")
    return int(parts[0]), int(parts[1])


def eigh_at_once(gram: torch.Tensor, k: int, dev: torch.device) -> float:
    """Seconds per matrix for k eigh (with vectors) of ``gram`` at once, one stream each."""
    with StreamPool(dev, k, "profile-eig") as pool:
        t, _ = timed(dev, lambda: [job.result() for job in [pool.submit(torch.linalg.eigh, gram)
                                                              for _ in range(k)]])
    return t / k


TRACED = ["tuckerctl.compress._compress_tensor", "tuckerctl.compress._per_head", "tuckerctl.multilinear.tucker",
          "tuckerctl.multilinear.reduce", "tuckerctl.multilinear.clamp_ranks", "tuckerctl.multilinear.head_gram",
          "tuckerctl.multilinear._side_problem", "tuckerctl.multilinear._sandwich_sum",
          "tuckerctl.multilinear._top_eigvecs", "tuckerctl.multilinear._weighted_side_gram",
          "tuckerctl.multilinear._core_reduced", "tuckerctl.multilinear._rel_error",
          "tuckerctl.multilinear.frobenius_norm_sq", "torch.linalg.eigh", "torch.linalg.qr", "torch.linalg.svd"]


def stages(model: str, ranks, dev: torch.device, trace: bool = False) -> dict:
    ckpt, adapter, spec = open_model(model, attention_only=False)
    layer = adapter.layer(ckpt, spec, 0)
    kind = compress_module.choose_structure(spec, "auto")
    out = {}
    for key in ("pre", "post"):
        rec = {}
        for iters in (0, 1, 2, 2):  # the first run of 2 again at the end: warm
            rec[f"compress_tensor_hooi{iters}_s"], _ = timed(
                dev, compress_module._compress_tensor, layer, key, dev, None, None, None, ranks, ranks, kind,
                iters, torch.float32, spec)
        stack = getattr(layer, key).to(device=dev, dtype=torch.float64)
        red = reduce(stack)
        sides = [_side_problem(red, left) for left in (True, False)]
        big = max((pb for pb in sides if pb.gram), key=lambda pb: pb.matrix.shape[0], default=None)
        if big is not None:
            rec["largest_gram"] = big.matrix.shape[0]
            rec["eigh_alone_s"], _ = timed(dev, torch.linalg.eigh, big.matrix)
            if dev.type == "cuda":
                rec["eigh_per_matrix_s"] = {k: round(eigh_at_once(big.matrix, k, dev), 4) for k in (1, 2, 4)}
        out[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}
        if trace:
            with SyncTrace(dev, TRACED) as tr:
                compress_module._compress_tensor(layer, key, dev, None, None, None, ranks, ranks, kind, 2,
                                                 torch.float32, spec)
            out[key]["trace"] = tr.table()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--ranks", default="16,1024,512")
    p.add_argument("--hooi-iters", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--settings", default=None,
                   help="compress() settings to compare, THREADS:LAYERS, e.g. 1:1,2:1,4:2 (default: 1:1 and "
                        "compress's default for the device)")
    p.add_argument("--skip-stages", action="store_true")
    p.add_argument("--trace", action="store_true", help="also time every stage function (synctrace)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    ranks = parse_ranks(args.ranks, "ranks")
    rec = {"model": str(args.model), "device": str(dev), "torch": torch.__version__, "ranks": list(ranks),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    if not args.skip_stages:
        rec["stages"] = stages(args.model, ranks, dev, args.trace)
    chosen = ([setting(s) for s in args.settings.split(",")] if args.settings
              else [(1, 1), compress_module.concurrency(dev)])
    records, rec["compress"] = [], []
    saved = compress_module.concurrency, compress_module._compress_tensor
    with tempfile.TemporaryDirectory() as tmp:
        for n, (threads, window) in enumerate(chosen):
            jobs, done = [], []
            t0 = time.perf_counter()  # one clock for the jobs, the finished layers and the total

            def job(layer, key, *rest, inner=saved[1], jobs=jobs, t0=t0):
                start = time.perf_counter() - t0
                try:
                    return inner(layer, key, *rest)
                finally:
                    jobs.append([layer.index, key, threading.current_thread().name, round(start, 3),
                                 round(time.perf_counter() - t0, 3)])

            compress_module.concurrency = lambda d, s=(threads, window): s  # noqa: E731
            compress_module._compress_tensor = job
            try:
                info = compress_module.compress(
                    args.model, Path(tmp) / f"out{n}", ranks=ranks, hooi_iters=args.hooi_iters, device=str(dev),
                    dtype="float32", progress=lambda k, total, done=done, t0=t0: done.append(
                        round(time.perf_counter() - t0, 3)))
                t = time.perf_counter() - t0
            finally:
                compress_module.concurrency, compress_module._compress_tensor = saved
            info["summary"].pop("seconds")
            records.append(info)
            layers = len(info["layers"])
            steady = (done[-1] - done[0]) / (layers - 1) if layers > 1 else None
            rec["compress"].append({"threads": threads, "layers_in_flight": window, "layers": layers,
                                    "seconds": round(t, 2), "per_layer_s": round(t / layers, 3),
                                    "steady_per_layer_s": steady and round(steady, 3),
                                    "max_rel_error": info["summary"]["max_rel_error"],
                                    "layer_done_s": done, "jobs": sorted(jobs, key=lambda j: j[3])})
    rec["records_equal"] = all(r == records[0] for r in records)
    emit(rec, args.out, "profile-compress.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
