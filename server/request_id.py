"""X-Request-Id: every response carries one, the client's if it sent one, else a new one.

The routes name their response after it (`cmpl-<id>`, `chatcmpl-<id>`, as vLLM does) and
log it, so a client's id can be followed from its own logs into the server's. The id is in
`request.state.request_id`; `request.state.request_id_given` says whether the client chose
it (then it may repeat, a retry say, and the engine's own ids for the request get a suffix).
"""

from __future__ import annotations

import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_response

HEADER = "X-Request-Id"
MAX_LEN = 256


def valid(value: str) -> bool:
    """Visible ASCII, no spaces, at most MAX_LEN characters: it goes into logs and ids."""
    return 0 < len(value) <= MAX_LEN and all("!" <= c <= "~" for c in value)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        given = raw.decode("latin-1") if raw is not None else None
        request_id = given if given is not None and valid(given) else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        if given is not None and not valid(given):
            err = APIError(400, f"The {HEADER} header must be 1 to {MAX_LEN} visible ASCII "
                           "characters without spaces.", None, "invalid_value")
            await error_response(err)(scope, receive, send_with_id)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["request_id_given"] = given is not None
        await self.app(scope, receive, send_with_id)
