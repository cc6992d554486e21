"""Step plans: the plain data rank 0 broadcasts each step. No tensors, no device code."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TableOp:
    """Rank `rank` sets entries at, at+1, ... of row `row` of its block table to `pages`
    (and forgets the entries after them)."""

    rank: int
    row: int
    at: int
    pages: list[int]


@dataclass
class PrefillPlan:
    """One chunk of one sequence's prompt, zigzag-sharded over all ranks in pieces of whole
    KV blocks (kv_blocks.chunk_blocks).

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


@dataclass
class DecodePlan:
    """One new token for each of several sequences. For sequence i (block table row
    rows[i]), rank r attends to its kv_len[i][r] stored keys; rank owner[i] also stores the
    new token's KV in the slot after them."""

    seq_ids: list[int]
    rows: list[int]
    tokens: list[int]
    positions: list[int]
    kv_len: list[list[int]]
    owner: list[int]


@dataclass
class StepPlan:
    kind: str  # "prefill" | "decode" | "mixed" (a prefill chunk and a decode) | "shutdown"
    prefill: PrefillPlan | None = None
    decode: DecodePlan | None = None
    tables: list[TableOp] = field(default_factory=list)  # block-table updates, run first
    info: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Tokens the step computes: its prefill chunk's and its decode tokens."""
        n = len(self.prefill.tokens) if self.prefill is not None else 0
        return n + (len(self.decode.tokens) if self.decode is not None else 0)


SHUTDOWN = StepPlan("shutdown")
