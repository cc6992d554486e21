"""Step plans: the plain data rank 0 broadcasts each step. No tensors, no device code."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrefillPlan:
    """One chunk of one sequence's prompt, zigzag-sharded over all ranks.

    tokens are the chunk's ids; start is the position of the first. The sequence's KV lives
    on rank r in the slab [kv_start[r], kv_start[r] + capacity) of the pool; kv_len[r] of it
    are filled by earlier chunks (the cached prefix this chunk attends to).
    """

    seq_id: int
    tokens: list[int]
    start: int
    kv_start: list[int]
    kv_len: list[int]
    sample: bool  # the last chunk: rank 0 needs the logits of the final position
    strategy: str
    all_logits: bool = False  # return every position's logits (tests)


@dataclass
class DecodePlan:
    """One new token for each of several sequences. For sequence i, rank r attends to its
    kv_len[i][r] cached tokens; rank owner[i] also stores the new token's KV after them."""

    seq_ids: list[int]
    tokens: list[int]
    positions: list[int]
    kv_start: list[list[int]]
    kv_len: list[list[int]]
    owner: list[int]


@dataclass
class StepPlan:
    kind: str  # "prefill" | "decode" | "shutdown"
    prefill: PrefillPlan | None = None
    decode: DecodePlan | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        if self.prefill is not None:
            return len(self.prefill.tokens)
        return len(self.decode.tokens) if self.decode is not None else 0


SHUTDOWN = StepPlan("shutdown")
