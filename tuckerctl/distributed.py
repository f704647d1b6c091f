"""Running ``analyze`` and ``compress`` under ``torchrun``: layers sharded across processes.

torchrun (torch.distributed's launcher) sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
when ``WORLD_SIZE`` > 1 every process takes every N-th layer, computes it on its own GPU
(``cuda:LOCAL_RANK``) or on the CPU, and the per-layer results are gathered (pickled
Python objects over gloo; NCCL is the process group's CUDA backend but no tensor crosses
GPUs) so that rank 0 holds the same document a single process would produce. Multi-host
runs use torchrun's usual rendezvous (``--nnodes``, ``--rdzv-endpoint``); no I/O here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

# Ranks compute for as long as their share of the model takes before the one collective
# that gathers it, so the default 10-30 min collective timeout is far too short.
_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Group:
    """This process's place among the ``size`` processes of a run (rank 0 writes)."""

    rank: int = 0
    size: int = 1

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """Every ``size``-th item from this rank on (round-robin keeps shares balanced)."""
        return list(items)[self.rank::self.size]

    def all_gather(self, obj) -> list:
        """``obj`` from every rank, in rank order (on every rank)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """``obj`` from every rank, in rank order, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size if self.writer else None
        dist.gather_object(obj, out, dst=0)
        return out


SINGLE = Group()


def join(device):
    """The process group of a torchrun launch (initialised on first use) and this rank's
    device: ``cuda:LOCAL_RANK`` when ``device`` is a CUDA device. Outside torchrun:
    (SINGLE, device). (torch is imported here, not at module level, so that the CLI can
    show its progress bar before torch's slow import.)"""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE, device
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=_TIMEOUT)
    return Group(dist.get_rank(), dist.get_world_size()), device


def leave() -> None:
    """Tear the process group down (end of a command), if one was started."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def is_writer() -> bool:
    """True outside torchrun and on its rank 0: the one process that writes output."""
    return int(os.environ.get("RANK", "0")) == 0


def thread_hint() -> str | None:
    """A one-line note when torchrun left each process one CPU thread on a host with cores to
    spare (torchrun sets ``OMP_NUM_THREADS=1`` unless it is set; reading and converting layers
    then run on one core per process: 32% of analyze's time on a 2-GPU host, README), else None."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    share = (os.cpu_count() or 1) // max(1, local)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("OMP_NUM_THREADS") != "1" or share < 2:
        return None
    return (f"note: each of the {local} processes on this host runs on one CPU thread (OMP_NUM_THREADS=1, "
            f"torchrun's default); OMP_NUM_THREADS={share} reads and converts layers faster")
