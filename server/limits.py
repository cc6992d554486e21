"""The request body limit: a body over `limit` bytes is answered 413 before it is parsed.

A body that declares its length (Content-Length) is refused before a byte of it is read; a
chunked one is counted as it arrives and refused when it passes the limit. Either way no
large body is ever held, decoded or tokenized.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_response

BYTES_PER_TOKEN = 64  # a prompt token as JSON text: up to 16 four-byte characters, escaped
MIN_LIMIT = 1 << 20


def body_limit(max_model_len: int) -> int:
    """The default limit: room for a prompt of the whole context as text or as token ids
    (an id as JSON takes at most 21 bytes), and never below 1 MiB."""
    return max(MIN_LIMIT, max_model_len * BYTES_PER_TOKEN)


class _TooLarge(BaseException):
    """Raised out of the app's receive(); a BaseException, so that no handler of the app's
    own (the catch-all that answers 500) takes it for a fault."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(413, f"The request body is larger than this server takes "
                       f"({self.limit} bytes; see --max-request-bytes).", None,
                       "request_too_large", {"Connection": "close"})
        await error_response(err)(scope, receive, send)
