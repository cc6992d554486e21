"""The engine as the HTTP server sees it: async generation over a background engine loop.

INTERFACE ONLY for now; the implementation lands with the engine. The server codes against
exactly these names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from .config import EngineConfig
from .outputs import RequestOutput
from .sampling_params import SamplingParams


@dataclass
class EngineStats:
    running: int  # requests being prefilled or decoded
    waiting: int  # requests queued
    kv_used_tokens: list[int]  # per rank
    kv_capacity_tokens: int  # per rank
    prompt_tokens_total: int
    generation_tokens_total: int
    prefill_tokens_per_s: float  # of the most recent prefill step


class AsyncEngine:
    """Start with `AsyncEngine.start(config)` (blocking: loads weights on every rank, plans
    memory, logs each phase with its time). Then, from the server's event loop:

    - `engine.tokenizer`: the Hugging Face tokenizer; `engine.model_name`;
      `engine.max_model_len`; `engine.kv_capacity_tokens` (all ranks together).
    - `engine.encode_chat(messages) -> list[int]`: the chat template applied, with the
      generation prompt; raises ValueError for messages the template cannot take.
    - `engine.check(prompt_token_ids, params)`: raises RequestTooLong (message names the
      prompt length, max_tokens, and the limit) if it can never fit.
    - `async for out in engine.generate(request_id, prompt_token_ids, params, prompt=None)`:
      yields a RequestOutput each time new tokens arrive (cumulative text/token_ids plus
      delta_text/delta_token_ids), the last one with finished=True and finish_reason set.
      Raises RequestTooLong or QueueFull before yielding anything. If the consumer stops
      iterating (client gone), the request is aborted and its KV freed.
    - `engine.abort(request_id)`; `engine.stats() -> EngineStats`; `engine.healthy` (False
      once the loop or a rank died); `engine.shutdown()` stops every rank.
    """

    @classmethod
    def start(cls, config: EngineConfig) -> AsyncEngine:
        raise NotImplementedError

    def encode_chat(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        raise NotImplementedError

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        raise NotImplementedError
        yield

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    @property
    def healthy(self) -> bool:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError
