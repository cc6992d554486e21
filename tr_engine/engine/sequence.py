"""A request's state as the scheduler and engine see it: tokens, KV placement, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..outputs import RequestMetrics, TokenLogprob
from ..sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: Status = Status.WAITING
    # tokens its prefill computes: the prompt; after a preemption the prompt and every token
    # generated so far (recomputed, the next token sampled from the last one's logits)
    prefill_len: int = 0
    prefilled: int = 0  # of them, tokens whose KV is stored
    fed: int = 0  # generated tokens fed back through decode (their KV is cached)
    kv_len: list[int] = field(default_factory=list)  # keys stored per rank
    # KV blocks (see kv.block_manager): (rank, page) of each logical block in position order, the
    # pages of each rank in that order (its block table, row `row` on that rank), pages
    # still reserved per rank, and the prefix-cache keys of the full blocks
    row: int = -1
    home: int = -1  # the one rank a short prompt lives on (KV and compute); -1: sharded
    blocks: list[tuple[int, int]] = field(default_factory=list)
    table: list[list[int]] = field(default_factory=list)
    reserved: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    registered: int = 0  # leading blocks that are in the prefix cache
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    started: bool = False  # its prefill has begun
    passed_over: int = 0  # prefill turns in a row that went to another prompt
    admitted: int = -1  # admission order among the running (the latest is preempted first)
    overtaken: int = 0  # requests admitted ahead of it while it waited for memory
    preemptions: int = 0  # times its KV was freed to make room (recomputed since)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival=time.time()))

    def __post_init__(self) -> None:
        self.prefill_len = self.prefill_len or len(self.prompt_ids)

    def prefill_ids(self, a: int, b: int) -> list[int]:
        """Tokens a..b-1 of its prefill (the prompt, then generated tokens)."""
        n = len(self.prompt_ids)
        if b <= n:
            return self.prompt_ids[a:b]
        return self.prompt_ids[a:] + self.output_ids[max(a - n, 0) : b - n]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
