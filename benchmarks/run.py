#!/usr/bin/env python
"""Benchmarks of tuckerctl at real model sizes, against dense TensorLy.

    python benchmarks/run.py [--device cpu|cuda] [--suite quick|full] [--out benchmarks/results]
                             [--workdir DIR] [--only NAME,...] [--max-dense-gb GB]

The suite writes random bf16 checkpoints with real tensor names and config.json
(attention tensors and input_layernorm only, to keep files small), then measures:
per-layer spectra / full-rank HOSVD against dense TensorLy HOSVD on the materialised
tensor (same process, same data), ``analyze`` end to end from disk, ``compress`` +
``verify``, and peak memory. Every timed run happens in a fresh subprocess so that
ru_maxrss is that run's peak. Prints a markdown table and writes
``<out>/<date>-<hardware>-<suite>.md`` and ``.json``. See benchmarks/README.md.

Imports: torch, safetensors, numpy, tensorly (dense baseline only) and tuckerctl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

SCHEMA = "tuckerctl.benchmark/1"
SEED = 20240601
MB = 1024 ** 2
GB = 1024 ** 3
# Peak-memory target: 2 x one layer's attention weights in fp32 + WORKSPACE_D2 float64
# d x d matrices (the unfolding-core matrix, its Gram, eigh's copy and workspace).
WORKSPACE_D2 = 4
# Dense TensorLy HOSVD holds W, a copy of each unfolding, V^H of the thin SVD (as large
# as W), LAPACK's copy of its input and the partial core products: 5 x W in fp32 as an
# estimate of its peak (measured: 5.2 x W on CPU at d = 2048, see results/).
DENSE_COPIES = 5

# ---------------------------------------------------------------------------------------
# Model shapes (random weights, real names)
# ---------------------------------------------------------------------------------------

MODELS = {
    "gqa-d2048": dict(label="GQA d=2048", kind="llama", model_type="llama", d=2048, H=32, G=8, dh=64,
                      real_layers=None),
    "llama3-8b": dict(label="Llama-3-8B", kind="llama", model_type="llama", d=4096, H=32, G=8, dh=128,
                      real_layers=32, rope_theta=500000.0),
    "llama3-70b": dict(label="Llama-3-70B", kind="llama", model_type="llama", d=8192, H=64, G=8, dh=128,
                       real_layers=80, rope_theta=500000.0),
    # Written as block-FP8 (E4M3, one float32 scale per 128 x 128 block, DeepSeek-V3's layout, which
    # tuckerctl reads): 72 GB instead of 143 GB in bf16, which the 2-GPU machine's disk cannot hold.
    "llama31-405b": dict(label="Llama-3.1-405B", kind="llama", model_type="llama", d=16384, H=128, G=8, dh=128,
                         real_layers=126, rope_theta=500000.0, fp8_block=128),
    "qwen25-7b": dict(label="Qwen2.5-7B", kind="llama", model_type="qwen2", d=3584, H=28, G=4, dh=128,
                      bias=True, real_layers=28, rope_theta=1000000.0),
    "deepseek-v3": dict(label="DeepSeek-V3", kind="mla", model_type="deepseek_v3", d=7168, H=128,
                        q_lora=1536, kv_lora=512, rope=64, nope=128, dv=128, real_layers=61),
}


# --smoke: the same benchmarks on tiny shapes, to check the script itself (numbers meaningless).
SMOKE_SHAPES = {
    "gqa-d2048": dict(d=128, H=8, G=2, dh=16), "llama3-8b": dict(d=256, H=8, G=2, dh=32),
    "llama3-70b": dict(d=256, H=8, G=2, dh=32), "llama31-405b": dict(d=320, H=10, G=2, dh=32),
    "qwen25-7b": dict(d=224, H=7, G=1, dh=32),
    "deepseek-v3": dict(d=256, H=8, q_lora=64, kv_lora=32, rope=16, nope=32, dv=32),
}


def use_smoke_shapes() -> None:
    for key, dims in SMOKE_SHAPES.items():
        MODELS[key].update(dims, label=MODELS[key]["label"] + " [smoke]")


def shape_text(key: str, layers: int) -> str:
    m = MODELS[key]
    of = f" of {m['real_layers']}" if m.get("real_layers") and m["real_layers"] != layers else ""
    if m["kind"] == "mla":
        dims = (f"d {m['d']}, H {m['H']}, q_lora {m['q_lora']}, kv_lora {m['kv_lora']}, "
                f"rope {m['rope']}, nope {m['nope']}, d_v {m['dv']}")
    else:
        dims = f"d {m['d']}, H {m['H']}, G {m['G']}, d_h {m['dh']}" + (", qkv bias" if m.get("bias") else "")
    return f"{m['label']} ({dims}); {layers}{of} layers"


def layer_tensors(key: str, i: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """One layer's attention tensors (+ input_layernorm) in bf16 on the CPU, from a per-layer
    seed; drawn on ``device`` (a GPU draws an 8B-shaped model in seconds; its numbers differ
    from the CPU generator's, which only matters for comparing values across machines)."""
    m = MODELS[key]
    gen = torch.Generator(device=device).manual_seed(SEED + 1000 * (zlib.crc32(key.encode()) % 100_000) + i)
    d = m["d"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def w(rows, cols):  # nn.Linear-like scale, so activations stay O(1)
        return (randn(rows, cols) / math.sqrt(cols)).to(torch.bfloat16).cpu()

    def gain(n):  # non-trivial norm gains, so that folding them matters
        return (1 + 0.1 * randn(n)).to(torch.bfloat16).cpu()

    p = f"model.layers.{i}."
    a = p + "self_attn."
    t = {p + "input_layernorm.weight": gain(d)}
    if m.get("fp8_block"):
        t.update(_fp8_layer(m, a, w, m["fp8_block"], device))
        return t
    if m["kind"] == "llama":
        H, G, dh = m["H"], m["G"], m["dh"]
        t.update({a + "q_proj.weight": w(H * dh, d), a + "k_proj.weight": w(G * dh, d),
                  a + "v_proj.weight": w(G * dh, d), a + "o_proj.weight": w(d, H * dh)})
        if m.get("bias"):
            for proj, rows in (("q_proj", H * dh), ("k_proj", G * dh), ("v_proj", G * dh)):
                t[a + proj + ".bias"] = (0.02 * randn(rows)).to(torch.bfloat16).cpu()
    else:
        H, rq, rkv, dr, dn, dv = m["H"], m["q_lora"], m["kv_lora"], m["rope"], m["nope"], m["dv"]
        t.update({a + "q_a_proj.weight": w(rq, d), a + "q_a_layernorm.weight": gain(rq),
                  a + "q_b_proj.weight": w(H * (dn + dr), rq),
                  a + "kv_a_proj_with_mqa.weight": w(rkv + dr, d), a + "kv_a_layernorm.weight": gain(rkv),
                  a + "kv_b_proj.weight": w(H * (dn + dv), rkv), a + "o_proj.weight": w(d, H * dv)})
    return t


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-FP8 quantisation as DeepSeek-V3 ships it: ``(weight in float8_e4m3fn, weight_scale_inv)``,
    one float32 scale per ``block`` x ``block`` tile (absmax / 448), so W = weight * scale per tile."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    tiles = torch.zeros(nr * block, nc * block, dtype=torch.float32, device=w.device)
    tiles[:rows, :cols] = w
    tiles = tiles.view(nr, block, nc, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-30)
    q = (tiles / scale[:, None, :, None]).view(nr * block, nc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).cpu(), scale.cpu()


def _fp8_layer(m: dict, a: str, w, block: int, device: str) -> dict[str, torch.Tensor]:
    """A Llama layer's four projections drawn in bf16 and stored as block-FP8 with their scales."""
    H, G, dh, d = m["H"], m["G"], m["dh"], m["d"]
    out = {}
    for proj, rows, cols in (("q_proj", H * dh, d), ("k_proj", G * dh, d), ("v_proj", G * dh, d),
                             ("o_proj", d, H * dh)):
        q, scale = fp8_blocks(w(rows, cols).to(device), block)
        out[a + proj + ".weight"], out[a + proj + ".weight_scale_inv"] = q, scale
    return out


def layer_fp32_bytes(key: str) -> int:
    """Bytes of one layer's attention tensors (without input_layernorm) in fp32."""
    m = MODELS[key]
    d = m["d"]
    if m["kind"] == "llama":
        H, G, dh = m["H"], m["G"], m["dh"]
        n = 2 * H * dh * d + 2 * G * dh * d + ((H + 2 * G) * dh if m.get("bias") else 0)
    else:
        H, rq, rkv, dr, dn, dv = m["H"], m["q_lora"], m["kv_lora"], m["rope"], m["nope"], m["dv"]
        n = rq * d + rq + H * (dn + dr) * rq + (rkv + dr) * d + rkv + H * (dn + dv) * rkv + d * H * dv
    return 4 * n


def memory_bound(key: str) -> int:
    return 2 * layer_fp32_bytes(key) + WORKSPACE_D2 * MODELS[key]["d"] ** 2 * 8


def config_for(key: str, layers: int) -> dict:
    m = MODELS[key]
    cfg = {"model_type": m["model_type"], "hidden_size": m["d"], "num_attention_heads": m["H"],
           "num_hidden_layers": layers, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6,
           "_tuckerctl_benchmark": "random weights; attention tensors and input_layernorm only"}
    if m.get("fp8_block"):
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [m["fp8_block"], m["fp8_block"]]}
    if m["kind"] == "llama":
        cfg.update({"num_key_value_heads": m["G"], "head_dim": m["dh"], "rope_theta": m.get("rope_theta", 1e4),
                    "architectures": ["Qwen2ForCausalLM" if m["model_type"] == "qwen2" else "LlamaForCausalLM"]})
        if m["model_type"] == "llama":
            cfg["attention_bias"] = bool(m.get("bias"))
    else:
        cfg.update({"architectures": ["DeepseekV3ForCausalLM"], "num_key_value_heads": m["H"],
                    "q_lora_rank": m["q_lora"], "kv_lora_rank": m["kv_lora"], "qk_rope_head_dim": m["rope"],
                    "qk_nope_head_dim": m["nope"], "v_head_dim": m["dv"], "rope_theta": 10000,
                    "max_position_embeddings": 163840, "rope_interleave": True,
                    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                     "mscale": 1.0, "mscale_all_dim": 1.0,
                                     "original_max_position_embeddings": 4096}})
    return cfg


def ensure_model(workdir: Path, key: str, layers: int, log, device: str = "cpu") -> Path:
    """Directory of a ``layers``-layer checkpoint: one safetensors shard per layer (cached
    under ``workdir/key/layers``, generated once from a fixed seed) linked by an index."""
    from safetensors.torch import save_file

    root = workdir / key
    shards = root / "layers"
    shards.mkdir(parents=True, exist_ok=True)
    params = json.dumps({**MODELS[key], "seed": SEED, "generator": device, "v": 1}, sort_keys=True)
    stamp = root / "params.json"
    if stamp.exists() and stamp.read_text() != params:
        shutil.rmtree(shards)
        shards.mkdir()
    stamp.write_text(params)
    weight_map = {}
    for i in range(layers):
        f = shards / f"layer-{i:03d}.safetensors"
        if not f.exists():
            t0 = time.perf_counter()
            tensors = layer_tensors(key, i, device)
            tmp = f.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, f)
            log(f"  generated {key} layer {i} ({f.stat().st_size / MB:.0f} MB, {time.perf_counter() - t0:.1f}s)")
        else:
            tensors = {n: None for n in _header_names(f)}
        weight_map.update({n: f.name for n in tensors})
    model = root / f"L{layers}"
    model.mkdir(exist_ok=True)
    for i in range(layers):
        link = model / f"layer-{i:03d}.safetensors"
        link.unlink(missing_ok=True)  # re-linked each time: the layer files may have been regenerated
        try:  # a hard link: inside the model folder (the reader refuses symlinks leading out of it)
            os.link(shards / link.name, link)
        except OSError:  # another file system: copy
            shutil.copyfile(shards / link.name, link)
    (model / "config.json").write_text(json.dumps(config_for(key, layers), indent=2))
    total = sum((shards / f"layer-{i:03d}.safetensors").stat().st_size for i in range(layers))
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return model


def ensure_aliased_model(workdir: Path, key: str, layers: int, distinct: int, log, device: str = "cpu") -> Path:
    """A ``layers``-layer checkpoint, one file per layer (``distinct`` is kept for the call sites:
    storing only a few layers' bytes, with several tensor names sharing one byte range, was
    measured on 2026-11-29 but tuckerctl's reader now rejects overlapping ranges as a damaged
    file, so every layer is written: the 405B shape needs 143 GB of disk)."""
    distinct = layers
    root = workdir / key / f"L{layers}-alias{distinct}"
    params = json.dumps({**MODELS[key], "seed": SEED, "generator": device, "v": 1, "layers": layers,
                         "distinct": distinct}, sort_keys=True)
    stamp = root / "params.json"
    if stamp.exists() and stamp.read_text() == params:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    weight_map = {}
    for j in range(min(distinct, layers)):
        t0 = time.perf_counter()
        tensors = layer_tensors(key, j, device)
        header, blobs, offset = {}, [], 0
        for name, t in tensors.items():
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            blobs.append(raw)
            for i in range(j, layers, distinct):
                header[name.replace(f"model.layers.{j}.", f"model.layers.{i}.", 1)] = {
                    "dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                    "data_offsets": [offset, offset + len(raw)]}
            offset += len(raw)
        text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
        text += b" " * (-len(text) % 8)
        f = root / f"alias-{j:03d}.safetensors"
        with open(f.with_suffix(".tmp"), "wb") as out:
            out.write(len(text).to_bytes(8, "little") + text)
            for raw in blobs:
                out.write(raw)
        os.replace(f.with_suffix(".tmp"), f)
        weight_map.update({n: f.name for n in header})
        log(f"  generated {key} layer block {j} ({f.stat().st_size / MB:.0f} MB, {time.perf_counter() - t0:.1f}s)")
    (root / "config.json").write_text(json.dumps(config_for(key, layers), indent=2))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    stamp.write_text(params)
    return root


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def _header_names(f: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        return list(h.keys())


# ---------------------------------------------------------------------------------------
# Measurement helpers (used in the worker subprocess)
# ---------------------------------------------------------------------------------------

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; else the peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss()


def peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def evict(path: str) -> int:
    """Drop the checkpoint's files from the page cache (fsync + POSIX_FADV_DONTNEED, best
    effort: no root needed) so that 'from disk' reads the disk. Returns bytes advised."""
    return sum(evict_file(f.resolve()) for f in Path(path).glob("*.safetensors"))


def evict_file(path: Path) -> int:
    """Drop one file from the page cache (as :func:`evict`); its size if advised, else 0."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        try:
            os.fsync(fd)
        except OSError:
            pass
        if not hasattr(os, "posix_fadvise"):
            return 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return Path(path).stat().st_size
    finally:
        os.close(fd)


def emit(rec: dict, out: str | None, name: str) -> None:
    """Print a study's record as JSON and, with ``out``, write it to ``out/name``."""
    text = json.dumps(rec, indent=1)
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(text)


def warm_up(dev: torch.device) -> None:
    """Load the BLAS/LAPACK/cuSOLVER kernels and create handles before any timing."""
    from tuckerctl.multilinear import HeadStack, mode_spectra, tucker

    g = torch.Generator().manual_seed(0)
    st = HeadStack(torch.randn(8, 96, 16, generator=g), torch.randn(2, 96, 16, generator=g)).to(dev, torch.float64)
    mode_spectra(st)
    tucker(st, (4, 8, 8), hooi_iters=1)
    for dt in (torch.float32, torch.float64):
        a = torch.randn(600, 600, generator=g).to(dev, dt)
        torch.linalg.eigh(a @ a.T)
        torch.linalg.eigvalsh(a @ a.T)
        torch.linalg.svd(a[:200], full_matrices=False)
        torch.linalg.qr(a)
    try:
        tl_tucker = _tensorly()
        tl_tucker(torch.randn(4, 24, 24, generator=g).to(dev), rank=[4, 24, 24], n_iter_max=0, init="svd")
    except ImportError:
        pass
    sync(dev)


def _tensorly():
    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    tl.set_backend("pytorch")
    return tl_tucker


def _mem(dev: torch.device) -> dict:
    out = {"rss_peak": peak_rss()}
    if dev.type == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated(dev)
    return out


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal)."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Meter:
    """Wall time, this process's CPU time and the CPU time everything else on the machine
    used meanwhile (interference from other jobs, and steal in a VM)."""

    def __init__(self):
        self.wall, self.cpu, self.busy = time.perf_counter(), time.process_time(), machine_busy_s()

    def stop(self) -> dict:
        out = {"wall_s": time.perf_counter() - self.wall, "cpu_s": time.process_time() - self.cpu}
        busy = machine_busy_s()
        if busy is not None and self.busy is not None:
            out["other_cpu_s"] = max(0.0, busy - self.busy - out["cpu_s"])
        return out


def task_analyze(t: dict, dev: torch.device) -> dict:
    from tuckerctl.analysis import analyze

    evicted = evict(t["path"]) if t.get("cold") else 0
    stamps = []
    sync(dev)
    meter = Meter()
    start, cpu = time.perf_counter(), time.process_time()
    doc = analyze(t["path"], layers=t.get("layers"), device=str(dev),
                  progress=lambda k, n: stamps.append(time.perf_counter()))
    sync(dev)
    total = time.perf_counter() - start
    marks = [start] + stamps
    return {"seconds": total, "cpu_s": time.process_time() - cpu,
            "per_layer": [b - a for a, b in zip(marks, marks[1:])],
            "layers": len(doc["layers"]), "evicted_bytes": evicted, "attention": doc["model"].get("attention"),
            "verdicts": doc["summary"]["verdicts"], "meter": meter.stop()}


def task_compress(t: dict, dev: torch.device) -> dict:
    from tuckerctl.compress import compress
    from tuckerctl.verify import verify

    out = Path(t["out"])
    evicted = evict(t["path"]) if t.get("cold") else 0
    sync(dev)
    meter = Meter()
    t0, cpu = time.perf_counter(), time.process_time()
    done = []  # seconds at which each layer was finished (compress's progress callback)
    info = compress(t["path"], out, ranks=t["ranks"], hooi_iters=t["hooi_iters"], device=str(dev),
                    dtype=t["dtype"], overwrite=True, progress=lambda k, n: done.append(time.perf_counter() - t0))
    sync(dev)
    t1 = time.perf_counter()
    mem_compress = _mem(dev)
    if t.get("verify", True):
        check = verify(out, t["path"], device=str(dev))
        gap = max(abs(r[k]["rel_error"] - r[k]["reported_error"]) for r in check["layers"] for k in ("pre", "post"))
    else:
        check, gap = {"max_rel_error": info["summary"]["max_rel_error"]}, None
    sync(dev)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in out.glob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return {"compress_s": t1 - t0, "verify_s": t2 - t1, "seconds": t2 - t0, "cpu_s": time.process_time() - cpu,
            "evicted_bytes": evicted, "meter": meter.stop(),
            "layers": len(info["layers"]), "param_ratio": info["summary"]["ratio"],
            "max_rel_error": check["max_rel_error"], "max_error_gap": gap, "out_bytes": size,
            "mem_after_compress": mem_compress, "layer_done_s": done,
            "steady_per_layer_s": (done[-1] - done[0]) / (len(done) - 1) if len(done) > 1 else None,
            "hosvd_vs_hooi": [[r["pre"]["rel_error_hosvd"], r["pre"]["rel_error"]] for r in info["layers"][:4]]}


def cli_command(args: list[str], nproc: int) -> list[str]:
    """``python -m tuckerctl ARGS``, or the same under torchrun with ``nproc`` processes."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "tuckerctl", *args]
    return [sys.executable, "-m", "tuckerctl", *args]


class GpuMemoryPoll:
    """Peak of nvidia-smi's memory.used per GPU while a command runs (the whole process:
    CUDA context and the allocator's cache included, so above max_memory_allocated)."""

    def __init__(self):
        self.peak: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout.split()
                used = [int(x) * MB for x in out]
                self.peak = [max(a, b) for a, b in zip(used, self.peak)] if self.peak else used
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self.stop.wait(0.5)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=15)


def run_cli(args: list[str], nproc: int, device: str, timeout: float, evict_path: str | None,
            env: dict | None = None) -> dict:
    """Wall time of one CLI command as a user runs it (interpreter start-up, CUDA
    initialisation and writing the JSON included), the children's peak RSS and, on CUDA,
    nvidia-smi's peak memory per GPU."""
    evicted = evict(evict_path) if evict_path else 0
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    meter = Meter()
    with GpuMemoryPoll() if device == "cuda" else _nothing() as poll:
        t0 = time.perf_counter()
        # torchrun gives every process OMP_NUM_THREADS=1 unless it is set: give each its share of the cores
        # (on the 2-H200 machine one thread per process cost 32% of analyze's time).
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))} if nproc > 1 else {}
        res = subprocess.run(cli_command(args, nproc), capture_output=True, text=True, timeout=timeout,
                             env={**threads, **os.environ, **(env or {}),
                                  "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exited {res.returncode}: {res.stderr.strip()[-600:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"wall_s": wall, "meter": meter.stop(), "evicted_bytes": evicted, "nproc": nproc,
            "children_peak_rss": rss if rss > before * 1024 else None,
            "gpu_peak_used": getattr(poll, "peak", None)}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def task_compare(t: dict, dev: torch.device) -> dict:
    """Structured (tuckerctl) vs dense TensorLy HOSVD per layer, same data, same process.

    Structured first (its peak memory is then the process peak so far), dense second."""
    from tuckerctl.adapters import detect
    from tuckerctl.loader import open_checkpoint
    from tuckerctl.multilinear import clamp_ranks, mode_spectra, tucker

    ckpt = open_checkpoint(t["path"])
    adapter, spec = detect(ckpt)
    t0 = time.perf_counter()
    layers = [adapter.layer(ckpt, spec, i) for i in t["layers"]]
    read_s = time.perf_counter() - t0
    items = [(lw.index, key, getattr(lw, key)) for lw in layers for key in ("pre", "post")]
    rows = []
    meter = Meter()
    for index, key, stack in items:
        row = {"layer": index, "tensor": key, "shape": list(stack.shape)}
        sync(dev)
        a, cpu_a = time.perf_counter(), time.process_time()
        st = stack.to(device=dev, dtype=torch.float64)
        sync(dev)
        moved = time.perf_counter()
        spectra = mode_spectra(st)
        s_cpu = [s.cpu() for s in spectra]
        sync(dev)
        b = time.perf_counter()
        tk = tucker(st, clamp_ranks(st, st.shape), hooi_iters=0)
        sync(dev)
        c, cpu_c = time.perf_counter(), time.process_time()
        row["structured_cpu_s"] = cpu_c - cpu_a  # process CPU time of spectra + HOSVD
        # Both timings include the upcast to float64 and the copy to the device.
        row.update({"spectra_s": b - a, "hosvd_s": (c - b) + (moved - a), "hosvd_ranks": list(tk.ranks),
                    "hosvd_rel_error": tk.rel_error, "_sigma": s_cpu})
        del st, tk, spectra
        rows.append(row)
    mem_structured = _mem(dev)
    meters = {"structured": meter.stop()}
    partial = {"read_s": read_s, "rows": [{k: v for k, v in r.items() if k != "_sigma"} for r in rows],
               "mem_structured": mem_structured, "rss_baseline": _BASELINE[0], "meters": meters}
    print("PARTIAL " + json.dumps(partial), flush=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before_dense = current_rss()
    meter = Meter()
    limit = t["max_dense_gb"] * GB
    tl_tucker = None
    for row, (index, key, stack) in zip(rows, items):
        H, m, n = stack.shape
        need = DENSE_COPIES * H * m * n * 4
        row["dense_need_bytes"] = need
        if need >= limit:
            row["dense"] = f"not run: needs >= {need / GB:.1f} GB (> --max-dense-gb {t['max_dense_gb']:g})"
            continue
        W = core = factors = None
        try:
            tl_tucker = tl_tucker or _tensorly()
            sync(dev)
            a = time.perf_counter()
            W = stack.to(device=dev, dtype=torch.float32).dense()
            sync(dev)
            b, cpu_b = time.perf_counter(), time.process_time()
            core, factors = tl_tucker(W, rank=[min(H, m * n), min(m, H * n), min(n, H * m)],
                                      n_iter_max=0, init="svd")
            sync(dev)
            c = time.perf_counter()
            row["dense_cpu_s"] = time.process_time() - cpu_b
            # Full-rank HOSVD: the mode-k singular values are the norms of the core's slices.
            dense = [torch.linalg.vector_norm(core, dim=dims, dtype=torch.float64).cpu().sort(descending=True)[0]
                     for dims in ((1, 2), (0, 2), (0, 1))]
            row.update({"dense": "ok", "materialise_s": b - a, "dense_s": c - b,
                        "agreement": _agreement(row["_sigma"], dense)})
        except Exception as e:  # noqa: BLE001 - report the dense failure as the result
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            row["dense"] = f"failed: {type(e).__name__}: {msg[:200]}"
        finally:
            del W, core, factors
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    mem_dense = _mem(dev)
    meters["dense"] = meter.stop()
    # Untimed fp64 oracle: dense float64 Grams of the three unfoldings (TensorLy's fp32 SVDs
    # limit the agreement above to ~1e-5 with LAPACK, ~1e-3 with cuSOLVER's gesvdj; this shows
    # what the structured float64 math reaches).
    for row, (index, key, stack) in zip(rows, items):
        H, m, n = stack.shape
        if row.get("dense") != "ok" or 3 * H * m * n * 8 >= limit:
            continue
        W = stack.to(device=dev, dtype=torch.float64).dense()
        grams = [W.reshape(H, -1) @ W.reshape(H, -1).T,
                 sum(W[h] @ W[h].T for h in range(H)), sum(W[h].T @ W[h] for h in range(H))]
        dense64 = [torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt().cpu() for g in grams]
        row["agreement_fp64"] = _agreement(row["_sigma"], dense64)
        del W, grams
    for row in rows:
        row["sigma_lengths"] = [len(s) for s in row.pop("_sigma")]
    return {"read_s": read_s, "rows": rows, "mem_structured": mem_structured, "rss_before_dense": rss_before_dense,
            "mem_dense": mem_dense, "meters": meters}


def _agreement(structured, dense) -> list[float]:
    """Per mode: max_i |sigma_structured - sigma_dense| / sigma_dense_1, the structured values
    zero-padded past their reduced width (e.g. the key mode beyond G*d_h)."""
    out = []
    for s, sd in zip(structured, dense):
        s, sd = s.double(), sd.double()
        k = min(len(s), len(sd))
        pad = torch.cat([s[:k], torch.zeros(len(sd) - k, dtype=torch.float64)])
        out.append(float((pad - sd).abs().max() / sd[0]))
    return out


_BASELINE = [0]  # the worker's RSS after imports and warm-up
TASKS = {"analyze": task_analyze, "compress": task_compress, "compare": task_compare}


def worker(task: dict) -> dict:
    dev = torch.device(task["device"])
    warm_up(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    base = _BASELINE[0] = current_rss()
    out = TASKS[task["task"]](task, dev)
    out.update({"rss_baseline": base, **_mem(dev)})
    return out


def run_worker(task: dict, timeout: float, log, dense_timeout: float | None = None) -> dict:
    """Run one task in a fresh interpreter; its last ``RESULT`` stdout line is the JSON result.

    A comparison prints a ``PARTIAL`` line (the tuckerctl side) before its dense side; if the
    dense side then runs past ``dense_timeout`` s the worker is killed and the partial result
    is returned with the dense side marked as not finished (a CUDA call cannot be interrupted
    in-process, and the dense run must stay in the same process as tuckerctl's)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    if MODELS["gqa-d2048"]["label"].endswith("[smoke]"):
        cmd.append("--smoke")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err, partial_at = [], [], []

    def pump(stream, sink, watch):
        for line in stream:
            sink.append(line.rstrip("\n"))
            if watch and line.startswith("PARTIAL "):
                partial_at.append(time.perf_counter())

    readers = [threading.Thread(target=pump, args=(p.stdout, out, True), daemon=True),
               threading.Thread(target=pump, args=(p.stderr, err, False), daemon=True)]
    for r in readers:
        r.start()
    killed = None
    while p.poll() is None:
        now = time.perf_counter()
        if now - t0 > timeout:
            killed = f"timed out after {timeout:g} s"
        elif dense_timeout and partial_at and now - partial_at[0] > dense_timeout:
            killed = f"did not finish within {dense_timeout:g} s (worker killed)"
        if killed:
            p.kill()
            break
        time.sleep(0.2)
    p.wait()
    for r in readers:
        r.join(timeout=10)
    results = [ln for ln in out if ln.startswith("RESULT ")]
    partial = [ln for ln in out if ln.startswith("PARTIAL ")]
    if results:  # complete (a kill during interpreter shutdown does not matter)
        res = json.loads(results[-1][len("RESULT "):])
    elif killed and partial:
        res = json.loads(partial[-1][len("PARTIAL "):])
        for row_ in res["rows"]:
            row_.setdefault("dense", killed)
        log(f"  dense side {killed}")
    else:
        tail = [ln[:300] for ln in (err or out)[-12:]]
        raise RuntimeError(f"worker exited {p.returncode}{' (' + killed + ')' if killed else ''}: "
                           + " | ".join(tail))
    res["subprocess_wall_s"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------
# Benchmarks (parent side): each returns rows for the table and details for the JSON
# ---------------------------------------------------------------------------------------

def fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s ({s / 60:.1f} min)"


def fmt_other(meter: dict | None) -> str:
    """How much other jobs used the machine during a measurement, in cores on average."""
    if not meter or "other_cpu_s" not in meter or meter["wall_s"] <= 0:
        return ""
    return f"other jobs used {meter['other_cpu_s'] / meter['wall_s']:.1f} cores meanwhile"


def fmt_mem(res: dict) -> str:
    rss = res["rss_peak"] - res["rss_baseline"]
    text = f"RSS +{rss / MB:.0f} MB"
    if "gpu_peak" in res:
        text += f"; GPU {res['gpu_peak'] / MB:.0f} MB"
    return text


def within_bound(res: dict, bound: int) -> bool:
    ok = res["rss_peak"] - res["rss_baseline"] <= bound
    return ok and res.get("gpu_peak", 0) <= bound


def row(bench, shape, device, time_s, ratio="—", memory="—", agreement="—", target="—", met="n/a", note=""):
    return {"benchmark": bench, "shape": shape, "device": device, "time": time_s, "ratio": ratio,
            "peak memory": memory, "spectra agreement": agreement, "target": target, "met?": met, "note": note}


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


class Suite:
    def __init__(self, args, log):
        self.args, self.log = args, log
        self.dev = args.device
        self.quick = args.suite == "quick"
        self.workdir = Path(args.workdir)

    def model(self, key, layers):
        return ensure_model(self.workdir, key, layers, self.log, self.dev)

    def work(self, task):
        task = {"device": self.dev, "cold": not self.args.warm_cache, **task}
        self.log(f"  running {task['task']} on {Path(task['path']).parent.name}/{Path(task['path']).name} ...")
        res = run_worker(task, self.args.timeout, self.log,
                         self.args.dense_timeout if task["task"] == "compare" else None)
        self.log(f"  done in {res['subprocess_wall_s']:.1f}s")
        return res

    # -- per-layer comparison with dense TensorLy ------------------------------------
    def compare_rows(self, key, layers, res, ratio_target=None):
        """Two rows (spectra, full-rank HOSVD) from one comparison run. With ``ratio_target``
        the dense side is expected to run (the speed-up is the target); without, the target is
        that dense fails or cannot fit while tuckerctl completes."""
        model_shape = shape_text(key, layers)
        rows_ = res["rows"]
        ran = [r for r in rows_ if r.get("dense") == "ok"]
        failed = [r["dense"] for r in rows_ if r.get("dense") != "ok"]
        nl = len({r["layer"] for r in rows_})
        mem_s = {"rss_peak": res["mem_structured"]["rss_peak"], "rss_baseline": res["rss_baseline"],
                 **({"gpu_peak": res["mem_structured"]["gpu_peak"]} if "gpu_peak" in res["mem_structured"] else {})}
        memory = fmt_mem(mem_s)
        dense_time = sum(r["dense_s"] for r in ran)
        cpu_note = ""
        if all("structured_cpu_s" in r for r in rows_):
            cpu_note = f"process CPU time: tuckerctl {sum(r['structured_cpu_s'] for r in rows_):.1f} s"
            if ran and all("dense_cpu_s" in r for r in ran):
                cpu_note += f", dense {sum(r['dense_cpu_s'] for r in ran):.1f} s"
        meters = res.get("meters", {})
        others = [f"{side}: {fmt_other(meters.get(side))}" for side in ("structured", "dense") if fmt_other(meters.get(side))]
        if others:
            cpu_note += "; " + ", ".join(others)
        if ran:
            dense_mem = res["mem_dense"]["rss_peak"] - res["rss_before_dense"]
            memory += f" (dense: RSS +{max(dense_mem, 0) / MB:.0f} MB" + (
                f", GPU {res['mem_dense']['gpu_peak'] / MB:.0f} MB)" if "gpu_peak" in res["mem_dense"] else ")")
        out = []
        for name, field in (("spectra per layer (analyze math)", "spectra_s"),
                            ("full-rank HOSVD per layer (tucker)", "hosvd_s")):
            ours = sum(r[field] for r in rows_) / nl
            agree = f"{max(max(r['agreement']) for r in ran):.1e} vs TensorLy fp32" if ran else "—"
            if ran and all("agreement_fp64" in r for r in ran):
                agree += f"; {max(max(r['agreement_fp64']) for r in ran):.1e} vs dense fp64 Grams"
            note = "; ".join(x for x in (cpu_note, f"dense {failed[0]}" if failed else "") if x)
            if ratio_target is not None:  # dense must run: the speed-up is the target
                target = f">= {ratio_target}x vs dense" if self.dev == "cpu" else "faster than dense"
                need = ratio_target if self.dev == "cpu" else 1
                if ran:  # over the tensors that both sides finished
                    ratio = dense_time / sum(r[field] for r in ran)
                    text = f"{ratio:.1f}x (dense {fmt_s(dense_time / len(ran) * 2)}/layer)"
                    text += f" on {len(ran)} of {len(rows_)} tensors" if failed else ""
                    met = yes(ratio >= need)
                elif failed[0].startswith("did not finish"):
                    # Lower bound: dense had at least the timeout for its first tensor.
                    low = self.args.dense_timeout / (sum(r[field] for r in rows_))
                    text = f"> {low:.0f}x (dense {failed[0]})"
                    met = "yes" if low >= need else "inconclusive"
                else:
                    text, met = f"— (dense {failed[0]})", "n/a"
                out.append(row(f"{name} vs dense TensorLy HOSVD", model_shape, self.dev, fmt_s(ours), text,
                               memory, agree, target, met, note))
            else:
                target = "dense infeasible, tuckerctl completes"
                if failed and not ran:
                    text, met = f"dense {failed[0]}", yes(ours > 0)
                else:
                    text = f"{dense_time / sum(r[field] for r in ran):.1f}x (dense ran: {fmt_s(dense_time / nl)}/layer)"
                    met = "NO (dense ran)"
                out.append(row(f"{name}; dense TensorLy HOSVD", model_shape, self.dev, fmt_s(ours), text, memory,
                               agree, target, met, note))
        return out

    def bench_hosvd_d2048(self):
        layers = 1 if self.quick and self.dev == "cpu" else 2
        path = self.model("gqa-d2048", 2)
        res = self.work({"task": "compare", "path": str(path), "layers": list(range(layers)),
                         "max_dense_gb": self.args.max_dense_gb})
        rows_ = self.compare_rows("gqa-d2048", layers, res, 20)
        for r in rows_:
            r["shape"] = shape_text("gqa-d2048", 2) + f", {layers} compared"
        return rows_, res

    def bench_hosvd_8b(self):
        path = self.model("llama3-8b", 1)
        res = self.work({"task": "compare", "path": str(path), "layers": [0],
                         "max_dense_gb": self.args.max_dense_gb})
        rows_ = self.compare_rows("llama3-8b", 1, res)
        for r in rows_:
            r["shape"] = shape_text("llama3-8b", 32).replace("32 layers", "layer 0")
        return rows_, res

    # -- analyze end to end --------------------------------------------------------------
    def analyze_row(self, key, layers, res, target_s=None, per_layer_target=None, name="analyze end to end"):
        bound = memory_bound(key)
        mem_ok = within_bound(res, bound)
        t = res["seconds"]
        pl = res["per_layer"]
        excess = max(res["rss_peak"] - res["rss_baseline"], res.get("gpu_peak", 0)) - 2 * layer_fp32_bytes(key)
        busy = f"; process CPU time {res['cpu_s']:.0f} s ({res['cpu_s'] / t:.1f} cores busy)" if "cpu_s" in res else ""
        other = fmt_other(res.get("meter"))
        busy += f"; {other}" if other else ""
        note = (f"per layer: first {pl[0]:.2f}s, median {statistics.median(pl):.2f}s, max {max(pl):.2f}s{busy}; "
                f"{'cold' if res['evicted_bytes'] else 'warm'} page cache; peak = 2 layers fp32 + "
                f"{excess / (8 * MODELS[key]['d'] ** 2):.1f} d^2 float64")
        # A time target is judged alone (memory has its own verdict in the note / memory row).
        target, met = f"peak <= {bound / MB:.0f} MB", yes(mem_ok)
        if target_s is not None or per_layer_target is not None:
            note += f"; peak memory vs bound {bound / MB:.0f} MB: {'within' if mem_ok else 'ABOVE'}"
        if target_s is not None:
            target, met = f"<= {target_s:g} s", yes(t <= target_s)
        if per_layer_target is not None:
            target, met = f"<= {per_layer_target:g} s/layer (slowest layer)", yes(max(pl) <= per_layer_target)
        return row(name, shape_text(key, layers), self.dev, fmt_s(t) + f" ({t / layers:.2f} s/layer)",
                   memory=fmt_mem(res), target=target, met=met, note=note)

    def bench_analyze_8b(self):
        rows_, details = [], {}
        if self.quick:
            path = self.model("llama3-8b", 2)
            res = self.work({"task": "analyze", "path": str(path)})
            r = self.analyze_row("llama3-8b", 2, res)
            r["note"] += "; quick suite: 2 of 32 layers, no time target claimed"
            return [r], {"L2": res}
        target = 10 if self.dev == "cuda" else 300
        for n in (32, 8):
            path = self.model("llama3-8b", n)
            details[f"L{n}"] = self.work({"task": "analyze", "path": str(path)})
        r32, r8 = details["L32"], details["L8"]
        rows_.append(self.analyze_row("llama3-8b", 32, r32, target_s=target))
        bound = memory_bound("llama3-8b")
        one = layer_fp32_bytes("llama3-8b")
        growth = (r32["rss_peak"] - r32["rss_baseline"]) - (r8["rss_peak"] - r8["rss_baseline"])
        gpu_growth = r32.get("gpu_peak", 0) - r8.get("gpu_peak", 0)
        flat = growth <= one and gpu_growth <= one
        rows_.append(row("peak memory, 8 vs 32 layers (analyze)", shape_text("llama3-8b", 32).replace(
            "; 32 layers", "; 8 and 32 layers"), self.dev, f"{fmt_s(r8['seconds'])} / {fmt_s(r32['seconds'])}",
            memory=f"8 L: {fmt_mem(r8)}; 32 L: {fmt_mem(r32)}",
            target=f"each <= {bound / MB:.0f} MB; growth <= 1 layer fp32 ({one / MB:.0f} MB)",
            met=f"flat: {yes(flat)}; bound: {yes(within_bound(r8, bound) and within_bound(r32, bound))}",
            note=f"growth 8->32 layers: RSS {growth / MB:+.0f} MB" + (
                f", GPU {gpu_growth / MB:+.0f} MB" if "gpu_peak" in r32 else "")))
        return rows_, details

    def bench_compress(self):
        big = not self.quick and self.dev == "cuda"
        key, n = ("llama3-8b", 32) if big else ("gqa-d2048", 2)
        ranks = self.args.compress_ranks if big else "8,256,128"
        path = self.model(key, n)
        out = self.workdir / f"{key}-L{n}-tucker"
        res = self.work({"task": "compress", "path": str(path), "out": str(out), "ranks": ranks,
                         "hooi_iters": 2, "dtype": "float32"})
        target, met = ("<= 60 s", yes(res["seconds"] <= 60)) if key == "llama3-8b" and self.dev == "cuda" \
            else ("— (the 60 s target is for the 8B shape on an H200)", "n/a")
        return [row(f"compress (HOSVD + 2 HOOI, ranks {ranks}) + verify", shape_text(key, n), self.dev,
                    f"{fmt_s(res['seconds'])} (compress {res['compress_s']:.1f} + verify {res['verify_s']:.1f})",
                    memory=fmt_mem(res),
                    agreement=f"verify vs reported error: {res['max_error_gap']:.1e}",
                    target=target, met=met,
                    note=f"max rel. error {res['max_rel_error']:.3f} (random weights: high by nature), params "
                         f"{100 * res['param_ratio']:.0f}% of attention, output {res['out_bytes'] / MB:.0f} MB "
                         f"(written with fsync); peak RSS after compress "
                         f"+{(res['mem_after_compress']['rss_peak'] - res['rss_baseline']) / MB:.0f} MB, "
                         f"the rest is verify" + (f"; {fmt_other(res.get('meter'))}" if fmt_other(res.get('meter'))
                                                  else ""))], res

    def bench_mla(self):
        n = 1 if self.quick else 3
        path = self.model("deepseek-v3", n)
        res = self.work({"task": "analyze", "path": str(path)})
        target = 1 if self.dev == "cuda" else None
        r = self.analyze_row("deepseek-v3", n, res, per_layer_target=target, name="analyze end to end (MLA)")
        return [r], res

    def bench_llama70b(self):
        path = self.model("llama3-70b", 3)
        res = self.work({"task": "analyze", "path": str(path)})
        return [self.analyze_row("llama3-70b", 3, res)], res

    def bench_qwen7b(self):
        n = 1 if self.quick else 28
        path = self.model("qwen25-7b", n)
        res = self.work({"task": "analyze", "path": str(path)})
        return [self.analyze_row("qwen25-7b", n, res, name="analyze end to end (q/k/v bias)")], res


# Whole-model CLI runs: (model key, layers, {nproc: target seconds}).
WHOLE = {"whole-8b": ("llama3-8b", 32, {1: 6}), "whole-v3": ("deepseek-v3", 61, {1: 40}),
         "whole-70b": ("llama3-70b", 80, {1: 60, 2: 35}), "whole-405b": ("llama31-405b", 126, {2: 300})}


def _bench_whole(self, name):
    """``tuckerctl analyze MODEL --output FILE`` on a whole model, CLI wall time."""
    key, layers, targets = WHOLE[name]
    nproc = self.args.nproc
    whole = layers
    if self.args.smoke:  # a check of the script: a few layers
        layers = 5
    if self.args.max_layers:
        layers = min(layers, self.args.max_layers)
    path = ensure_aliased_model(self.workdir, key, layers, layers, self.log, self.dev)
    doc_path = self.workdir / f"{name}-n{nproc}.json"
    self.log(f"  running tuckerctl analyze on {path.name} ({nproc} process{'es' if nproc > 1 else ''}) ...")
    res = run_cli(["analyze", str(path), "--device", self.dev, "--quiet", "--output", str(doc_path)], nproc,
                  self.dev, self.args.timeout, None if self.args.warm_cache else str(path))
    doc = json.loads(doc_path.read_text())
    res.update({"analyze_seconds": doc["summary"]["seconds"],
                "json_bytes": doc_path.stat().st_size, "layers": len(doc["layers"])})
    doc_path.unlink()
    self.log(f"  done in {res['wall_s']:.1f}s")
    t = res["wall_s"]
    target = targets.get(nproc) if self.dev == "cuda" else None
    gpu = res.get("gpu_peak_used")
    memory = (f"GPU {', '.join(f'{g / GB:.1f}' for g in gpu)} GB (nvidia-smi)" if gpu else "") + (
        f"; RSS {res['children_peak_rss'] / GB:.1f} GB" if res.get("children_peak_rss") else "")
    note = (f"{nproc} process{'es' if nproc > 1 else ''}; analyze() {res['analyze_seconds']:.1f} s of the wall time, "
            f"the rest is start-up and writing the {res['json_bytes'] / MB:.0f} MB JSON; "
            f"{layers} layer files; {fmt_other(res['meter'])}")
    if MODELS[key].get("fp8_block"):
        note += f"; weights stored as block-FP8 E4M3 ({MODELS[key]['fp8_block']}^2 scales)"
    partial = layers < whole and not self.args.smoke
    if partial:  # --max-layers: the whole model's time extrapolated from the measured layers
        res["extrapolated_whole_s"] = t + (whole - layers) * res["analyze_seconds"] / layers
        note += (f"; --max-layers {layers}: all {whole} layers extrapolated at this run's analyze() time per "
                 f"layer: {res['extrapolated_whole_s']:.0f} s")
    unit = ("GPU" if self.dev == "cuda" else "process") + ("s" if nproc > 1 and self.dev == "cuda" else
                                                           "es" if nproc > 1 else "")
    return [row(f"analyze, whole model, CLI ({nproc} {unit})", shape_text(key, layers), self.dev,
                fmt_s(t) + f" ({t / layers:.2f} s/layer)", memory=memory or "—",
                target=f"<= {target:g} s" if target else "—",
                met=("n/a (partial)" if partial else yes(t <= target)) if target else "n/a",
                note=note)], res


def _bench_compress_70b(self):
    """compress at the Llama-3-70B shape (HOSVD + 2 HOOI sweeps), per layer, without verify: the
    whole run per layer, and the steady rate between the first and last finished layer (what the
    80-layer estimate uses: the first layer's time plus 79 at that rate)."""
    n = 3 if self.quick else 8
    path = self.model("llama3-70b", n)
    out = self.workdir / "llama3-70b-tucker"
    res = self.work({"task": "compress", "path": str(path), "out": str(out), "ranks": "16,1024,512",
                     "hooi_iters": 2, "dtype": "float32", "verify": False})
    per, steady = res["compress_s"] / n, res["steady_per_layer_s"] or res["compress_s"] / n
    # first layer (read, fill) + 79 at the steady rate + the checkpoint write, which grows with the layers
    whole = res["layer_done_s"][0] + 79 * steady + (res["compress_s"] - res["layer_done_s"][-1]) * 80 / n
    target = 2.5 if self.dev == "cuda" else None
    return [row("compress (HOSVD + 2 HOOI, ranks 16,1024,512), per layer", shape_text("llama3-70b", n), self.dev,
                f"{steady:.2f} s/layer steady ({res['compress_s']:.1f} s for {n}, {per:.2f} s/layer with the "
                f"pipeline's fill; 80 layers ~ {whole:.0f} s)",
                memory=fmt_mem(res), target=f"<= {target} s/layer" if target else "—",
                met=yes(steady <= target) if target else "n/a",
                note=f"max rel. error {res['max_rel_error']:.3f}; {fmt_other(res.get('meter'))}")], res


def _bench_torchrun_same(self):
    """analyze (32 layers) and compress (4 layers) at the Llama-3-8B shape: one process vs
    ``--nproc`` processes under torchrun; the documents must match apart from timings and the
    written factors byte for byte."""
    from safetensors.torch import load_file

    from tuckerctl.checkpoint import read_header

    nproc = max(2, self.args.nproc)
    layers = 5 if self.args.smoke else 32
    path = ensure_aliased_model(self.workdir, "llama3-8b", layers, layers, self.log, self.dev)
    # torchrun gives each process one CPU thread; on the CPU the single process must use the
    # same, or BLAS sums in another order and the last bits differ.
    env = {"OMP_NUM_THREADS": "1"} if self.dev == "cpu" else None
    docs, walls = [], []
    for n in (1, nproc):
        out = self.workdir / f"same-{n}.json"
        walls.append(run_cli(["analyze", str(path), "--device", self.dev, "--quiet", "--output", str(out)], n,
                             self.dev, self.args.timeout, None, env)["wall_s"])
        doc = json.loads(out.read_text())
        doc["summary"].pop("seconds")
        docs.append(doc)
    small = ensure_aliased_model(self.workdir, "llama3-8b", 4, 4, self.log, self.dev)
    outs = []
    for n in (1, nproc):
        out = self.workdir / f"same-{n}-tucker"
        shutil.rmtree(out, ignore_errors=True)
        run_cli(["compress", str(small), "-o", str(out), "--ranks", "8,256,128", "--no-check", "--quiet",
                 "--device", self.dev], n, self.dev, self.args.timeout, None, env)
        outs.append(out)
    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    same_factors = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ia, ib = (json.loads(read_header(o / "model.safetensors")[1]["tuckerctl"]) for o in outs)
    same_records = ia["layers"] == ib["layers"] and ia["settings"] == ib["settings"]
    ok = docs[0] == docs[1] and same_factors and same_records
    res = {"analyze_identical": docs[0] == docs[1], "factors_identical": same_factors,
           "compress_records_identical": same_records, "analyze_wall_s": walls, "nproc": nproc}
    return [row(f"torchrun {nproc} processes vs 1: same results", shape_text("llama3-8b", layers), self.dev,
                f"analyze {walls[0]:.1f} s vs {walls[1]:.1f} s", target="identical apart from timings",
                met=yes(ok), note=f"analyze documents identical: {res['analyze_identical']}; compress (4 layers) "
                f"factors byte-identical: {same_factors}, records identical: {same_records}")], res


for _name in WHOLE:
    setattr(Suite, "bench_" + _name.replace("-", "_"), lambda self, _n=_name: _bench_whole(self, _n))
Suite.bench_compress_70b = _bench_compress_70b
Suite.bench_torchrun_same = _bench_torchrun_same

BENCHMARKS = {  # name -> (method, in quick suite)
    "hosvd-d2048": ("bench_hosvd_d2048", True),
    "hosvd-8b": ("bench_hosvd_8b", True),
    "analyze-8b": ("bench_analyze_8b", True),
    "compress": ("bench_compress", True),
    "mla-v3": ("bench_mla", True),
    "qwen7b": ("bench_qwen7b", True),
    "llama70b": ("bench_llama70b", False),
    "compress-70b": ("bench_compress_70b", False),
    "torchrun-same": ("bench_torchrun_same", False),
    **{name: ("bench_" + name.replace("-", "_"), False) for name in WHOLE},
}

# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------

COLUMNS = ["benchmark", "shape", "device", "time", "ratio", "peak memory", "spectra agreement", "target", "met?"]


def markdown_table(rows: list[dict]) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str) -> dict:
    hw = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "torch": torch.__version__, "python": platform.python_version()}
    try:
        hw["ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import tensorly
        hw["tensorly"] = tensorly.__version__
    except ImportError:
        hw["tensorly"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        hw.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / GB, 1),
                   "cuda": torch.version.cuda})
    return hw


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def slug(hw: dict) -> str:
    name = hw.get("gpu") or hw["cpu"]
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu", "", name.lower())
    name = re.sub(r"[^a-z0-9.]+", "-", name).strip("-")
    return f"{name}-{hw['cores']}c-torch{hw['torch'].split('+')[0]}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--suite", choices=["quick", "full"], default="quick")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results directory")
    p.add_argument("--workdir", default=None,
                   help="where generated checkpoints are cached (default: a temp dir, deleted at the end)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--max-dense-gb", type=float, default=None,
                   help="skip the dense baseline when its estimated memory exceeds this "
                        "(default: 8 on cpu, 90%% of the GPU's memory on cuda)")
    p.add_argument("--dense-timeout", type=float, default=None,
                   help="give up on the dense side of a comparison after this many seconds "
                        "(default: 1800 on cpu, 180 on cuda)")
    p.add_argument("--compress-ranks", default="8,512,256", help="ranks for the 8B compress benchmark")
    p.add_argument("--warm-cache", action="store_true",
                   help="do not evict the checkpoint files from the page cache before timed runs")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="per-run timeout in seconds")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes for the whole-model runs (torchrun; one GPU each on cuda)")
    p.add_argument("--max-layers", type=int, default=None,
                   help="whole-model rows: analyse at most this many layers (the whole model's time is "
                        "then extrapolated in the row's note)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes: checks that the script runs (numbers meaningless)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        use_smoke_shapes()
    if args.worker:
        res = worker(json.loads(args.worker))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    if args.max_dense_gb is None:
        args.max_dense_gb = 8.0 if args.device == "cpu" else \
            round(0.9 * torch.cuda.get_device_properties(0).total_memory / GB, 1)
    if args.dense_timeout is None:
        args.dense_timeout = 1800.0 if args.device == "cpu" else 180.0
    names = [n for n, (_, quick) in BENCHMARKS.items() if quick or args.suite == "full"]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in BENCHMARKS]
        if unknown:
            print(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
                  file=sys.stderr)
            return 2
        names = wanted
    temp = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="tuckerctl-bench-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    hw = hardware(args.device)
    load_start = _loadavg()
    started = datetime.datetime.now()
    log(f"tuckerctl benchmarks, suite {args.suite}, device {args.device}, workdir {args.workdir}")
    suite = Suite(args, log)
    rows, details = [], {}
    try:
        for name in names:
            log(f"[{name}]")
            t0 = time.perf_counter()
            try:
                got, det = getattr(suite, BENCHMARKS[name][0])()
                rows += got
                details[name] = det
            except Exception as e:  # noqa: BLE001 - one failure must not kill the table
                rows.append(row(name, "—", args.device, "—", met="error", note=f"{type(e).__name__}: {e}"[:400]))
                details[name] = {"error": traceback.format_exc()}
                log(f"  ERROR: {type(e).__name__}: {e}")
            log(f"  [{name}] {time.perf_counter() - t0:.0f}s")
    finally:
        if temp:
            shutil.rmtree(args.workdir, ignore_errors=True)
    elapsed = (datetime.datetime.now() - started).total_seconds()
    hw["load_average_1min"] = {"start": load_start, "end": _loadavg()}  # other work on the machine
    notes = [
        "Checkpoints are random bf16 weights with real tensor names and config.json, written by the "
        "benchmark itself; only the attention tensors (+ input_layernorm) are written, to keep files small.",
        f"Peak memory: RSS increase over the subprocess's RSS after imports and warm-up (ru_maxrss), and "
        f"torch.cuda.max_memory_allocated on GPU. Bound = 2 x one layer's attention weights in fp32 + "
        f"{WORKSPACE_D2} float64 d x d matrices.",
        "Timed runs are fresh subprocesses after a warm-up; end-to-end runs start with the checkpoint "
        + ("in the page cache (--warm-cache)." if args.warm_cache else
           "evicted from the page cache (fsync + posix_fadvise DONTNEED, best effort)."),
        f"Dense baseline: tensorly.decomposition.tucker(W, rank=full clamped list, n_iter_max=0, init='svd'), "
        f"PyTorch backend, fp32, on W materialised from the same layer; ratio = dense time / tuckerctl time "
        f"(tuckerctl's time includes the upcast to float64 and the host-to-device copy; dense excludes "
        f"materialisation). Dense is skipped when its estimated need ({DENSE_COPIES} x W) exceeds "
        f"--max-dense-gb {args.max_dense_gb:g}.",
        "Spectra agreement: max over modes of max_i |sigma_structured - sigma_dense| / sigma_1, sigma_dense = "
        "norms of the full-rank dense core's slices (= the unfolding singular values).",
    ]
    table = markdown_table(rows)
    print(table)
    for r in rows:
        if r.get("note"):
            print(f"- {r['benchmark']} ({r['shape'].split(';')[0]}): {r['note']}")
    doc = {"schema": SCHEMA, "date": started.isoformat(timespec="seconds"), "suite": args.suite,
           "device": args.device, "hardware": hw, "elapsed_s": round(elapsed, 1), "benchmarks": names,
           "settings": {"max_dense_gb": args.max_dense_gb, "dense_timeout": args.dense_timeout,
                        "compress_ranks": args.compress_ranks,
                        "warm_cache": args.warm_cache, "workspace_d2": WORKSPACE_D2, "seed": SEED},
           "notes": notes, "rows": rows, "details": details}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{started.date().isoformat()}-{slug(hw)}-{args.suite}{'-smoke' if args.smoke else ''}"
    if args.only:
        stem = stem.with_name(stem.name + "-" + "-".join(names))
    stem.with_name(stem.name + ".json").write_text(json.dumps(doc, indent=1))
    hw_line = ", ".join(f"{k} {v}" for k, v in hw.items())
    md = [f"# tuckerctl benchmarks: {args.suite} suite on {args.device}", "",
          f"{started.isoformat(timespec='seconds')}; {hw_line}; total {elapsed:.0f} s.", "",
          table, "", "Notes per row:", ""]
    md += [f"- **{r['benchmark']}** ({r['shape']}): {r['note']}" for r in rows if r.get("note")]
    md += ["", "How measured:", ""] + [f"- {n}" for n in notes]
    md += ["", "Details (per layer, tensor and mode) are in the JSON file of the same name.", ""]
    stem.with_name(stem.name + ".md").write_text("\n".join(md))
    log(f"wrote {stem}.md and .json ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
