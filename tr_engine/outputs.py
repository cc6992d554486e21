"""What the engine hands back for each request, in vLLM's shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    """One generated sequence, as one step left it. The `delta_*` fields hold what the step
    added (a token, the text it completes, its logprob): each output costs the same however
    long the sequence has grown. `text`, `token_ids` and `logprobs` are the whole output
    (generated part only), given once, in the last output of a request whose
    SamplingParams.output_kind is "final" (the default); otherwise they stay empty.
    `num_tokens` counts the tokens generated so far."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None
    num_tokens: int = 0


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of the request's life, for latency metrics."""

    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: Exception | None = None  # why the engine ended this request (finish_reason "error")
    # with SamplingParams.prompt_logprobs: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None

    # vLLM-style convenience for single-sequence requests
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
