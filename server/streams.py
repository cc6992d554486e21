"""A running request's outputs as the routes consume them: RequestStream (one engine
request), several merged into the choices of one response, and server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tr_engine.outputs import RequestOutput

from .errors import APIError, as_api_error, error_body
from .protocol import usage

log = logging.getLogger("tr_engine.server")


class RequestStream:
    """A submitted request's outputs. `aclose()` (or leaving `async with`) before the last
    output aborts the request and frees its KV; it is safe to call at any point, twice, or
    without ever having iterated."""

    def __init__(self, engine, request_id: str, gen: AsyncIterator[RequestOutput],
                 tracker) -> None:
        self.engine = engine  # the async engine, to abort the request
        self.request_id = request_id
        self._gen = gen
        self._tracker = tracker  # the request's metrics (ServerMetrics.tracker)
        self.finished = False
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        out = await anext(self._gen)
        self._tracker.observe(out)
        self.finished = out.finished
        return out

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(RuntimeError):  # still running in a task being cancelled
            await self._gen.aclose()
        if not self.finished:
            try:
                self.engine.abort(self.request_id)
            except Exception as exc:  # already gone on the engine side
                log.debug("abort(%s): %r", self.request_id, exc)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


async def last_output(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last is None:
        raise APIError(503, "The engine ended the request without output.", None,
                       "engine_dead")
    return last


async def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) of several streams, in the order outputs arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                q.put_nowait((i, out, None))
        except Exception as exc:
            q.put_nowait((i, None, exc))
        q.put_nowait((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, out, exc = await q.get()
            if exc is not None:
                raise exc
            if out is None:
                left -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        # wait for them: a stream still inside a pump cannot be closed (aborted) meanwhile
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events that always end in `on_close()`: also when the client hangs up
    (Starlette then cancels the stream) or before the first event was ever produced."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], object]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            # The server cuts streams still open when its graceful shutdown times out; that is
            # the plan, not an error worth a traceback. Tell the client and end the stream.
            if not getattr(scope["app"].state, "stopping", False):
                raise
            last = sse(error_body(503, "The server is shutting down.", None, "shutting_down"))
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": (last + DONE).encode(),
                            "more_body": False})
        finally:
            await self._events.aclose()
            await self._on_close()


async def stream_events(streams: list[RequestStream],
                        chunk: Callable[..., str],
                        choice: Callable[[int, RequestOutput, object, bool], object],
                        logprobs: bool, include_usage: bool,
                        first: Callable[[int], str] | None = None,
                        n: int | None = None) -> AsyncIterator[str]:
    """The server-sent events of a streamed request of one or more choices, for chat and
    completions alike: `first(index)` for each choice (chat's role chunk, completions' echo),
    a chunk for each output that adds text, logprobs or the finish, the usage chunk when
    asked, then [DONE]. An error after the 200 went out is one error event.
    `chunk(choices, usage=None)` frames a chunk; `choice(index, out, completion,
    with_logprobs)` builds an endpoint's choice."""
    try:
        if first is not None:
            for i in range(len(streams)):
                yield first(i)
        last: dict[int, RequestOutput] = {}
        async for i, out in merged(streams):
            last[i] = out
            c = out.outputs[0]
            with_logprobs = logprobs and bool(c.delta_logprobs)
            if not (c.delta_text or with_logprobs or out.finished):
                continue
            yield chunk([choice(i, out, c, with_logprobs)])
        if include_usage and last:
            yield chunk([], usage=usage([last[i] for i in sorted(last)], n))
    except Exception as exc:
        yield stream_error(exc)
    yield DONE


def stream_error(exc: Exception) -> str:
    """An error after the 200 went out: one event in OpenAI's error shape (then [DONE])."""
    err = as_api_error(exc)
    if err is None:
        log.error("error while streaming: %r", exc)
        return sse(error_body(500, "Internal server error.", None, "internal_error"))
    return sse(error_body(err.status, err.message, err.param, err.code))
