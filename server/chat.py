"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from .errors import APIError
from .fields import check_chat_fields, structured_outputs_of
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaMessage,
    FunctionCallOut,
    ToolCallOut,
    usage,
)
from .serving import RequestIds, Serving
from .streams import RequestStream, SSEResponse, close_all, sse, stream_events
from .tool_parsers import ToolCall
from .tools import ToolStream, ToolUse, template_messages, tool_use


async def create_chat_completion(
    serving: Serving, req: ChatCompletionRequest, rid: RequestIds
) -> ChatCompletionResponse | SSEResponse:
    serving.check_model(req.model)
    _refuse_unsupported(req)
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    use = tool_use(req, serving.tool_parser)
    messages = template_messages([m.as_template_input() for m in req.messages],
                                 use.tools if use else None, serving.template_has_tools)
    template_kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:  # a template variable, for templates that take it
        template_kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    ids = await serving.encode_chat(
        messages, tools=use.tools if use and serving.template_has_tools else None,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        add_special_tokens=bool(req.add_special_tokens), documents=req.documents,
        template_kwargs=template_kwargs)
    ids = serving.check_token_ids(ids, "messages")
    if req.truncate_prompt_tokens is not None:
        ids = ids[-req.truncate_prompt_tokens:]
    structured = structured_outputs_of(req, use.schema if use else None)
    await serving.check_structured(structured)
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = req.max_tokens, "max_tokens"
    # a parser whose markers are special tokens needs them in the text
    keep_special = use is not None and use.mode == "auto" and use.parser.needs_special_tokens
    params = serving.sampling_params(req, ids, max_tokens=max_tokens,
                                     max_tokens_param=param, logprobs=top_n,
                                     prompt_logprobs=req.prompt_logprobs,
                                     structured=structured,
                                     skip_special_tokens=False if keep_special else None)
    rid = rid.named(req.request_id)
    request_id = rid.public
    n = req.n or 1
    # vLLM's echo: the reply is prepended with the last message when that is the assistant's
    echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == "assistant" else ""
    tools = use if use is not None and use.mode != "none" else None

    if req.stream:
        streams = await serving.start_n(rid, [(ids, params, None)], n)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(serving, request_id, streams, top_n, include_usage, echo, tools)
        return SSEResponse(events, on_close=lambda: close_all(streams))

    outs = await serving.run_n(rid, [(ids, params, None)], n)
    choices = []
    for i, out in enumerate(outs):
        c = out.outputs[0]
        content, calls = tools.calls(c.text) if tools else (c.text, [])
        finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
        choices.append(ChatChoice(
            index=i,
            message=ChatResponseMessage(
                content=echo + content if content is not None else (echo or None),
                tool_calls=[_call_out(call) for call in calls]),
            logprobs=serving.chat_logprobs(c.logprobs, top_n) if top_n is not None else None,
            finish_reason=finish, stop_reason=c.stop_reason))
    return ChatCompletionResponse(
        id=request_id, model=serving.model_name, choices=choices, usage=usage(outs),
        prompt_logprobs=serving.prompt_logprobs(outs[0]) if req.prompt_logprobs is not None
        else None)


def _call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name,
                                                            arguments=call.arguments))


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    check_chat_fields(req)
    if req.stream and req.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs are given in chat's non-streaming responses only.",
                       "prompt_logprobs", "invalid_value")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true.", "top_logprobs",
                           "invalid_value")
        if not 0 <= req.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs must be in [0, 20]; got {req.top_logprobs}.",
                           "top_logprobs", "invalid_value")


def _events(serving: Serving, request_id: str, streams: list[RequestStream],
            top_n: int | None, include_usage: bool, echo: str,
            tools: ToolUse | None) -> AsyncIterator[str]:
    created = int(time.time())
    tool_streams = [ToolStream(tools) for _ in streams] if tools else []
    texts = [""] * len(streams)  # with tools: each choice's text so far, which the parser reads

    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=serving.model_name,
                                       choices=choices, usage=usage))

    def choice(i: int, out, c, with_logprobs: bool) -> ChatChunkChoice:
        finish = c.finish_reason if out.finished else None
        if tool_streams:
            ts = tool_streams[i]
            texts[i] += c.delta_text
            text, calls = ts.step(texts[i], out.finished)
            delta = DeltaMessage(content=text or None, tool_calls=calls or None)
            if ts.calls and finish == "stop":
                finish = "tool_calls"
        else:
            delta = DeltaMessage(content=c.delta_text) if c.delta_text else DeltaMessage()
        return ChatChunkChoice(
            index=i, delta=delta,
            logprobs=serving.chat_logprobs(c.delta_logprobs, top_n) if with_logprobs else None,
            finish_reason=finish,
            stop_reason=c.stop_reason if out.finished else None,
        )

    def role(i: int) -> str:
        # the echoed message, if any, rides on each choice's first chunk
        return chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                  content=echo))])

    return stream_events(streams, chunk, choice, top_n is not None, include_usage,
                         first=role)
