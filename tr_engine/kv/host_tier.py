"""The host-memory tier on one rank: slots of host memory, a KV page each, and the copies
between them and the pool (rank 0 decides which, see host_pages).

Every tensor the KV pool holds (`KVCache.tensors()`: K and V, and whatever else a page
carries) has a host twin laid out by slot, `[slots, layers, page]`, a slot's page of every
layer contiguous. Pages of a copy batch are gathered into (or scattered from) a staging
buffer on the device with one index kernel per tensor, and each run of consecutive slots
crosses the link as one contiguous copy: a document's pages need not be consecutive in the
pool (eviction hands them out tail first). The twins are pinned where the device has its
own memory (CUDA, NPU), and the copies run on a stream of their own: the step's forward
waits for them on the device, the host does not. On the CPU the second pool is ordinary
memory and the same copies run in order.
"""

from __future__ import annotations

import time

import torch

from ..plan import PageCopy
from .cache import KVCache

STAGING_BYTES = 64 * 2**20  # pages per gather/scatter: about this much of one tensor


class HostTier:
    def __init__(self, cache: KVCache, num_slots: int, backend, device: torch.device) -> None:
        b = cache.block_size
        pinned = device.type != "cpu"
        self.cache, self.num_slots, self.backend, self.device = cache, num_slots, backend, device
        self.pages = cache.capacity // b
        # [slots, layers, B·rest] per pooled tensor
        self.host = [torch.empty((num_slots, t.shape[0], b * t[0, 0].numel()),
                                 dtype=_raw(t).dtype, pin_memory=pinned)
                     for t in cache.tensors()]
        per_page = max(h[0].numel() * h.element_size() for h in self.host)
        self.piece = max(1, STAGING_BYTES // per_page)
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

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        """A pooled tensor as `[layers, pages, B·rest]` (a view: the spare slot left out)."""
        t = _raw(t)
        return t[:, : self.pages * self.cache.block_size].view(t.shape[0], self.pages, -1)

    def _run(self, copies: list[PageCopy]) -> None:
        for batch in _batches(copies):
            batch.sort(key=lambda c: c.slot)  # independent copies: any order
            for a in range(0, len(batch), self.piece):
                self._piece(batch[a : a + self.piece])

    def _piece(self, piece: list[PageCopy]) -> None:
        """Copies of one direction, sorted by slot, with no page or slot twice."""
        pages = torch.tensor([c.page for c in piece], dtype=torch.long).to(
            self.device, non_blocking=True)
        runs = _slot_runs([c.slot for c in piece])
        for t, host in zip(self.cache.tensors(), self.host):
            pool = self._pool(t)  # [L, pages, X]
            if piece[0].to_host:
                staged = pool.index_select(1, pages).transpose(0, 1).contiguous()  # [n, L, X]
                for i, slot, n in runs:
                    host[slot : slot + n].copy_(staged[i : i + n], non_blocking=True)
            else:
                staged = torch.empty((len(piece), *host.shape[1:]), dtype=host.dtype,
                                     device=self.device)
                for i, slot, n in runs:
                    staged[i : i + n].copy_(host[slot : slot + n], non_blocking=True)
                pool.index_copy_(1, pages, staged.transpose(0, 1))


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 pages (kv_cache_dtype fp8) as bytes: indexed copies are not built for float8."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def _batches(copies: list[PageCopy]) -> list[list[PageCopy]]:
    """`copies` cut into runs of one direction in which no page or slot comes twice: the
    copies of a batch do not depend on each other, the batches run in order."""
    batches: list[list[PageCopy]] = []
    pages: set[int] = set()
    slots: set[int] = set()
    for c in copies:
        if not batches or batches[-1][0].to_host != c.to_host or c.page in pages \
                or c.slot in slots:
            batches.append([])
            pages, slots = set(), set()
        batches[-1].append(c)
        pages.add(c.page)
        slots.add(c.slot)
    return batches


def _slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(index, first slot, length) of each run of consecutive values in sorted `slots`."""
    runs: list[list[int]] = []
    for i, s in enumerate(slots):
        if runs and s == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([i, s, 1])
    return [tuple(r) for r in runs]
