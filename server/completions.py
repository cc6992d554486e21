"""POST /v1/completions."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from tr_engine.outputs import RequestOutput

from .errors import APIError, as_api_error
from .fields import check_sampling_fields, structured_outputs_of
from .protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    usage,
)
from .serving import RequestIds, Serving
from .streams import RequestStream, SSEResponse, close_all, sse, stream_events


async def create_completion(
    serving: Serving, req: CompletionRequest, rid: RequestIds
) -> CompletionResponse | SSEResponse:
    serving.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported.", "suffix", "invalid_value")
    check_sampling_fields(req)
    if req.prompt_embeds is not None:
        raise APIError(400, "prompt_embeds are not supported.", "prompt_embeds",
                       "invalid_value")
    prompt_lps = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        if prompt_lps not in (None, req.logprobs):
            raise APIError(400, "With echo and logprobs, prompt_logprobs must equal logprobs "
                           "(the echoed prompt's logprobs are the prompt logprobs).",
                           "prompt_logprobs", "invalid_value")
        prompt_lps = req.logprobs
    want_prompt_lps = req.prompt_logprobs is not None
    structured = structured_outputs_of(req)
    await serving.check_structured(structured)
    # Every prompt of a list is checked before any starts: one bad prompt refuses the whole
    # request, and nothing runs for it.
    prompts = await _prompts(serving, req.prompt, req.add_special_tokens is not False)
    jobs, echoes = [], []
    for i, (text, ids) in enumerate(prompts):
        if req.truncate_prompt_tokens is not None:
            ids = ids[-req.truncate_prompt_tokens:]
        with _naming(i, len(prompts)):
            params = serving.sampling_params(req, ids, max_tokens=req.max_tokens,
                                             max_tokens_param="max_tokens",
                                             logprobs=req.logprobs,
                                             prompt_logprobs=prompt_lps,
                                             structured=structured)
        jobs.append((ids, params, text))
        echo = None
        if req.echo:  # the prompt as the client sent it, or its decoded ids
            echo = text if text is not None else \
                await serving.in_pool(serving.decode, ids)
        echoes.append(echo)
    rid = rid.named(req.request_id)
    request_id = rid.public
    n = req.n or 1

    if req.stream:
        streams = await serving.start_n(rid, jobs, n)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(serving, request_id, streams, req.logprobs is not None, include_usage,
                         echoes, n, want_prompt_lps)
        return SSEResponse(events, on_close=lambda: close_all(streams))

    outs = await serving.run_n(rid, jobs, n)
    choices = []
    for i, out in enumerate(outs):
        c = out.outputs[0]
        echo = echoes[i // n]
        logprobs = None
        if req.logprobs is not None:
            logprobs = serving.completion_logprobs(c.logprobs, len(echo or ""))
            if echo is not None:
                logprobs = _join(_echo_logprobs(serving, out), logprobs)
        choices.append(CompletionChoice(
            index=i, text=(echo or "") + c.text, logprobs=logprobs,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            prompt_logprobs=serving.prompt_logprobs(out) if want_prompt_lps else None))
    return CompletionResponse(id=request_id, model=serving.model_name, choices=choices,
                              usage=usage(outs, n))


def _echo_logprobs(serving: Serving, out: RequestOutput) -> CompletionLogprobs:
    """The prompt's tokens as logprobs entries: the first one has none (OpenAI's null)."""
    lps = serving.completion_logprobs([e for e in out.prompt_logprobs or () if e], 0)
    first = serving.token_text(out.prompt_token_ids[0])
    lps.tokens.insert(0, first)
    lps.token_logprobs.insert(0, None)
    lps.top_logprobs.insert(0, None)
    lps.text_offset = [0] + [o + len(first) for o in lps.text_offset]
    return lps


def _join(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens,
                              top_logprobs=a.top_logprobs + b.top_logprobs)


async def _prompts(serving: Serving, prompt, add_special_tokens: bool = True
                   ) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) of each prompt: one given as a string or token ids, or a list of
    them. Each is checked; a bad one's error names its place in the list."""
    many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], str | list)
    items = prompt if many else [prompt]
    if many:  # refuse texts too long for any tokens before tokenizing any of them
        for i, item in enumerate(items):
            if isinstance(item, str):
                with _naming(i, len(items)):
                    serving.check_chars(len(item), "prompt")
    out = []
    for i, item in enumerate(items):
        with _naming(i, len(items)):
            if isinstance(item, str):
                ids = await serving.encode_text(item, add_special_tokens)
                out.append((item, serving.check_token_ids(ids, "prompt")))
            else:
                out.append((None, serving.check_token_ids(list(item), "prompt")))
    return out


@contextlib.contextmanager
def _naming(index: int, count: int):
    """Errors inside name prompt `index` when the request has `count` > 1 of them."""
    try:
        yield
    except Exception as exc:
        err = as_api_error(exc)
        if count == 1 or err is None:
            raise
        raise APIError(err.status, f"Prompt {index}: {err.message}", err.param, err.code,
                       err.headers) from None


def _events(serving: Serving, request_id: str, streams: list[RequestStream], logprobs: bool,
            include_usage: bool, echoes: list[str | None], n: int,
            prompt_lps: bool = False) -> AsyncIterator[str]:
    """Stream i is choice i: choice j of prompt i // n."""
    created = int(time.time())
    sent = [0] * len(streams)  # characters of each choice's text streamed so far

    def chunk(choices: list[CompletionChoice], usage=None) -> str:
        return sse(CompletionResponse(id=request_id, created=created, model=serving.model_name,
                                      choices=choices, usage=usage))

    def choice(i: int, out, c, with_logprobs: bool) -> CompletionChoice:
        echo = echoes[i // n]
        offset = len(echo or "") + sent[i]
        sent[i] += len(c.delta_text)
        lps, prefix = None, ""
        if with_logprobs:
            lps = serving.completion_logprobs(c.delta_logprobs, offset)
            if echo is not None and c.num_tokens == len(c.delta_token_ids):
                # the first token's chunk: the echoed prompt and its logprobs go before it
                lps, prefix = _join(_echo_logprobs(serving, out), lps), echo
        first_token = len(c.token_ids) == len(c.delta_token_ids)
        return CompletionChoice(
            index=i,
            text=prefix + c.delta_text,
            logprobs=lps,
            finish_reason=c.finish_reason if out.finished else None,
            stop_reason=c.stop_reason if out.finished else None,
            # vLLM's: with the first token's chunk
            prompt_logprobs=serving.prompt_logprobs(out) if prompt_lps and first_token
            else None,
        )

    first = None
    if echoes[0] is not None and not logprobs:
        # the echoed prompt opens each choice (with logprobs it rides on the first token's)
        def first(i: int) -> str:
            return chunk([CompletionChoice(index=i, text=echoes[i // n])])

    return stream_events(streams, chunk, choice, logprobs, include_usage, first=first, n=n)
