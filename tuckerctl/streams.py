"""Running independent GPU computations at once: a few threads, one CUDA stream each.

One dense eigensolver (cuSOLVER ``syevd``) leaves most of an H200 idle, and it releases the
GIL while it runs, so several of them, each on its own stream, overlap (README, Performance).
:class:`StreamPool` runs calls on ``size`` threads; on CUDA every thread owns one stream,
each call first waits for the work already queued on the submitting thread's stream (e.g.
the upload of the tensors it reads) and synchronises its stream before its result is handed
back, so the caller may free or reuse anything the call read. The calls compute exactly
what they would compute alone (same kernels, same precision); only the order in which the
GPU runs them changes. With ``size`` 1 calls run inline, when submitted: the CPU path.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class StreamPool:
    """``submit(fn, *args)`` -> Future; ``size`` threads named ``name``-N (CUDA: one stream
    each), or inline when ``size`` is 1. Use as a context manager (the threads are joined on exit)."""

    def __init__(self, device: torch.device, size: int, name: str = "tuckerctl"):
        self.device = device
        self.size = max(1, int(size))
        self._cuda = device.type == "cuda"
        self._local = threading.local()
        # OpenMP's thread count is per thread and a new thread starts from the process default:
        # the workers take the creating thread's, or BLAS would sum in another order than inline.
        self._pool = ThreadPoolExecutor(self.size, thread_name_prefix=name, initializer=torch.set_num_threads,
                                        initargs=(torch.get_num_threads(),)) if self.size > 1 else None
        if self._cuda and self._pool is not None:
            # torch loads its CUDA linear-algebra library on first use, and two threads doing so at
            # once fail ("lazy wrapper should be called at most once"): load it here, in one thread.
            x = torch.eye(2, dtype=torch.float64, device=device)
            torch.linalg.eigvalsh(x), torch.linalg.eigh(x), torch.linalg.qr(x), torch.linalg.svdvals(x)
            torch.cuda.synchronize(device)

    def submit(self, fn: Callable, *args) -> Future:
        if self._pool is None:
            done: Future = Future()
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - re-raised by result(), as a pool would
                done.set_exception(e)
            return done
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return self._pool.submit(self._run, ready, fn, args)

    def _run(self, ready, fn: Callable, args: tuple):
        if not self._cuda:
            return fn(*args)
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            try:
                return fn(*args)
            finally:
                stream.synchronize()  # nothing the call read or wrote is still in use on return

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> StreamPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pipelined(items: Iterable, start: Callable, window: int) -> Iterator[tuple]:
    """``(item, start(item))`` pairs, oldest first, with ``start`` called up to ``window`` - 1
    items ahead of the pair being handed out: what ``start`` submits to a pool runs while
    the caller waits on the oldest (and, when ``items`` is a reading pipeline, while the
    next item is read). ``window`` 1: start, hand out, then the next."""
    inflight: deque = deque()
    for item in items:
        inflight.append((item, start(item)))
        while len(inflight) >= max(1, window):
            yield inflight.popleft()
    while inflight:
        yield inflight.popleft()
