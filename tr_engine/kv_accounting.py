"""Where every sequence's KV lives, decided on rank 0 in plain Python.

Each rank's pool is a line of `capacity` token slots. A sequence reserves, on every rank, one
contiguous slab sized for its whole life (its prompt share plus its share of max_tokens),
so decode reads each sequence's shard as one contiguous view. Slabs are placed first-fit.
"""

from __future__ import annotations

import bisect

from .attention import layout


def prompt_share(prompt_len: int, world: int, chunk: int) -> list[int]:
    """Tokens of a prompt each rank caches when prefilled in pieces of `chunk` tokens, each
    piece zigzag-sharded over all ranks."""
    share = [0] * world
    for a in range(0, prompt_len, chunk):
        n = min(chunk, prompt_len - a)
        for r in range(world):
            share[r] += layout.local_len(n, world, r)
    return share


def decode_owner(prompt_len: int, fed: int, world: int) -> int:
    """The rank that stores the KV of the `fed`-th token fed back in decode (0-based):
    round-robin, so shards stay even as a sequence grows."""
    return (prompt_len + fed) % world


def reservation(prompt_len: int, max_tokens: int, world: int, chunk: int) -> list[int]:
    """Slots per rank for a sequence's whole life. The last generated token is never fed
    back, so decode stores at most max_tokens - 1 tokens."""
    need = prompt_share(prompt_len, world, chunk)
    for t in range(max_tokens - 1):
        need[decode_owner(prompt_len, t, world)] += 1
    return need


class SlabAllocator:
    """First-fit allocation of contiguous ranges in [0, capacity)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (start, len)
        self.used = 0

    def allocate(self, n: int) -> int | None:
        """Start of a free range of n slots, or None. n == 0 always succeeds."""
        if n == 0:
            return 0
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    self._free.pop(i)
                else:
                    self._free[i] = (start + n, length - n)
                self.used += n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        if n == 0:
            return
        i = bisect.bisect(self._free, (start, n))
        self._free.insert(i, (start, n))
        # coalesce with neighbours
        if i + 1 < len(self._free) and start + n == self._free[i + 1][0]:
            self._free[i] = (start, n + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + self._free[i - 1][1])
        self.used -= n

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)


class KVAccounting:
    """Slabs on every rank; `used` counts tokens actually written (for metrics)."""

    def __init__(self, world: int, capacity: int) -> None:
        self.world = world
        self.capacity = capacity
        self.ranks = [SlabAllocator(capacity) for _ in range(world)]

    def fits_alone(self, need: list[int]) -> bool:
        return all(n <= self.capacity for n in need)

    def reserve(self, need: list[int]) -> list[int] | None:
        """Starts of a slab of need[r] slots on each rank, or None (nothing reserved)."""
        starts = []
        for r, n in enumerate(need):
            s = self.ranks[r].allocate(n)
            if s is None:
                for rr, ss in enumerate(starts):
                    self.ranks[rr].free(ss, need[rr])
                return None
            starts.append(s)
        return starts

    def release(self, starts: list[int], need: list[int]) -> None:
        for r, (s, n) in enumerate(zip(starts, need)):
            self.ranks[r].free(s, n)

    def reserved(self) -> list[int]:
        return [a.used for a in self.ranks]
