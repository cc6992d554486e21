"""The FastAPI app: routes, API-key check, and cancellation when a client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import uuid
from collections.abc import Awaitable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from tr_engine import __version__

from .chat import create_chat_completion
from .completions import create_completion
from .errors import APIError, error_body, install_error_handlers
from .limits import BodyLimitMiddleware, body_limit
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .request_id import HEADER, RequestIdMiddleware
from .serving import RequestIds, Serving
from .settings import ServerSettings

log = logging.getLogger("tr_engine.server")

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 503)}


def build_app(engine, settings: ServerSettings) -> FastAPI:
    """The HTTP app for a started AsyncEngine."""
    metrics = ServerMetrics(engine)
    serving = Serving(engine, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        serving.close()

    app = FastAPI(title="tr_engine", version=__version__, lifespan=lifespan,
                  summary="OpenAI-compatible API of tr_engine")
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.stopping = False  # set by the launcher when shutdown begins
    install_error_handlers(app, settings.retry_after_s)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    # a body over the limit is refused before anything reads it
    limit = settings.max_request_bytes or body_limit(serving.max_model_len)
    app.add_middleware(BodyLimitMiddleware, limit=limit)
    if settings.allowed_origins:
        # outside the key check: a browser's preflight carries no Authorization header
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=list(settings.allowed_methods),
                           allow_headers=list(settings.allowed_headers),
                           allow_credentials=settings.allow_credentials,
                           expose_headers=[HEADER])
    app.add_middleware(RequestIdMiddleware)  # the outermost: every response carries the id

    @app.api_route("/health", methods=["GET", "HEAD"],
                   responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if not engine.healthy:
            return JSONResponse(error_body(503, "The engine is not running.", None,
                                           "engine_dead"), status_code=503)
        return Response(status_code=200)

    @app.post("/reset_prefix_cache", responses=_ERRORS)
    async def reset_prefix_cache() -> Response:
        """Drop every cached KV block that no running request uses."""
        serving.check_ready()
        n = await engine.reset_prefix_cache()
        log.info("prefix cache reset: %d blocks dropped", n)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> ModelCard:
        return ModelCard(id=serving.model_name, root=serving.model_name,
                         max_model_len=serving.max_model_len)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
    async def retrieve_model(model: str) -> ModelCard:
        serving.check_model(model)
        return model_card()

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **_ERRORS})
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await _respond(request, create_completion(serving, req, _ids(request, "cmpl")))

    @app.post("/v1/chat/completions",
              responses={200: {"model": ChatCompletionResponse}, **_ERRORS})
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(request, create_chat_completion(serving, req,
                                                              _ids(request, "chatcmpl")))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "Give either 'prompt' or 'messages'.", "prompt", "invalid_value")
        if req.prompt is not None:
            ids = await serving.encode_text(req.prompt, req.add_special_tokens)
        else:
            ids = await serving.encode_chat([m.as_template_input() for m in req.messages])
        return TokenizeResponse(count=len(ids), max_model_len=serving.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(req.model)
        bad = next((t for t in req.tokens if t >= serving.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} is outside the vocabulary "
                           f"(0..{serving.vocab_size - 1}).", "tokens", "invalid_value")
        text = await serving.in_pool(serving.decode, req.tokens)
        return DetokenizeResponse(prompt=text)

    return app


def _ids(request: Request, prefix: str) -> RequestIds:
    """The response's id from X-Request-Id (vLLM's `cmpl-<id>`), and the engine's: the same,
    unless the client chose the id, which may then be in use by another of its requests."""
    public = f"{prefix}-{request.state.request_id}"
    engine = f"{public}-{uuid.uuid4().hex[:8]}" if request.state.request_id_given else public
    return RequestIds(public, engine)


async def _respond(request: Request, work: Awaitable[BaseModel | Response]) -> Response:
    """Run a route's work, cancelling it if the client hangs up first.

    A streaming route returns its response as soon as the request is admitted, and Starlette
    watches the connection from then on; a non-streaming one runs to the end here, so without
    this watch a client gone after a timeout would keep the request (and its KV) alive.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if not request.app.state.stopping:
            raise
        # The server's graceful shutdown ran out: tell the client if it still listens.
        return JSONResponse(error_body(503, "The server is shutting down.", None,
                                       "shutting_down"), status_code=503)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # the request's RequestStream aborts it on the way out
            with contextlib.suppress(asyncio.CancelledError):
                await task
    result = task.result() if not task.cancelled() else Response(status_code=499)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return result


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/*, /tokenize and /detokenize (401 otherwise)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    @staticmethod
    def protected(path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or path in (
            "/tokenize", "/detokenize", "/reset_prefix_cache")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(got, self.expected):
            await self.app(scope, receive, send)
            return
        message = "Missing API key." if not got else "Incorrect API key provided."
        response = JSONResponse(error_body(401, message, None, "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
