"""KV blocks: where every sequence's KV lives, and the prefix cache. Plain Python, rank 0.

Each rank's pool is cut into pages of `block_size` token slots. A sequence's KV is a list
of *logical blocks*, positions [j·B, (j+1)·B), each held whole by one page on one rank: the
prefill layout is aligned so that every zigzag piece is a whole number of blocks (see
`chunk_blocks`), and decode fills a block on one rank before it opens the next one. On
each rank a sequence's pages, in position order, form its block table; only the last
block of the whole sequence can be partly filled, so a rank's keys are the first
`kv_len[r]` slots of its table.

The prefix cache: a block that is full gets a key chained from its parent's key and its own
tokens (a 128-bit BLAKE2 digest), so a key stands for the *whole token prefix* up to the
block's end: a hit holds exactly the KV a fresh prefill would compute there. Pages are
reference counted; a cached page no sequence uses stays cached (idle) until a page is
needed, then the least recently used goes. Idle pages count as free for admission, so the
cache never refuses or delays a request.

Eviction order: a prefix is found from its first block on, so losing a document's first
block loses all of it. A sequence that ends therefore hands its pages back latest position
first (`release`): the idle list of each rank then holds a document's blocks tail first,
and a partly evicted document keeps its head. On a sharded document each rank evicts its
own latest block of it, which breaks the least of the prefix that rank can break.

With a host tier (`host_slots`, kv.host_pages), an evicted cached block is copied to host
memory first and stays findable there; `restore` brings it back into a fresh page. Idle
cached blocks are also copied to free host slots *ahead* of their eviction (`write_ahead`,
in the order they would be evicted, a budget a step), off the step's path: no forward waits
for those copies, and the eviction that comes later costs no copy, so a follow-up that
brings a document back from the host while evicting another moves one direction of bytes,
not two. A later step that reuses a page or slot such a copy reads or writes waits for that
copy's batch on the device first (`StepPlan.copy_wait`). A write-ahead takes only free
slots: it never pushes out a block that lives on the host alone.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from ..distributed import padding
from ..plan import PageCopy, StepPlan
from .host_pages import HostIndex


def block_keys(tokens: list[int], block_size: int, n_blocks: int | None = None,
               parent: bytes = b"") -> list[bytes]:
    """Keys of the first `n_blocks` full blocks of `tokens` (all full blocks by default)."""
    full = len(tokens) // block_size
    n = full if n_blocks is None else min(n_blocks, full)
    raw = np.asarray(tokens[: n * block_size], dtype=np.int64).tobytes()
    step = 8 * block_size
    keys, key = [], parent
    for j in range(n):
        key = hashlib.blake2b(key + raw[j * step : (j + 1) * step], digest_size=16).digest()
        keys.append(key)
    return keys


def chunk_blocks(start: int, n: int, world: int, block_size: int) -> list[tuple[int, int]]:
    """(logical block index, rank) of every block that a prefill chunk of n real tokens at
    `start` (a multiple of block_size) writes, in position order. The chunk is padded to a
    multiple of 2P·B, so each of its 2P zigzag pieces is a whole number of blocks; blocks
    past the last real token are never written."""
    padded = padding.padded_len(n, world, block_size)
    piece = padded // (2 * world)
    out = []
    for i in range(2 * world):
        rank = i if i < world else 2 * world - 1 - i
        for off in range(i * piece, (i + 1) * piece, block_size):
            if off >= n:
                return out
            out.append(((start + off) // block_size, rank))
    return out


def plan_pages(held: list[int], start: int, prompt_len: int, total: int, chunk: int,
               world: int, block_size: int, first: int | None = None) -> list[int]:
    """New blocks per rank a sequence writes from position `start` (a multiple of
    block_size; `held[r]` blocks already on rank r) up to `total` KV positions: prefill
    chunks of `first` tokens, then of `chunk`, by the zigzag layout; then decode blocks, each
    on the rank holding the fewest of the sequence's blocks (ties: the lowest rank). A pure
    function, so admission reserves exactly the pages the sequence will take on each rank,
    and a step that runs another chunk size than planned re-plans the rest.

    A chunk with no padding (a multiple of 2P blocks that padded_len keeps) puts the same
    number of blocks on every rank, so only a prompt's last chunk is walked block by block."""
    counts = list(held)
    step = 2 * world * block_size
    a, n = start, first or chunk
    while a < prompt_len:
        n = min(n, prompt_len - a)
        if n % step == 0 and padding.padded_len(n, world, block_size) == n:
            counts = [c + n // (world * block_size) for c in counts]
        else:
            for _, r in chunk_blocks(a, n, world, block_size):
                counts[r] += 1
        a, n = a + n, chunk
    first_decode = -(-prompt_len // block_size) * block_size
    for _ in range(first_decode, total, block_size):
        counts[counts.index(min(counts))] += 1
    return [c - h for c, h in zip(counts, held)]


class RankPages:
    """One rank's pages: free ones, reference counts, and the cached ones no one uses."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.free: deque[int] = deque(range(num_pages))
        self.ref = [0] * num_pages
        self.key: dict[int, bytes] = {}  # page -> its block's key, for cached pages
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, unused; LRU first
        self.reserved = 0  # pages promised to admitted sequences and not yet taken

    def available(self) -> int:
        return len(self.free) + len(self.idle) - self.reserved

    def in_use(self) -> int:
        return self.num_pages - len(self.free) - len(self.idle)


@dataclass
class Evicted:
    rank: int
    page: int
    key: bytes


class BlockManager:
    """Pages on every rank and the prefix cache over them."""

    def __init__(self, world: int, num_pages: int, block_size: int,
                 enable_caching: bool = True, host_slots: int = 0) -> None:
        self.world, self.block_size, self.num_pages = world, block_size, num_pages
        self.enable_caching = enable_caching
        self.ranks = [RankPages(num_pages) for _ in range(world)]
        self.cache: dict[bytes, tuple[int, int]] = {}  # key -> (rank, page)
        self.queries = 0  # prompt tokens looked up (tokens)
        self.hits = 0  # prompt tokens found
        # the host tier: copies of evicted cached blocks (None: no tier)
        self.host = HostIndex(world, host_slots) if host_slots and enable_caching else None
        self.copies: list[PageCopy] = []  # for the next step's plan, in order
        self.pages_offloaded = self.pages_restored = 0
        # write-ahead: per rank, the idle cached pages with no host copy, in eviction order;
        # the batch of the last write-ahead that read each page or wrote each slot (until a
        # step reuses it), the batches so far, and the latest batch the next step waits for
        self.unwritten: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(world)]
        self._ahead_pages: dict[tuple[int, int], int] = {}
        self._ahead_slots: dict[tuple[int, int], int] = {}
        self.ahead_batches = 0
        self._wait = 0
        self.pages_written_ahead = 0

    # ---- the cache -----------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[tuple[int, int]]:
        """(rank, page) of the longest run of `keys` that is cached, from the first."""
        found = []
        if self.enable_caching:
            for key in keys:
                hit = self.cache.get(key)
                if hit is None:
                    break
                found.append(hit)
        return found

    def register(self, key: bytes, rank: int, page: int) -> None:
        """A full block: cache it under `key` unless another page already holds that key
        (then this page stays private and is freed with its sequence)."""
        if not self.enable_caching or key in self.cache:
            return
        self.cache[key] = (rank, page)
        self.ranks[rank].key[page] = key

    def lookup_host(self, keys: list[bytes]) -> list[tuple[int, int]]:
        """(rank, slot) of the longest run of `keys` the host tier holds, from the first."""
        return self.host.lookup(keys) if self.host is not None else []

    def restore(self, hits: list[tuple[int, int]], keys: list[bytes]) -> list[tuple[int, int]]:
        """Bring the host tier's blocks `hits` (of `keys`) back: a reserved page on the
        slot's rank each, cached under its key and pinned, and the copy into it queued.
        Returns their (rank, page)."""
        assert self.host is not None
        self.host.hold(hits)  # the pages taken here must not evict these slots
        pages = []
        try:
            for (rank, slot), key in zip(hits, keys):
                page = self.take(rank)
                self.register(key, rank, page)
                self.copies.append(PageCopy(rank, page, slot, to_host=False))
                pages.append((rank, page))
        finally:
            self.host.release()  # back as the most recently used
        self.pages_restored += len(pages)
        return pages

    def drain_copies(self) -> list[PageCopy]:
        """The copies queued since the last call: the next step runs them first."""
        copies, self.copies = self.copies, []
        return copies

    def hand_over(self, plan: StepPlan) -> StepPlan:
        """Give `plan` the copies queued since the last step, and the write-ahead batch it
        must wait for first (the pages or slots it reuses)."""
        plan.copies, plan.copy_wait, self._wait = self.drain_copies(), self._wait, 0
        return plan

    def write_ahead(self, budget: int) -> int:
        """Queue copies to free host slots of up to `budget` idle cached pages per rank that
        have no host copy, those evicted first first, as one batch; returns how many."""
        if self.host is None or budget <= 0:
            return 0
        batch, n = self.ahead_batches + 1, 0
        for rank, pages in enumerate(self.unwritten):
            for _ in range(min(budget, len(pages))):
                page = next(iter(pages))
                key = self.ranks[rank].key[page]
                slot = self.host.put(key, rank, free_only=True)
                if slot is None:
                    break  # no free slot on this rank: its evictions will copy
                del pages[page]
                self.copies.append(PageCopy(rank, page, slot, to_host=True, ahead=batch))
                self._ahead_pages[rank, page] = self._ahead_slots[rank, slot] = batch
                n += 1
        if n:
            self.ahead_batches = batch
            self.pages_offloaded += n
            self.pages_written_ahead += n
        return n

    def _reused(self, pending: dict, rank: int, at: int) -> None:
        """Page or slot `at` of `rank` is written (or read) again: after its write-ahead."""
        batch = pending.pop((rank, at), 0)
        if batch > self._wait:
            self._wait = batch

    def reset(self) -> int:
        """Drop every cached block no sequence uses, and the host tier's copies; returns how
        many blocks went from the device."""
        n = 0
        for r, pages in enumerate(self.ranks):
            self.unwritten[r].clear()
            while pages.idle:
                page, _ = pages.idle.popitem(last=False)
                self._forget(r, page)
                pages.free.append(page)
                n += 1
        if self.host is not None:
            self.host.clear()
        return n

    def _evict(self, rank: int, page: int) -> None:
        """An idle cached page is reused: its block leaves the device, copied to the host
        tier first where it has no copy there yet (and the tier has a slot)."""
        key = self.ranks[rank].key.get(page)
        if self.host is not None and key is not None and self.cache.get(key) == (rank, page):
            self.unwritten[rank].pop(page, None)
            if self.host.has(key):
                self.host.touch(key)
            else:
                slot = self.host.put(key, rank)
                if slot is not None:
                    self._reused(self._ahead_slots, rank, slot)
                    self.copies.append(PageCopy(rank, page, slot, to_host=True))
                    self.pages_offloaded += 1
        self._forget(rank, page)

    def _forget(self, rank: int, page: int) -> None:
        key = self.ranks[rank].key.pop(page, None)
        if key is not None and self.cache.get(key) == (rank, page):
            del self.cache[key]

    # ---- pages ---------------------------------------------------------------------------
    def can_reserve(self, need: list[int], pins: list[tuple[int, int]], margin: int = 0) -> bool:
        """Whether `need[r]` new pages on every rank fit once `pins` (cached pages the
        sequence will use) are taken out of the idle ones, leaving `margin` more pages on
        each rank where it needs any."""
        extra = [0] * self.world
        for r, page in pins:
            extra[r] += page in self.ranks[r].idle
        return all(n + e + (margin if n + e else 0) <= p.available()
                   for n, e, p in zip(need, extra, self.ranks))

    def available(self) -> list[int]:
        """Pages per rank no one holds or has reserved (free or idle cached)."""
        return [p.available() for p in self.ranks]

    def reserve(self, need: list[int]) -> None:
        for n, pages in zip(need, self.ranks):
            pages.reserved += n

    def unreserve(self, need: list[int]) -> None:
        for n, pages in zip(need, self.ranks):
            pages.reserved -= n
            assert pages.reserved >= 0

    def pin(self, rank: int, page: int) -> None:
        pages = self.ranks[rank]
        if page in pages.idle:
            del pages.idle[page]
            self.unwritten[rank].pop(page, None)
        pages.ref[page] += 1

    def unpin(self, rank: int, page: int) -> None:
        pages = self.ranks[rank]
        pages.ref[page] -= 1
        assert pages.ref[page] >= 0
        if pages.ref[page] == 0:
            if page in pages.key:
                pages.idle[page] = None  # most recently used end
                if self.host is not None and not self.host.has(pages.key[page]):
                    self.unwritten[rank][page] = None
            else:
                pages.free.append(page)

    def release(self, blocks: list[tuple[int, int]]) -> None:
        """Unpin a sequence's (rank, page) blocks, given in position order, latest first: the
        cached ones join each rank's idle list tail first, so they are evicted tail first."""
        for rank, page in reversed(blocks):
            self.unpin(rank, page)

    def take(self, rank: int, reserved: bool = True) -> int:
        """A page on `rank`, pinned: a free one, else the least recently used idle one (its
        cache entry goes). `reserved`: it comes out of a reservation; else out of the pages
        no one has reserved (`available`), of which there must be one."""
        pages = self.ranks[rank]
        if reserved:
            assert pages.reserved > 0, "take() without a reservation"
            pages.reserved -= 1
        else:
            assert pages.available() > 0, "take() of an unreserved page with none left"
        if pages.free:
            # reserved pages (a prompt's chunks, restores) from the front of the free list,
            # a decoding sequence's next block from the back: a long prompt prefilled while
            # others decode keeps its pages in one run, whose keys the prefill reads where
            # they lie, not gathered again in every layer of every chunk (KVCache.slots)
            page = pages.free.popleft() if reserved else pages.free.pop()
        else:
            page, _ = pages.idle.popitem(last=False)
            self._evict(rank, page)
        self._reused(self._ahead_pages, rank, page)  # (free after a reset, too)
        pages.ref[page] = 1
        return page

    # ---- numbers -------------------------------------------------------------------------
    def pages_in_use(self) -> list[int]:
        return [p.in_use() for p in self.ranks]

    def pages_cached(self) -> list[int]:
        """Cached pages per rank, used or idle."""
        return [len(p.key) for p in self.ranks]

    def pages_idle(self) -> list[int]:
        return [len(p.idle) for p in self.ranks]

    def reserved(self) -> list[int]:
        return [p.reserved for p in self.ranks]

    def host_used(self) -> list[int]:
        """Host tier slots in use per rank."""
        return self.host.used() if self.host is not None else [0] * self.world
