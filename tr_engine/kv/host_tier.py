"""The host-memory tier on one rank: slots of host memory, a KV page each, and the copies
between them and the pool (rank 0 decides which, see host_pages).

Every tensor the KV pool holds (`KVCache.tensors()`: K and V, and whatever else a page
carries) has a host twin laid out layer by layer, `[layers, slots, page]`: one layer's page
of a run of consecutive slots is contiguous. Pages of a copy batch are gathered into (or
scattered from) a staging buffer on the device (one per copy stream, made at start-up) with
one index kernel per tensor and layer, and each run of consecutive slots crosses the link
as one contiguous copy: a document's
pages need not be consecutive in the pool (eviction hands them out tail first). The twins
are pinned where the device has its own memory (CUDA, NPU), and the copies run on a stream
of their own (evictions that all come before the restores on a second one, so both
directions of the link are busy, a layer's restores after its evictions), layer after
layer, an event recorded after each layer's: the step's forward
waits on the device for layer l's event before its layer l (restores overlap the layers
before), the host never waits. A prefill's copies are queued a layer at a time, as its
forward reaches that layer on the host (which runs ahead of the device, so the copy stream
never runs dry): a kernel the forward loads at its first launch (CUDA loads lazily) waits
for the work queued on the device, which is then one layer's copies, not the whole restore
(one H100: a first projection held 284 ms behind a 16 GiB restore queued up front).
Copies ahead of an eviction (`PageCopy.ahead`) go on the
evictions' stream after the step's own copies, an event recorded after each batch, and no
forward waits for them unless its plan names their batch (`wait_ahead`). On the CPU the
second pool is ordinary memory and the same copies run in order before the forward.
"""

from __future__ import annotations

import time

import torch

from ..plan import PageCopy
from .cache import KVCache

STAGING_BYTES = 64 * 2**20  # pages per gather/scatter: about this much of one tensor's layer


class HostTier:
    def __init__(self, cache: KVCache, num_slots: int, backend, device: torch.device) -> None:
        b = cache.block_size
        pinned = device.type != "cpu"
        self.cache, self.num_slots, self.backend, self.device = cache, num_slots, backend, device
        self.pages = cache.capacity // b
        self.layers = cache.tensors()[0].shape[0]
        # [layers, slots, B·rest] per pooled tensor
        self.host = [torch.empty((t.shape[0], num_slots, b * t[0, 0].numel()),
                                 dtype=_raw(t).dtype, pin_memory=pinned)
                     for t in cache.tensors()]
        per_page = max(h[0, 0].numel() * h.element_size() for h in self.host)
        self.piece = max(1, STAGING_BYTES // per_page)
        self.stream = backend.new_stream()  # None on the CPU: copies in order
        # evictions' own stream: device->host beside host->device, both ways of the link
        self.out_stream = backend.new_stream() if self.stream is not None else None
        # a piece's pages staged on the device: a buffer for each copy stream (its pieces
        # run in order there), made once, so no copy allocates device memory on the request
        # path; `_in` serves the copy stream (and the CPU), `_out` the evictions' stream
        self._in = torch.empty(self.piece * per_page, dtype=torch.uint8, device=device)
        self._out = self._in if self.out_stream is None else torch.empty_like(self._in)
        self._restore_s = 0.0
        self._timing: list[tuple] = []  # (start, end) events of restores not yet read
        self._ahead: list[tuple] = []  # (batch, event) of write-aheads maybe not yet done
        self._queued: LayeredCopies | None = None  # a layered copy's layers not yet queued
        self._warm_up()

    def _warm_up(self) -> None:
        """A page there and back on each path (an eviction beside a restore, layered; a copy
        ahead of eviction) before any request: what the copies first meet (their kernels'
        loading, the streams' first work) is not met by the first request that needs them.
        Page 0 and slot 0 hold nothing yet."""
        self.copy([PageCopy(0, 0, 0, True), PageCopy(0, 0, 0, False)], layered=True)
        self.finish()
        self.copy([PageCopy(0, 0, 0, True, ahead=1)])
        self.wait_ahead(1)
        self._ahead.clear()
        self.backend.synchronize()

    @staticmethod
    def slots_for(size_bytes: float, cache: KVCache) -> int:
        """Slots in `size_bytes` of host memory."""
        return int(size_bytes // cache.page_bytes())

    @property
    def restore_s(self) -> float:
        """Time the restores took (rank 0's; on a copy stream, the device time of those that
        have ended), for the metrics and tests."""
        while self._timing and self._timing[0][1].query():
            a, b = self._timing.pop(0)
            self._restore_s += a.elapsed_time(b) / 1e3
        return self._restore_s

    def copy(self, copies: list[PageCopy], timed: bool = False,
             layered: bool = False) -> LayeredCopies | None:
        """Run this rank's `copies` in order, after the device work queued before them. With
        `layered` (and a copy stream), returns an event per layer, each layer's copies
        queued when its event is first asked for: a forward's layer l waits for the l-th
        (layer_wait), and `finish` queues the rest and orders everything after the copies.
        Otherwise (None) the forward queued after this sees every copy done. `timed`: add
        the restores' time to restore_s."""
        self.finish_queueing()  # a layered copy before this one: all of it first
        ahead = [c for c in copies if c.ahead]
        if ahead:
            copies = [c for c in copies if not c.ahead]
        events = self._copy(copies, timed, layered) if copies else None
        if ahead:
            if isinstance(events, LayeredCopies):  # after the step's own, once queued
                events.then = lambda: self._write_ahead(ahead)
            else:
                self._write_ahead(ahead)
        return events

    def finish_queueing(self) -> None:
        """Queue what is left of a layered copy (the layers its forward did not reach)."""
        if self._queued is not None:
            self._queued.queue(self.layers - 1)

    def wait_ahead(self, batch: int) -> None:
        """Later work on the main stream comes after the write-ahead batches up to `batch`
        (those of this rank that may still run)."""
        self.finish_queueing()
        while self._ahead and self._ahead[0][1].query():
            self._ahead.pop(0)
        last = None
        for b, event in self._ahead:
            if b > batch:
                break
            last = event
        if last is not None:
            last.wait(self.backend.current_stream())

    def _write_ahead(self, copies: list[PageCopy]) -> None:
        """Copies of idle pages to the host, after the device work queued so far (the KV
        they copy is written) and this step's own copies, waited for by no forward."""
        if self.stream is None:  # the CPU: in order, now
            self._layers(self._pieces(copies), self._in)
            return
        self.out_stream.wait_stream(self.backend.current_stream())
        with self.backend.stream(self.out_stream):
            self._layers(self._pieces(copies), self._out)
            done = self.backend.new_event()
            done.record(self.out_stream)
        self._ahead.append((copies[0].ahead, done))

    def _copy(self, copies: list[PageCopy], timed: bool,
              layered: bool) -> LayeredCopies | None:
        restores = timed and any(not c.to_host for c in copies)
        if self.stream is None:
            pieces = self._pieces(copies)
            t = time.perf_counter()
            self._layers(pieces, self._in)
            if restores:
                self._restore_s += time.perf_counter() - t
            return None
        main = self.backend.current_stream()
        self.stream.wait_stream(main)  # after the steps before: the KV copied out is written
        with self.backend.stream(self.stream):
            pieces = self._pieces(copies)  # their index tensors live on this stream
            start = self.backend.new_event(timing=True) if restores else None
            if start is not None:
                start.record(self.stream)
        # every eviction before every restore (a follow-up's: pages freed for it): the
        # evictions run on their own stream, layer l's restores after layer l's
        # evictions, so the two directions overlap
        first_in = next((i for i, p in enumerate(pieces) if not p[0]), len(pieces))
        outs, ins = pieces[:first_in], pieces[first_in:]
        duplex = bool(outs) and bool(ins) and not any(p[0] for p in ins)
        if duplex:
            self.out_stream.wait_stream(self.stream)
        queued = LayeredCopies(self, pieces, outs, ins, duplex, start)
        if not layered:
            queued.queue(self.layers - 1)
            main.wait_stream(self.stream)  # before this step's forward
            return None
        self._queued = queued
        return queued

    def _queue_layer(self, q: LayeredCopies, layer: int) -> None:
        """One layer of a copy on the copy streams, then its event."""
        last = layer == self.layers - 1
        with self.backend.stream(self.stream):
            if q.duplex:
                with self.backend.stream(self.out_stream):
                    self._layer(q.outs, layer, self._out)
                    evicted = self.backend.new_event()
                    evicted.record(self.out_stream)
                evicted.wait(self.stream)
                self._layer(q.ins, layer, self._in)
            else:
                self._layer(q.pieces, layer, self._in)
            q.events.append(self.backend.new_event())
            q.events[-1].record(self.stream)
            if last and q.start is not None:
                end = self.backend.new_event(timing=True)
                end.record(self.stream)
                self._timing.append((q.start, end))
        if last:
            if self._queued is q:
                self._queued = None
            if q.then is not None:  # on the stream that asked (the main one)
                q.then()

    def finish(self) -> None:
        """After a layered copy's forward: later work on the main stream comes after every
        copy (a forward that skipped a layer's wait included)."""
        self.finish_queueing()
        if self.stream is not None:
            self.backend.current_stream().wait_stream(self.stream)

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        """A pooled tensor as `[layers, pages, B·rest]` (a view: the spare slot left out)."""
        t = _raw(t)
        return t[:, : self.pages * self.cache.block_size].view(t.shape[0], self.pages, -1)

    def _pieces(self, copies: list[PageCopy]) -> list[tuple[bool, torch.Tensor, list]]:
        """The copies as pieces of one direction, each (to_host, its pages on the device,
        its runs of consecutive slots): batches with no page or slot twice, in order; within
        a batch, by slot."""
        pieces = []
        for batch in _batches(copies):
            batch.sort(key=lambda c: c.slot)  # independent copies: any order
            for a in range(0, len(batch), self.piece):
                piece = batch[a : a + self.piece]
                pages = torch.tensor([c.page for c in piece], dtype=torch.long).to(
                    self.device, non_blocking=True)
                pieces.append((piece[0].to_host, pages, _slot_runs([c.slot for c in piece])))
        return pieces

    def _layers(self, pieces, buffer: torch.Tensor) -> None:
        for layer in range(self.layers):
            self._layer(pieces, layer, buffer)

    def _layer(self, pieces, layer: int, buffer: torch.Tensor) -> None:
        """Every piece's copies of one layer, in order, staged in `buffer` (the current
        stream's)."""
        for to_host, pages, runs in pieces:
            for t, host in zip(self.cache.tensors(), self.host):
                pool, twin = self._pool(t)[layer], host[layer]  # [pages, X], [slots, X]
                staged = buffer[: len(pages) * twin[0].nbytes].view(twin.dtype).view(
                    len(pages), twin.shape[1])  # [n, X]
                if to_host:
                    torch.index_select(pool, 0, pages, out=staged)
                    for i, slot, n in runs:
                        twin[slot : slot + n].copy_(staged[i : i + n], non_blocking=True)
                else:
                    for i, slot, n in runs:
                        staged[i : i + n].copy_(twin[slot : slot + n], non_blocking=True)
                    pool.index_copy_(0, pages, staged)


class LayeredCopies:
    """A copy's layers, queued on the copy streams as they are asked for: `copies[l]` (the
    event a forward's layer l waits for) first queues every layer up to l."""

    def __init__(self, tier: HostTier, pieces, outs, ins, duplex: bool, start) -> None:
        self.tier, self.pieces, self.outs, self.ins = tier, pieces, outs, ins
        self.duplex, self.start = duplex, start
        self.events: list = []
        self.then = None  # run once the last layer is queued (write-aheads after them)

    def __len__(self) -> int:
        return self.tier.layers

    def __getitem__(self, layer: int):
        if not 0 <= layer < self.tier.layers:
            raise IndexError(layer)
        self.queue(layer)
        return self.events[layer]

    def queue(self, layer: int) -> None:
        """Queue every layer up to `layer` not queued yet."""
        while len(self.events) <= layer:
            self.tier._queue_layer(self, len(self.events))


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 pages (kv_cache_dtype fp8) as bytes: indexed copies are not built for float8."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def _batches(copies: list[PageCopy]) -> list[list[PageCopy]]:
    """`copies` in batches that run in order, the copies of a batch independent of each
    other and of one direction. A copy goes into the batch after the last one holding a
    copy of the same page or slot (which it must follow), the earliest it can: evictions
    interleaved with the restores that reuse their pages (evict p, restore into p, evict
    q, ...) become one batch of evictions and one of restores, whatever their number."""
    levels: list[list[PageCopy]] = []
    page_level: dict[int, int] = {}
    slot_level: dict[int, int] = {}
    for c in copies:
        level = max(page_level.get(c.page, -1), slot_level.get(c.slot, -1)) + 1
        if level == len(levels):
            levels.append([])
        levels[level].append(c)
        page_level[c.page] = slot_level[c.slot] = level
    return [[c for c in level if c.to_host == way] for level in levels
            for way in (True, False) if any(c.to_host == way for c in level)]


def _slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(index, first slot, length) of each run of consecutive values in sorted `slots`."""
    runs: list[list[int]] = []
    for i, s in enumerate(slots):
        if runs and s == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([i, s, 1])
    return [tuple(r) for r in runs]
