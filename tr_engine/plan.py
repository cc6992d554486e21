"""Step plans: the plain data rank 0 broadcasts each step. No tensors, no device code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .attention.cost import Rates


@dataclass(frozen=True)
class ClusterInfo:
    """What the ranks measured at start-up, handed to rank 0's engine and scheduler once:
    the KV pool (the same on every sequence rank), the context length, and the inputs of
    the attention cost model."""

    num_pages: int  # KV pages per sequence rank
    block_size: int  # tokens per page
    max_model_len: int
    prefix_cost: float  # a key a new token attends, in units of its own layers (cost.py)
    num_heads: int = 1  # a rank's query heads, KV heads and head size (its weights' share)
    num_kv_heads: int = 1
    head_dim: int = 1
    elem: int = 2  # bytes of a K/V element in the model's dtype
    rates: Rates | None = None  # measured at start-up (None: the cost model's defaults)
    host_slots: int = 0  # host tier pages per sequence rank (0: no tier)
    page_bytes: int = 0  # bytes of one page on one rank, every pooled tensor

    @property
    def capacity(self) -> int:
        """KV token slots per sequence rank."""
        return self.num_pages * self.block_size


@dataclass
class TableOp:
    """Rank `rank` sets entries at, at+1, ... of row `row` of its block table to `pages`
    (and forgets the entries after them)."""

    rank: int
    row: int
    at: int
    pages: list[int]


@dataclass
class PageCopy:
    """Rank `rank` copies page `page` of its KV pool to slot `slot` of its host tier
    (`to_host`), or the slot back into the page. A step's copies run in order, before its
    forward (kv.host_pages). `ahead` (a batch number from 1): a copy of an idle cached page
    to the host before it is evicted (BlockManager.write_ahead), which no forward waits for
    unless its plan says so (StepPlan.copy_wait)."""

    rank: int
    page: int
    slot: int
    to_host: bool
    ahead: int = 0


@dataclass
class PrefillPlan:
    """One chunk of one sequence's prompt, zigzag-sharded over all ranks in pieces of whole
    KV blocks (kv.block_manager.chunk_blocks). A chunk of a short prompt (home >= 0) is not
    sharded: rank `home` computes it all, with plain causal attention over its prefix there,
    and the other ranks do nothing for it.

    tokens are the chunk's ids; start (a multiple of the block size) is the position of the
    first. The sequence's block table is row `row` on every rank; its first prefix_len[r]
    keys there are the prefix this chunk attends to (cached blocks and earlier chunks), and
    the chunk's own keys on rank r go into the slots after them.
    """

    seq_id: int
    row: int
    tokens: list[int]
    start: int
    prefix_len: list[int]
    sample: bool  # the last chunk: rank 0 needs the logits of the final position
    strategy: str
    all_logits: bool = False  # return every position's logits (tests)
    home: int = -1  # a short prompt's one rank (see below); -1: sharded over all ranks


@dataclass
class DecodePlan:
    """One new token for each of several sequences. For sequence i (block table row
    rows[i]), rank r attends to its kv_len[i][r] stored keys; rank owner[i] also stores the
    new token's KV in the slot after them. A sequence with home[i] >= 0 lives on that rank
    alone (its KV, its token's layers); the others (-1) are computed on every rank and
    their partial attention results merged."""

    seq_ids: list[int]
    rows: list[int]
    tokens: list[int]
    positions: list[int]
    kv_len: list[list[int]]
    owner: list[int]
    home: list[int] = field(default_factory=list)  # empty: every sequence sharded

    @property
    def homes(self) -> list[int]:
        """Each sequence's home rank, -1 for a sharded one."""
        return self.home or [-1] * len(self.seq_ids)

    def rows_of(self, rank: int) -> list[int]:
        """Indices of the sequences rank `rank` computes: the sharded ones (the same rows,
        in the same order, on every rank), then the ones homed on it."""
        homes = self.homes
        return [i for i, h in enumerate(homes) if h < 0] + \
            [i for i, h in enumerate(homes) if h == rank]

    @property
    def num_sharded(self) -> int:
        return self.homes.count(-1)

    def width(self, world: int) -> int:
        """Rows every rank's merge buffer holds: the sharded sequences, then room for the
        most sequences any one rank has of its own."""
        return self.num_sharded + max(self.homes.count(r) for r in range(world))


@dataclass
class StepPlan:
    kind: str  # "prefill" | "decode" | "mixed" (prefill work and a decode) | "shutdown"
    prefill: PrefillPlan | None = None  # a chunk sharded over every rank
    # chunks of short prompts (PrefillPlan.home), at most one per rank
    local: list[PrefillPlan] = field(default_factory=list)
    decode: DecodePlan | None = None
    tables: list[TableOp] = field(default_factory=list)  # block-table updates, run first
    copies: list[PageCopy] = field(default_factory=list)  # host tier copies, run first
    # before this step's copies and forward, wait for the write-ahead batches up to this one
    # (0: none): the step reuses a page or slot one of them reads or writes
    copy_wait: int = 0
    info: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Tokens the step computes: its prefill chunk's and its decode tokens."""
        n = len(self.prefill.tokens) if self.prefill is not None else 0
        n += sum(len(p.tokens) for p in self.local)
        return n + (len(self.decode.tokens) if self.decode is not None else 0)

    def sampled(self) -> list[int]:
        """The seq_ids whose logits rows the step returns, in order: the sharded chunk's
        last position if it ends the prompt, then each short prompt's that ends, then the
        decode tokens."""
        ids = [p.seq_id for p in [self.prefill, *self.local] if p is not None and p.sample]
        return ids + (list(self.decode.seq_ids) if self.decode is not None else [])


SHUTDOWN = StepPlan("shutdown")
