"""The host-memory tier on one rank: slots of host memory, a KV page each, and the copies
between them and the pool (rank 0 decides which, see host_pages).

Every tensor the KV pool holds (`KVCache.tensors()`: K and V, and whatever else a page
carries) has a host twin of the same layout, `[layers, slots·block_size, ...]`, so a run
of consecutive pages and slots is one contiguous copy per layer and tensor. The twins are
pinned where the device has its own memory (CUDA, NPU), and the copies run on a stream of
their own: the step's forward waits for them on the device, the host does not. On the CPU
the second pool is ordinary memory and the copies are plain.
"""

from __future__ import annotations

import time

import torch

from ..plan import PageCopy
from .cache import KVCache


class HostTier:
    def __init__(self, cache: KVCache, num_slots: int, backend, device: torch.device) -> None:
        b = cache.block_size
        pinned = device.type != "cpu"
        self.cache, self.num_slots, self.backend = cache, num_slots, backend
        self.host = [torch.empty((t.shape[0], num_slots * b, *t.shape[2:]), dtype=t.dtype,
                                 pin_memory=pinned) for t in cache.tensors()]
        self.stream = backend.new_stream()  # None on the CPU: copies in order
        self.restore_s = 0.0  # time rank 0 waited for restores (tests, metrics)

    @staticmethod
    def slots_for(size_bytes: float, cache: KVCache) -> int:
        """Slots in `size_bytes` of host memory."""
        return int(size_bytes // cache.page_bytes())

    def copy(self, copies: list[PageCopy], timed: bool = False) -> None:
        """Run this rank's `copies` in order; the forward after them sees their pages (and
        page reuse waits for the copies out of them). `timed`: wait for the restores and
        add their time to restore_s."""
        if not copies:
            return
        t = time.perf_counter()
        if self.stream is None:
            self._run(copies)
        else:  # after the steps before (the KV copied out is written) ...
            main = torch.accelerator.current_stream()
            self.stream.wait_stream(main)
            with self.backend.stream(self.stream):
                self._run(copies)
            main.wait_stream(self.stream)  # ... and before this step's forward
        if timed and any(not c.to_host for c in copies):
            if self.stream is not None:
                self.stream.synchronize()
            self.restore_s += time.perf_counter() - t

    def _run(self, copies: list[PageCopy]) -> None:
        b = self.cache.block_size
        for page, slot, n, to_host in _runs(copies):
            for dev, host in zip(self.cache.tensors(), self.host):
                d, h = dev[:, page * b : (page + n) * b], host[:, slot * b : (slot + n) * b]
                for layer in range(dev.shape[0]):  # one contiguous run each
                    if to_host:
                        h[layer].copy_(d[layer], non_blocking=True)
                    else:
                        d[layer].copy_(h[layer], non_blocking=True)


def _runs(copies: list[PageCopy]) -> list[tuple[int, int, int, bool]]:
    """`copies` as (first page, first slot, pages, to_host) runs of consecutive pages and
    slots in one direction, in order."""
    runs: list[list] = []
    for c in copies:
        last = runs[-1] if runs else None
        if last is not None and last[3] == c.to_host and c.page == last[0] + last[2] \
                and c.slot == last[1] + last[2]:
            last[2] += 1
        else:
            runs.append([c.page, c.slot, 1, c.to_host])
    return [tuple(r) for r in runs]
