"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Times are client wall clock (time.perf_counter) from just before the request is sent. A
chunk that carries text is one arrival: its time gives the TTFT (the first) or an
inter-token gap (the others). A server may put several tokens into one chunk or send none
for a token that adds no text, so the output token count comes from the usage the stream
ends with (stream_options include_usage), and only where a server sends none is it the
number of chunks with text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from .datasets import Sample

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class RequestSpec:
    """What every request of a run shares."""

    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    temperature: float | None = 0.0
    top_p: float | None = None
    top_k: int | None = None
    ignore_eos: bool = False
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}; "
                             f"got {self.endpoint!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://; "
                             f"got {self.base_url!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, sample: Sample) -> dict:
        body: dict = {"model": self.model, "stream": True,
                      "stream_options": {"include_usage": True}}
        if self.chat:
            if not isinstance(sample.prompt, str):
                raise ValueError("the chat endpoint takes text prompts only")
            body["messages"] = [{"role": "user", "content": sample.prompt}]
            body["max_completion_tokens"] = sample.output_len
        else:
            body["prompt"] = sample.prompt
            body["max_tokens"] = sample.output_len
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.ignore_eos:  # vLLM's extension: sent only when asked, for other servers' sake
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body


@dataclass
class RequestResult:
    """One request's outcome. `ttft`, `latency` in seconds; `itl`: the gaps between chunks
    with text after the first; `output_tokens` from the usage when the server sent it."""

    success: bool = False
    prompt_len: int = 0
    prompt_tokens: int | None = None  # as the server counted them (usage)
    output_tokens: int = 0
    exact_count: bool = False  # output_tokens came from the usage
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""
    start: float = 0.0  # perf_counter when sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, or None for a single-token output."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def send(http: httpx.AsyncClient, spec: RequestSpec, sample: Sample) -> RequestResult:
    """Send one streamed request and time it; a failure (refused, cut, an error event)
    comes back as a result with success False and the error's text, never as an
    exception."""
    result = RequestResult(prompt_len=sample.prompt_len)
    chunks = 0
    last = 0.0
    result.start = start = time.perf_counter()
    try:
        async with http.stream("POST", spec.url, json=spec.body(sample),
                               headers=spec.headers()) as response:
            if response.status_code != 200:
                result.error = _http_error(response.status_code, await response.aread())
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = _message(chunk)
                    return result
                text = _text(chunk, spec.chat)
                if text:
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks += 1
                    last = now
                    result.text += text
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.exact_count = True
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    if not result.exact_count:
        result.output_tokens = chunks
    if chunks == 0:
        result.ttft = result.latency  # nothing readable came: the first token is the end
    result.success = True
    return result


def _text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if chat:
        delta = c.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return c.get("text") or ""


def _message(body: dict) -> str:
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err if err is not None else body)


def _http_error(status: int, raw: bytes) -> str:
    try:
        detail = _message(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        detail = raw[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {detail}"
