"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from .errors import APIError
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaMessage,
)
from .serving import RequestStream, Serving, SSEResponse, sse, stream_events


async def create_chat_completion(
    serving: Serving, req: ChatCompletionRequest
) -> ChatCompletionResponse | SSEResponse:
    serving.check_model(req.model)
    _refuse_unsupported(req)
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    messages = [m.as_template_input() for m in req.messages]
    ids = serving.check_token_ids(await serving.encode_chat(messages), "messages")
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = req.max_tokens, "max_tokens"
    params = serving.sampling_params(req, ids, max_tokens=max_tokens,
                                     max_tokens_param=param, logprobs=top_n)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"

    if req.stream:
        stream = await serving.start(request_id, ids, params, None)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(serving, request_id, stream, top_n, include_usage)
        return SSEResponse(events, on_close=stream.aclose)

    out = await serving.run(request_id, ids, params, None)
    c = out.outputs[0]
    choice = ChatChoice(
        message=ChatResponseMessage(content=c.text),
        logprobs=serving.chat_logprobs(c.logprobs, top_n) if top_n is not None else None,
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )
    return ChatCompletionResponse(id=request_id, model=serving.model_name, choices=[choice],
                                  usage=serving.usage(out))


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "Only response_format {\"type\": \"text\"} is supported.",
                       "response_format", "invalid_value")
    if req.tools:
        raise APIError(400, "Tool calling is not supported.", "tools", "invalid_value")
    if req.tool_choice not in (None, "none"):
        raise APIError(400, "Tool calling is not supported.", "tool_choice", "invalid_value")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true.", "top_logprobs",
                           "invalid_value")
        if not 0 <= req.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs must be in [0, 20]; got {req.top_logprobs}.",
                           "top_logprobs", "invalid_value")


def _events(serving: Serving, request_id: str, stream: RequestStream, top_n: int | None,
            include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=serving.model_name,
                                       choices=choices, usage=usage))

    def choice(out, c, with_logprobs: bool) -> ChatChunkChoice:
        return ChatChunkChoice(
            delta=DeltaMessage(content=c.delta_text) if c.delta_text else DeltaMessage(),
            logprobs=serving.chat_logprobs(c.delta_logprobs, top_n) if with_logprobs else None,
            finish_reason=c.finish_reason if out.finished else None,
            stop_reason=c.stop_reason if out.finished else None,
        )

    role = chunk([ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
    return stream_events(serving, stream, chunk, choice, top_n is not None, include_usage,
                         first=role)
