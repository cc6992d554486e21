"""Decode steps replayed from device graphs.

A decode step of an 8B model is a few thousand small kernels; launched one by one from
Python the host, not the device, sets the pace. So at start-up the runner records the whole
decode forward once per batch size bucket (1, 2, 4, ... up to max_num_seqs) and each step
copies its inputs into the recorded buffers and replays the graph with one launch. The
forward is graph-safe by construction: `DecodeContext` takes every per-step value (ids,
positions, block-table rows, key counts, store slots, own-row flags) from one device tensor,
and the decode attention kernel reads them there. A batch runs in the smallest bucket that
holds it; the padding rows attend to nothing and store their K/V in the pool's spare slot.
A graph gives the final hidden states; the runner takes the logits of the rows it needs.

With several ranks there are graphs that merge over the ranks, recorded and replayed by
every rank in the same order, collectives included; and, when short requests live on
single ranks, graphs without any collective for a step of a rank's own requests alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger("tr_engine")


def buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


class _Graph:
    def __init__(self, graph, meta: torch.Tensor, hidden: torch.Tensor) -> None:
        self.graph, self.meta, self.hidden = graph, meta, hidden


class DecodeGraphs:
    """The recorded decode steps of one rank. `forward(meta, merge=...)` is the decode
    forward it records (meta on the device -> hidden states), `blank_meta(width)` the host
    meta of an empty batch of that width (padding rows)."""

    def __init__(self, backend, device: torch.device, rank: int,
                 forward: Callable[..., torch.Tensor], blank_meta: Callable[[int], torch.Tensor],
                 max_batch: int, merging: list[bool]) -> None:
        self.backend, self.device = backend, device
        self.forward, self.blank_meta = forward, blank_meta
        self.sizes = buckets(max_batch)
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._pool = None
        t = time.perf_counter()
        for merge in merging:
            for b in reversed(self.sizes):  # the largest first: the others fit in its memory
                self._graphs[b, merge] = self._capture(b, merge)
        backend.synchronize()
        log.info("rank %d: %d decode graphs for batch sizes %s recorded in %.1f s",
                 rank, len(self._graphs), self.sizes, time.perf_counter() - t)

    def _capture(self, b: int, merge: bool) -> _Graph:
        backend = self.backend
        meta = self.blank_meta(b).to(self.device)
        self.forward(meta, merge=merge)  # warm-up: kernels, library handles, NCCL
        backend.synchronize()
        graph = backend.new_graph()
        with backend.graph_capture(graph, pool=self._pool):
            hidden = self.forward(meta, merge=merge)
        self._pool = graph.pool()
        return _Graph(graph, meta, hidden)

    def release(self) -> None:
        """Free the graphs and their memory. A graph that recorded collectives holds on to
        the communicator (NCCL will not tear it down while such a graph lives), so every
        rank releases its graphs before the process group is destroyed."""
        for g in self._graphs.values():
            g.graph.reset()
        self._graphs.clear()
        self.sizes = []
        self._pool = None
        self.backend.synchronize()

    def get(self, batch: int, merge: bool) -> _Graph | None:
        """The graph of the smallest bucket that holds `batch` rows (None: run eagerly)."""
        for b in self.sizes:
            if b >= batch:
                return self._graphs.get((b, merge))
        return None

    def replay(self, graph: _Graph, meta: torch.Tensor) -> torch.Tensor:
        """Run one step: meta `[6, B]` on the host -> hidden states `[B, hidden]` (the
        graph's own buffer: read it before the next replay)."""
        n = meta.shape[1]
        padded = self.blank_meta(graph.meta.shape[1])
        padded[:, :n] = meta
        graph.meta.copy_(padded)
        graph.graph.replay()
        return graph.hidden[:n]
