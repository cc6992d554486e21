"""POST /v1/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from .errors import APIError
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse
from .serving import RequestStream, Serving, SSEResponse, sse, stream_events


async def create_completion(
    serving: Serving, req: CompletionRequest
) -> CompletionResponse | SSEResponse:
    serving.check_model(req.model)
    if req.echo:
        raise APIError(400, "echo is not supported.", "echo", "invalid_value")
    if req.suffix:
        raise APIError(400, "suffix is not supported.", "suffix", "invalid_value")
    if req.best_of not in (None, 1):
        raise APIError(400, "Only best_of = 1 is supported.", "best_of", "invalid_value")
    text, ids = await _prompt(serving, req.prompt)
    params = serving.sampling_params(req, ids, max_tokens=req.max_tokens,
                                     max_tokens_param="max_tokens", logprobs=req.logprobs)
    request_id = f"cmpl-{uuid.uuid4().hex}"

    if req.stream:
        stream = await serving.start(request_id, ids, params, text)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(serving, request_id, stream, req.logprobs is not None, include_usage)
        return SSEResponse(events, on_close=stream.aclose)

    out = await serving.run(request_id, ids, params, text)
    c = out.outputs[0]
    choice = CompletionChoice(
        text=c.text,
        logprobs=serving.completion_logprobs(c.logprobs, 0) if req.logprobs is not None
        else None,
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )
    return CompletionResponse(id=request_id, model=serving.model_name, choices=[choice],
                              usage=serving.usage(out))


async def _prompt(serving: Serving, prompt) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt given as a string, token ids, or a list of one of them."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, f"Only one prompt per request is supported; got {len(prompt)}.",
                           "prompt", "invalid_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, serving.check_token_ids(await serving.encode_text(prompt), "prompt")
    return None, serving.check_token_ids(list(prompt), "prompt")


def _events(serving: Serving, request_id: str, stream: RequestStream, logprobs: bool,
            include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[CompletionChoice], usage=None) -> str:
        return sse(CompletionResponse(id=request_id, created=created, model=serving.model_name,
                                      choices=choices, usage=usage))

    def choice(out, c, with_logprobs: bool) -> CompletionChoice:
        offset = len(c.text) - len(c.delta_text)
        return CompletionChoice(
            text=c.delta_text,
            logprobs=serving.completion_logprobs(c.delta_logprobs, offset) if with_logprobs
            else None,
            finish_reason=c.finish_reason if out.finished else None,
            stop_reason=c.stop_reason if out.finished else None,
        )

    return stream_events(serving, stream, chunk, choice, logprobs, include_usage)
