"""POST /v1/chat/completions."""

from __future__ import annotations

import time
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
    usage,
)
from .serving import RequestIds, Serving
from .streams import RequestStream, SSEResponse, close_all, sse, stream_events


async def create_chat_completion(
    serving: Serving, req: ChatCompletionRequest, rid: RequestIds
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
    request_id = rid.public
    n = req.n or 1
    # vLLM's echo: the reply is prepended with the last message when that is the assistant's
    echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == "assistant" else ""

    if req.stream:
        streams = await serving.start_n(rid, [(ids, params, None)], n)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(serving, request_id, streams, top_n, include_usage, echo)
        return SSEResponse(events, on_close=lambda: close_all(streams))

    outs = await serving.run_n(rid, [(ids, params, None)], n)
    choices = [ChatChoice(
        index=i,
        message=ChatResponseMessage(content=echo + out.outputs[0].text),
        logprobs=serving.chat_logprobs(out.outputs[0].logprobs, top_n) if top_n is not None
        else None,
        finish_reason=out.outputs[0].finish_reason,
        stop_reason=out.outputs[0].stop_reason,
    ) for i, out in enumerate(outs)]
    return ChatCompletionResponse(id=request_id, model=serving.model_name, choices=choices,
                                  usage=usage(outs))


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


def _events(serving: Serving, request_id: str, streams: list[RequestStream],
            top_n: int | None, include_usage: bool, echo: str) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=serving.model_name,
                                       choices=choices, usage=usage))

    def choice(i: int, out, c, with_logprobs: bool) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=i,
            delta=DeltaMessage(content=c.delta_text) if c.delta_text else DeltaMessage(),
            logprobs=serving.chat_logprobs(c.delta_logprobs, top_n) if with_logprobs else None,
            finish_reason=c.finish_reason if out.finished else None,
            stop_reason=c.stop_reason if out.finished else None,
        )

    def role(i: int) -> str:
        # the echoed message, if any, rides on each choice's first chunk
        return chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                  content=echo))])

    return stream_events(streams, chunk, choice, top_n is not None, include_usage,
                         first=role)
