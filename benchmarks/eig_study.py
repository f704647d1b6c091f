#!/usr/bin/env python
"""How to get the big mode spectra faster on one GPU: the measurements behind analyze's choices.

    python benchmarks/eig_study.py [--out DIR] [--sizes 4096,8192,16384] [--quick]

1. eigvalsh of an n x n PSD Gram in float64 and float32, alone;
2. k solves at once, one thread and CUDA stream each (k = 1, 2, 4, 6), per-matrix time;
3. eigh with vectors (what compress needs) in float64 / float32, and a randomized
   subspace iteration for the top k vectors as the GEMM-speed alternative;
4. accuracy at the Llama-3-70B shape (one random bf16 layer read through tuckerctl's
   adapter): structured spectra with float64 and float32 eigensolvers against dense
   float64 Grams of the materialised tensor (max |d sigma| / sigma_1 per mode).
Prints a table and writes ``<out>/eig_study.json``. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: only to test the script


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def stream():
    import contextlib

    return torch.cuda.stream(torch.cuda.Stream()) if DEV.type == "cuda" else contextlib.nullcontext()


def gram(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, n, generator=g, device=DEV, dtype=dtype) / n ** 0.5
    return x @ x.T


def timed(fn, reps: int = 1) -> float:
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def concurrent(mats: list[torch.Tensor], solve) -> tuple[float, float]:
    """Wall time and the process's CPU time of solving every matrix at once, one thread +
    stream each (cuSOLVER's syevd keeps its calling thread busy while it runs)."""
    barrier = threading.Barrier(len(mats) + 1)

    def work(m):
        with stream():
            barrier.wait()
            solve(m).cpu()

    threads = [threading.Thread(target=work, args=(m,)) for m in mats]
    for th in threads:
        th.start()
    sync()
    t, cpu = time.perf_counter(), time.process_time()
    barrier.wait()
    for th in threads:
        th.join()
    sync()
    return time.perf_counter() - t, time.process_time() - cpu


def top_eigvecs_randomized(a: torch.Tensor, k: int, iters: int = 2, over: int = 64):
    """Top-k eigenpairs of PSD ``a`` by subspace iteration on k + over columns (GEMM + QR)."""
    g = torch.Generator(device=a.device).manual_seed(0)
    q = torch.linalg.qr(a @ torch.randn(a.shape[0], k + over, generator=g, device=a.device, dtype=a.dtype))[0]
    for _ in range(iters):
        q = torch.linalg.qr(a @ q)[0]
    vals, vecs = torch.linalg.eigh(q.T @ a @ q)
    return vals.flip(0)[:k], (q @ vecs.flip(1))[:, :k]


def study_solves(sizes, out, log):
    for n in sizes:
        reps = 1 if n > 8192 else 3
        for dt in (torch.float64, torch.float32):
            a = gram(n, 1, dt)
            torch.linalg.eigvalsh(a[:256, :256])  # handles, kernels
            t = timed(lambda a=a: torch.linalg.eigvalsh(a), reps)
            out.append({"what": "eigvalsh alone", "n": n, "dtype": str(dt)[6:], "seconds": t})
            log(f"eigvalsh n={n} {str(dt)[6:]}: {t:.3f} s")
            del a
    for n in [s for s in sizes if s in (8192, 16384) or DEV.type == "cpu"]:
        ks = (1, 2, 4, 6) if n <= 8192 else (2,)
        for dt in (torch.float64, torch.float32):
            for k in ks:
                mats = [gram(n, 10 + i, dt) for i in range(k)]
                t, cpu = concurrent(mats, torch.linalg.eigvalsh)
                out.append({"what": "eigvalsh concurrent", "n": n, "dtype": str(dt)[6:], "k": k, "seconds": t,
                            "per_matrix": t / k, "cpu_seconds": cpu})
                log(f"eigvalsh n={n} {str(dt)[6:]} x{k} at once: {t:.3f} s, {t / k:.3f} s per matrix, "
                    f"{cpu:.2f} CPU s")
                del mats
                if DEV.type == "cuda":
                    torch.cuda.empty_cache()


def study_vectors(out, log, n=8192, k=1024):
    if DEV.type == "cpu":
        n, k = 512, 64
    a = gram(n, 3)
    for dt in (torch.float64, torch.float32):
        b = a.to(dt)
        t = timed(lambda b=b: torch.linalg.eigh(b), 2)
        out.append({"what": "eigh with vectors", "n": n, "dtype": str(dt)[6:], "seconds": t})
        log(f"eigh n={n} {str(dt)[6:]}: {t:.3f} s")
    b = [a.clone(), a.clone()]
    t, _ = concurrent(b, lambda m: torch.linalg.eigh(m.to(torch.float32))[0])
    out.append({"what": "eigh with vectors, float32, 2 at once", "n": n, "seconds": t, "per_matrix": t / 2})
    log(f"eigh n={n} float32 x2 at once: {t:.3f} s")
    ref_vals, ref_vecs = torch.linalg.eigh(a)
    ref_vals, ref_vecs = ref_vals.flip(0)[:k], ref_vecs.flip(1)[:, :k]
    for iters in (1, 2, 4):
        t = timed(lambda iters=iters: top_eigvecs_randomized(a, k, iters), 2)
        vals, vecs = top_eigvecs_randomized(a, k, iters)
        # Captured energy of the top-k subspace (what HOSVD/HOOI care about) vs the exact one.
        captured = float(torch.trace(vecs.T @ a @ vecs) / ref_vals.sum())
        out.append({"what": "randomized top-k eigvecs", "n": n, "k": k, "power_iters": iters, "seconds": t,
                    "captured_vs_exact": captured,
                    "max_rel_eigenvalue_error": float(((vals - ref_vals).abs() / ref_vals[0]).max())})
        log(f"randomized top-{k} (q={iters}): {t:.3f} s, captured energy / exact {captured:.6f}")


def study_accuracy(out, log, key="llama3-70b"):
    """Structured spectra (float64 and float32 eigensolvers) vs dense float64 Grams."""
    import run as bench

    from tuckerctl.adapters import detect
    from tuckerctl.loader import open_checkpoint
    from tuckerctl.multilinear import mode_spectra

    with tempfile.TemporaryDirectory() as tmp:
        if DEV.type == "cpu":
            bench.use_smoke_shapes()
        path = bench.ensure_model(Path(tmp), key, 1, log, DEV.type)
        ckpt = open_checkpoint(path)
        adapter, spec = detect(ckpt)
        layer = adapter.layer(ckpt, spec, 0)
    for tensor in ("pre", "post"):
        st = getattr(layer, tensor).to(DEV, torch.float64)
        H, m, n = st.shape
        g2 = torch.zeros(m, m, dtype=torch.float64, device=DEV)
        g3 = torch.zeros(n, n, dtype=torch.float64, device=DEV)
        flat = torch.empty(H, m * n, dtype=torch.float64, device=DEV)  # 34 GB at the 70B shape
        for h in range(H):
            w = st.head_slices(slice(h, h + 1))[0]
            g2 += w @ w.T
            g3 += w.T @ w
            flat[h] = w.reshape(-1)
        g1 = flat @ flat.T
        del flat, w
        dense = [torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt() for g in (g1, g2, g3)]
        del g1, g2, g3
        for eig in (torch.float64, torch.float32):
            got = mode_spectra(st, eig_dtype=eig)
            errs = []
            for s, d in zip(got, dense):
                k = min(len(s), len(d))
                pad = torch.cat([s[:k], torch.zeros(len(d) - k, dtype=s.dtype, device=s.device)])
                errs.append(float((pad - d).abs().max() / d[0]))
            out.append({"what": "accuracy vs dense float64", "shape": key, "tensor": tensor,
                        "eig_dtype": str(eig)[6:], "max_abs_err_over_sigma1_per_mode": errs})
            log(f"accuracy {key} {tensor} eig {str(eig)[6:]}: {', '.join(f'{e:.1e}' for e in errs)}")
        del st, dense
        if DEV.type == "cuda":
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--sizes", default="4096,7168,8192,16384")
    p.add_argument("--skip", default="", help="comma list of: solves,vectors,accuracy")
    args = p.parse_args()
    out: list[dict] = []
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    skip = set(args.skip.split(","))
    try:
        if "solves" not in skip:
            study_solves([int(s) for s in args.sizes.split(",")], out, log)
        if "vectors" not in skip:
            study_vectors(out, log)
        if "accuracy" not in skip:
            study_accuracy(out, log)
    finally:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "eig_study.json").write_text(json.dumps(
            {"gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__,
             "rows": out}, indent=1))


if __name__ == "__main__":
    main()
