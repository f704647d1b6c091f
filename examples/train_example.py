"""Train the small GQA example model shipped in ``examples/tiny-gqa/``.

A 4-layer Llama-architecture decoder with grouped-query attention (8 query heads
sharing 2 key/value heads) is trained as a byte-level language model on the
Python standard library's own ``*.py`` files, so nothing has to be downloaded:
the vocabulary is the 256 byte values, no tokenizer needed.

Run from the repository root (500 steps, about 0.16 s each on 2 idle CPU cores):

    python examples/train_example.py            # writes examples/tiny-gqa/

The point is a checkpoint whose attention weights are *trained*, not random, small
enough to ship in the repository (float32 safetensors, about 2.4 MB) and to analyse
in seconds with ``tuckerctl analyze examples/tiny-gqa``.
"""

from __future__ import annotations

import argparse
import glob
import math
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 0
SEQ = 128  # tokens (bytes) per training sequence


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    """All top-level stdlib ``*.py`` files as one byte stream, split 95/5 by file
    (sorted, every 20th file to validation) so validation text is unseen."""
    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))
    if not files:
        raise SystemExit("no standard-library .py files found")
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        (val if i % 20 == 10 else train).extend(Path(f).read_bytes())
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val), len(files)


def batch(data: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """``size`` random windows of SEQ + 1 bytes (inputs and next-byte targets)."""
    starts = torch.randint(0, len(data) - SEQ - 1, (size,), generator=gen)
    return torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batches: int = 8, size: int = 32) -> float:
    """Mean next-byte cross-entropy (nats) on fixed windows (same seed every call)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = [model(input_ids=(b := batch(data, size, gen)), labels=b).loss.item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny-gqa")
    ap.add_argument("--save-every", type=int, default=0, metavar="N",
                    help="also save the model every N steps to OUT/step-N/ (rank evolution across training)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    train, val, n_files = load_corpus()
    print(f"corpus: {n_files} stdlib files, {len(train) / 1e6:.2f} MB train, {len(val) / 1e6:.2f} MB val")

    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=SEQ, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e3:.0f}k parameters (d=128, H=8, G=2, d_h=16, 4 layers)")

    before = (evaluate(model, train), evaluate(model, val))
    print(f"before: train loss {before[0]:.3f}, val loss {before[1]:.3f} (ln 256 = {math.log(256):.3f})")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    # Linear warm-up, then cosine decay to 10% of the peak learning rate.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        b = batch(train, args.batch, gen)
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:6.1f} s", flush=True)
        if args.save_every and step % args.save_every == 0:
            save(model, args.out / f"step-{step}")

    after = (evaluate(model, train), evaluate(model, val))
    print(f"after:  train loss {after[0]:.3f}, val loss {after[1]:.3f} "
          f"({args.steps} steps, {time.time() - t0:.0f} s)")

    save(model, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"saved to {args.out} ({size / 1e6:.2f} MB)")


def save(model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # float32 safetensors + config.json
    # No tokenizer or sampling defaults to speak of: the generation config only adds noise.
    (out / "generation_config.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
