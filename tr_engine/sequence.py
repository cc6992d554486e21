"""A request's state as the scheduler and engine see it: tokens, KV placement, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .outputs import RequestMetrics, TokenLogprob
from .sampling_params import SamplingParams


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
    prefilled: int = 0  # prompt tokens whose KV is cached
    fed: int = 0  # generated tokens fed back through decode (their KV is cached)
    kv_need: list[int] = field(default_factory=list)  # slab size per rank
    kv_start: list[int] | None = None  # slab start per rank, once admitted
    kv_len: list[int] = field(default_factory=list)  # filled slots per rank
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival=time.time()))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
