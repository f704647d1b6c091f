#!/usr/bin/env python
"""Where analyze's time goes on a GPU, stage by stage (the numbers behind the pipeline's settings).

    python benchmarks/profile_analyze.py --workdir /tmp/tb [--out DIR]

Per model shape (random bf16 layers, as benchmarks/run.py writes them): reading alone, reading +
upload, building the spectrum problems (GEMMs), solving them one after another, summarising on
the CPU; then analyze() over the same layers with 1, 2, 4, 6 concurrent solvers and 1 or 2
layers read ahead; CLI start-up and JSON writing. Writes ``<out>/profile.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # noqa: E402
import torch  # noqa: E402

from tuckerctl import analysis, loader  # noqa: E402
from tuckerctl.adapters import detect  # noqa: E402
from tuckerctl.loader import open_checkpoint  # noqa: E402


def now(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def profile(key, layers, workdir, dev, log, out):
    path = bench.ensure_aliased_model(workdir, key, layers, 8, log, dev.type)
    ckpt = open_checkpoint(path)
    adapter, spec = detect(ckpt)
    idx = list(range(layers))
    rec = {"model": key, "layers": layers}
    t = now(dev)
    for i in idx:
        adapter.layer(ckpt, spec, i)
    rec["read_s"] = now(dev) - t
    t = now(dev)
    held = list(loader.iter_layers(adapter, ckpt, spec, idx[:4], dev))
    rec["read_upload_4_s"] = now(dev) - t
    solver = analysis.SpectraSolver(dev, 1)
    starts, solves, finishes = [], [], []
    for layer in held:
        t = now(dev)
        jobs = {k: analysis.spectrum_problems(analysis.reduce(getattr(layer, k).to(dev, torch.float64)))
                for k in ("pre", "post")}
        starts.append(now(dev) - t)
        t = now(dev)
        for _, problems in jobs.values():
            for pb in problems:
                pb.solve(torch.float32)
        solves.append(now(dev) - t)
        t = now(dev)
        job = analysis._start_layer(layer, dev, solver, torch.float32)
        analysis._finish_layer(job, (0.9, 0.99, 0.999), 8e-3)
        finishes.append(now(dev) - t)
    rec.update({"problems_s_per_layer": starts, "solves_fp32_s_per_layer": solves,
                "start+solve+finish_s_per_layer": finishes})
    del held, jobs
    log(json.dumps(rec))
    runs = []
    for ahead in (1, 2):
        for workers in (1, 2, 4, 6) if ahead == 1 else (4,):
            analysis.CUDA_SOLVERS, analysis.READ_AHEAD = workers, ahead
            t = time.perf_counter()
            analysis.analyze(path, device=str(dev))
            runs.append({"solvers": workers, "read_ahead": ahead, "seconds": time.perf_counter() - t})
            log(f"{key} {layers} layers: solvers {workers}, read ahead {ahead}: {runs[-1]['seconds']:.2f} s")
    analysis.CUDA_SOLVERS, analysis.READ_AHEAD = 4, 1
    rec["analyze"] = runs
    t = time.perf_counter()
    doc = analysis.analyze(path, device=str(dev))
    rec["analyze_again_s"] = time.perf_counter() - t
    from tuckerctl.io import json_text

    t = time.perf_counter()
    text = json_text(doc)
    rec["json_text_s"] = time.perf_counter() - t
    rec["json_mb"] = len(text) / 1e6
    out.append(rec)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/tb")
    p.add_argument("--out", default=".")
    p.add_argument("--models", default="llama3-8b:32,deepseek-v3:12,llama3-70b:12")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = lambda m: print(m, flush=True)  # noqa: E731
    if dev.type == "cpu":
        bench.use_smoke_shapes()
    bench.warm_up(dev)
    out = []
    for cmd in (["-m", "tuckerctl", "--version"],
                ["-c", "import torch; torch.zeros(1, device='cuda' if torch.cuda.is_available() else 'cpu')"]):
        t = time.perf_counter()
        subprocess.run([sys.executable, *cmd], capture_output=True)
        out.append({"startup": " ".join(cmd), "seconds": time.perf_counter() - t})
        log(json.dumps(out[-1]))
    try:
        for item in args.models.split(","):
            key, n = item.split(":")
            profile(key, int(n), Path(args.workdir), dev, log, out)
    finally:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
