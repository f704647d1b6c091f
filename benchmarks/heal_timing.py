"""Healing time at SmolLM2-135M's shapes on a machine without the GGUF (e.g. the H200):
a Llama with SmolLM2-135M's configuration and random weights (seeded), a character
tokenizer, Python's pydoc_data/topics.py prose (even topics) as healing text. Timing
depends on the shapes, tokens and steps, not on the weights' values; the quality
numbers of the README come from benchmarks/heal_smollm2.py on the real checkpoint.

    python benchmarks/heal_timing.py --device cuda --settings 3072x40,8192x100
    python benchmarks/heal_timing.py --device cuda --settings 3072x40 --kl-steps 40   # + the end-to-end pass
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

SMOLLM2_135M = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    num_hidden_layers=30, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--params", type=float, default=0.75)
    ap.add_argument("--settings", default="3072x40,8192x100", help="tokens x steps, comma-separated")
    ap.add_argument("--kl-steps", type=int, default=0, help="end-to-end KL steps after each setting")
    args = ap.parse_args()
    from textdata import save_char_tokenizer, write_texts
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuckerctl.compress import compress
    from tuckerctl.heal import heal

    work = Path(tempfile.mkdtemp(prefix="heal-timing-"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(work / "model")
    save_char_tokenizer(work / "model", 64)
    text, _ = write_texts(work)
    t = time.perf_counter()
    compress(work / "model", work / "c", params=args.params, device=args.device)
    rows = {"device": str(torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
            "compress_s": round(time.perf_counter() - t, 2), "params": args.params, "heal": []}
    for k, setting in enumerate(args.settings.split(",")):
        tokens, steps = (int(x) for x in setting.split("x"))
        rec = heal(work / "c", work / "model", text, work / f"h{k}", tokens=tokens, steps=steps,
                   kl_steps=args.kl_steps, device=args.device)
        rows["heal"].append({"tokens": tokens, "steps": steps, "seconds": rec["seconds"], "loss": rec["loss"],
                             **({"kl_steps": args.kl_steps, "kl_seconds": rec["end_to_end"]["seconds"]}
                                if args.kl_steps else {})})
        print(json.dumps(rows["heal"][-1]), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
