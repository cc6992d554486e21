"""The host-memory tier's index, on rank 0: which cached blocks have a copy in host memory.

Each rank has `num_slots` slots of host memory, a page each (kv.host_tier.HostTier holds
them). A cached block the device evicts is copied to a slot of its own rank first and stays
findable here by its key; a later prompt that misses the device but finds its next blocks
here gets them copied back into fresh pages of the same ranks (each rank over its own link).
A copy stays in its slot after a restore (the device page and the slot hold the same KV),
so a block evicted again costs no second copy. The slots of a rank are reused least
recently used first: the tier never holds more than its size. Plain Python: the copies are
plan entries (`tr_engine.plan.PageCopy`) that every rank runs before its step's forward, in order.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class HostSlots:
    """One rank's slots: free ones, and the used ones by key, least recently used first."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free: deque[int] = deque(range(num_slots))
        self.used: OrderedDict[int, bytes] = OrderedDict()  # slot -> key


class HostIndex:
    def __init__(self, world: int, num_slots: int) -> None:
        self.ranks = [HostSlots(num_slots) for _ in range(world)]
        self.where: dict[bytes, tuple[int, int]] = {}  # key -> (rank, slot)
        # slots being restored from in this step, out of their rank's LRU order meanwhile
        self._held: list[tuple[int, int, bytes]] = []

    def lookup(self, keys: list[bytes]) -> list[tuple[int, int]]:
        """(rank, slot) of the longest run of `keys` held on the host, from the first."""
        found = []
        for key in keys:
            hit = self.where.get(key)
            if hit is None:
                break
            found.append(hit)
        return found

    def has(self, key: bytes) -> bool:
        return key in self.where

    def touch(self, key: bytes) -> None:
        rank, slot = self.where[key]
        used = self.ranks[rank].used
        if slot in used:  # (a held slot goes back as the most recent when released)
            used.move_to_end(slot)

    def hold(self, hits: list[tuple[int, int]]) -> None:
        """Keep the slots `hits` from reuse while their blocks are restored: out of the LRU
        order, so that taking pages for them (which may evict others to the host) never
        walks past them: one step O(len(hits)), not O(len(hits)^2)."""
        for rank, slot in hits:
            self._held.append((rank, slot, self.ranks[rank].used.pop(slot)))

    def release(self) -> None:
        """The held slots back, most recently used (in the order held)."""
        for rank, slot, key in self._held:
            self.ranks[rank].used[slot] = key
        self._held = []

    def put(self, key: bytes, rank: int, free_only: bool = False) -> int | None:
        """A slot of `rank` for `key`'s block: a free one, else (unless `free_only`) the
        least recently used one not held for a restore (its block leaves the host); None if
        there is none."""
        slots = self.ranks[rank]
        if slots.free:
            slot = slots.free.popleft()
        elif free_only:
            return None
        else:
            slot = next(iter(slots.used), None)
            if slot is None:
                return None
            del self.where[slots.used.pop(slot)]
        slots.used[slot] = key
        self.where[key] = (rank, slot)
        return slot

    def clear(self) -> int:
        """Forget every copy; returns how many there were."""
        self._held = []
        n = len(self.where)
        for slots in self.ranks:
            slots.free = deque(range(slots.num_slots))
            slots.used.clear()
        self.where.clear()
        return n

    def used(self) -> list[int]:
        return [len(s.used) for s in self.ranks]
