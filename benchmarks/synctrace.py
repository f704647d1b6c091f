"""Time named functions inside tuckerctl, synchronising the calling thread's CUDA stream around each
call: inclusive and self seconds and call counts. For finding which stage holds the GPU where
torch.profiler is not an option (it hung on cuSOLVER on the H200). Run the traced code inline (one
thread): the synchronisations serialise what streams would overlap.

    with SyncTrace(device, ["tuckerctl.noise._spectral", "torch.linalg.eigvalsh", ...]) as tr:
        analysis.analyze_tensor(...)
    tr.table()  # {name: {"calls", "seconds", "self_seconds"}}
"""

from __future__ import annotations

import importlib
import sys
import time
from collections import defaultdict

import torch


def _resolve(target: str):
    """``pkg.module.attr`` or ``pkg.module.Class.attr`` -> (owner, attr name, function)."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1], getattr(owner, parts[-1])
    raise SystemExit(f"cannot resolve {target!r}")


class SyncTrace:
    def __init__(self, device: torch.device, targets: list[str]):
        self.device = device
        self.targets = targets
        self.calls: dict = defaultdict(lambda: [0, 0.0, 0.0])  # name -> [calls, inclusive, children]
        self._stack: list = []
        self._patched: list = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _wrap(self, name: str, fn):
        def traced(*args, **kwargs):
            self._sync()
            self._stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                dt = time.perf_counter() - t
                children = self._stack.pop()
                rec = self.calls[name]
                rec[0] += 1
                rec[1] += dt
                rec[2] += children
                if self._stack:
                    self._stack[-1] += dt
        return traced

    def __enter__(self) -> SyncTrace:
        for target in self.targets:
            owner, attr, fn = _resolve(target)
            wrapped = self._wrap(target.rsplit(".", 1)[-1] if "torch" not in target else target, fn)
            self._patched.append((owner, attr, fn))
            setattr(owner, attr, wrapped)
            # names imported elsewhere (from .multilinear import reduce) point at the original too
            for mod in list(sys.modules.values()):
                if getattr(mod, "__name__", "").startswith("tuckerctl") and mod is not owner:
                    for key, value in list(vars(mod).items()):
                        if value is fn:
                            self._patched.append((mod, key, fn))
                            setattr(mod, key, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self._patched):
            setattr(owner, attr, fn)

    def table(self) -> dict:
        return {name: {"calls": c, "seconds": round(inc, 4), "self_seconds": round(inc - kids, 4)}
                for name, (c, inc, kids) in sorted(self.calls.items(), key=lambda kv: -kv[1][1])}
