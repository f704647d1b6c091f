#!/usr/bin/env python
"""How fast this machine's disk gives a checkpoint's bytes back, and how tuckerctl reads them.

    python benchmarks/read_study.py [--dir DIR] [--gb 4] [--out DIR]

Writes a DIR/read-study.bin of ``--gb`` GB (random bytes), then reads it whole after evicting
it from the page cache (fsync + POSIX_FADV_DONTNEED) in several ways: one stream of large
reads (what one ``readinto`` per tensor does), and positioned reads of fixed-size chunks on
several threads (several requests outstanding at once); once more warm (page cache, the
copy's own rate). Then tuckerctl's reader on every tensor of the safetensors files given with
``--checkpoint`` (cold each time): the stored bytes alone, and ``Checkpoint.get`` (read,
conversion to float32, finiteness check). Prints JSON; writes
``<out>/read-study.json`` with ``--out``. The file is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from run import emit, evict_file  # noqa: E402

from tuckerctl import checkpoint  # noqa: E402

MB = 1024 * 1024


def write_file(path: Path, nbytes: int) -> float:
    block = torch.randint(0, 256, (64 * MB,), dtype=torch.uint8).numpy().tobytes()
    t = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(0, nbytes, len(block)):
            f.write(block[: min(len(block), nbytes - i)])
        f.flush()
        os.fsync(f.fileno())
    return nbytes / (time.perf_counter() - t)


def read_stream(path: Path, size: int, request: int) -> None:
    buf = bytearray(request)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def read_parallel(path: Path, size: int, threads: int, chunk: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    bufs = [bytearray(chunk) for _ in range(threads)]

    def work(k: int) -> None:
        for off in range(k * chunk, size, threads * chunk):
            os.preadv(fd, [bufs[k]], off)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
    finally:
        os.close(fd)


def rate(path: Path, size: int, fn, *args, cold: bool = True) -> float:
    if cold:
        evict_file(path)
    t = time.perf_counter()
    fn(path, size, *args)
    return round(size / (time.perf_counter() - t) / MB, 1)


def checkpoint_rates(files: list[Path]) -> dict:
    """Cold reads of every tensor of ``files``: the stored bytes (``raw_bytes``) and ``get``
    (read, convert to float32, check finite), as MB/s of stored bytes."""
    total = raw_s = get_s = 0.0
    for f in files:
        ck = checkpoint.open_safetensors(f)
        evict_file(f)
        t = time.perf_counter()
        for name, info in ck.tensors.items():
            ck.raw_bytes(name)
            total += info.nbytes
        raw_s += time.perf_counter() - t
        evict_file(f)
        t = time.perf_counter()
        for name in ck.tensors:
            ck.get(name)
        get_s += time.perf_counter() - t
    return {"bytes": int(total), "raw_bytes_MBps": round(total / raw_s / MB, 1),
            "get_MBps": round(total / get_s / MB, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--gb", type=float, default=4.0)
    p.add_argument("--checkpoint", nargs="*", default=[], help="safetensors files to read with Checkpoint.get")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    path = Path(a.dir) / "read-study.bin"
    size = int(a.gb * 1024 * MB)
    out = {"dir": a.dir, "bytes": size, "write_MBps": round(write_file(path, size) / MB, 1), "reads_MBps": {}}
    try:
        plans = [("one stream, 128 MB requests", read_stream, 128 * MB),
                 ("one stream, 1 MB requests", read_stream, 1 * MB)]
        plans += [(f"{t} threads, {c // MB} MB chunks", read_parallel, t, c)
                  for t, c in ((2, 16 * MB), (4, 16 * MB), (8, 16 * MB), (16, 16 * MB), (32, 4 * MB), (8, 64 * MB))]
        for label, fn, *args in plans:
            out["reads_MBps"][label] = rate(path, size, fn, *args)
            print(label, out["reads_MBps"][label], "MB/s", flush=True)
        out["reads_MBps"]["warm, one stream, 128 MB requests"] = rate(path, size, read_stream, 128 * MB, cold=False)
    finally:
        path.unlink()
    if a.checkpoint:
        out["checkpoint_get"] = checkpoint_rates([Path(f) for f in a.checkpoint])
    emit(out, a.out, "read-study.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
