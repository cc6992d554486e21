"""What chat and completions share: prompt checks, the request -> SamplingParams translation,
running a request (or n choices) on the engine, logprobs in OpenAI's shapes. Streams and
server-sent events are in streams.py."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from tr_engine.errors import RequestTooLong
from tr_engine.outputs import RequestOutput, TokenLogprob
from tr_engine.sampling_params import SamplingParams, StructuredOutputs

from .errors import APIError
from .metrics import ServerMetrics
from .protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprob,
    _Sampling,
)
from .settings import ServerSettings
from .streams import RequestStream, close_all, last_output
from .tool_parsers import make_parser

log = logging.getLogger("tr_engine.server")
T = TypeVar("T")
_MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (vLLM's convention)
_TOKENIZER_THREADS = 4

try:  # chat templates are Jinja; their own errors count as bad input, not server faults
    from jinja2 import TemplateError as _TemplateError
except ImportError:  # pragma: no cover - transformers brings jinja2
    _TemplateError = ValueError


Job = tuple[list[int], SamplingParams, "str | None"]  # a prompt's ids, params and text


@dataclass(frozen=True)
class RequestIds:
    """A request's id in its response and logs (`cmpl-<X-Request-Id>`) and the stem of its
    engine requests' ids (the same, or with a suffix where the client chose the id)."""

    public: str
    engine: str

    def named(self, request_id: str | None) -> RequestIds:
        """vLLM's `request_id` body field names the response as an X-Request-Id header does;
        the engine's id stays unique (the same id sent twice runs twice)."""
        if not request_id:
            return self
        public = f"{self.public.split('-', 1)[0]}-{request_id}"
        return RequestIds(public, f"{public}-{uuid.uuid4().hex[:8]}")


class Serving:
    """The engine behind the routes. One per app."""

    def __init__(self, engine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.model_name: str = engine.model_name
        # each thread its own tokenizer: the pool's, the event loop's, the engine's
        self.tokenizers = engine.tokenizers
        self.tokenizers.prepare(_TOKENIZER_THREADS)
        tokenizer = self.tokenizers.get()
        self.vocab_size = len(tokenizer)
        self.max_model_len: int = engine.max_model_len
        # what a request leaves unset: the model's generation config's values, where it has
        # them (--generation-config), else the plain ones
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                         "repetition_penalty": 1.0, **engine.sampling_defaults}
        # The longest prompt + output any request can have: context or KV cache, whichever ends
        # first (KV capacity is for all ranks together: the sequence is sharded).
        self.context_limit = min(self.max_model_len, engine.kv_capacity_tokens)
        # Tokenizing a long prompt takes a while: off the event loop, on a pool (the
        # tokenizer releases the GIL), so a long prompt does not hold up a short one.
        self._pool = ThreadPoolExecutor(_TOKENIZER_THREADS, thread_name_prefix="tr-tokenize")
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)
        # No token is longer than this many characters, so a text of more than
        # context_limit * max_token_chars characters cannot fit and is refused untokenized.
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1) or 1
        self.max_prompt_chars = self.context_limit * self.max_token_chars
        self.tool_parser = make_parser(settings.tool_call_parser) \
            if settings.enable_auto_tool_choice else None
        template = getattr(tokenizer, "chat_template", None) or ""
        if isinstance(template, dict):
            template = "\n".join(template.values())
        # a template that never mentions tools does not render them: tools.py writes them
        self.template_has_tools = "tools" in template

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def in_pool(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- checks ---------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                           f"`{self.model_name}`.", "model", "model_not_found")

    def check_ready(self) -> None:
        if not self.engine.healthy:
            raise APIError(503, "The engine is not running.", None, "engine_dead")

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"'{param}' must not be empty.", param, "invalid_value")
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"'{param}' holds token id {bad}, outside the vocabulary "
                           f"(0..{self.vocab_size - 1}).", param, "invalid_value")
        return ids

    def check_chars(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing, a text too long to fit whatever its tokens."""
        if chars > self.max_prompt_chars:
            raise APIError(400, f"The {param} has {chars} characters; no token of this model "
                           f"is longer than {self.max_token_chars}, so it cannot fit in the "
                           f"{self.context_limit} tokens a request may hold.", param,
                           "context_length_exceeded")

    async def encode_text(self, text: str, add_special_tokens: bool = True,
                          param: str = "prompt") -> list[int]:
        self.check_chars(len(text), param)
        return await self.in_pool(self._encode, text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizers.get().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        """Token ids to text, on the calling thread's own tokenizer (run it in the pool)."""
        return self.tokenizers.get().decode(ids)

    async def encode_chat(self, messages: list[dict], **options) -> list[int]:
        """The chat template applied (options: LLMEngine.encode_chat's) and tokenized."""
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            return await self.in_pool(functools.partial(self.engine.encode_chat, messages,
                                                        **options))
        except (ValueError, TypeError, _TemplateError) as exc:
            message = str(exc)
            if not message.startswith("the chat template"):  # the engine's own says it
                message = f"the chat template cannot take these messages: {message}"
            raise APIError(400, message[0].upper() + message[1:], "messages",
                           "invalid_value") from None

    async def check_structured(self, structured: StructuredOutputs | None) -> None:
        """Compile the request's grammar off the event loop (InvalidParameter, a 400, if the
        library cannot); the engine then finds it compiled."""
        if structured is not None:
            await self.in_pool(self.engine.compile_grammar, structured)

    # ---- request -> SamplingParams --------------------------------------------------------

    def sampling_params(self, req: _Sampling, ids: list[int], *, max_tokens: int | None,
                        max_tokens_param: str, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        structured: StructuredOutputs | None = None,
                        skip_special_tokens: bool | None = None) -> SamplingParams:
        """The request's SamplingParams, checked against the engine's limits.

        Without max_tokens: all the room left (OpenAI's default), capped at
        settings.default_max_tokens so that one request does not reserve a whole long context's
        KV for its output, and at the model's max_new_tokens where its generation config has
        one; if the KV cache's layout leaves less room than the arithmetic says, the largest
        max_tokens the engine accepts. Other unset fields take `self.defaults`.
        """
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.",
                           "stream_options", "invalid_value")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{max_tokens_param} must be at least 1; got {max_tokens}.",
                           max_tokens_param, "invalid_value")
        d = self.defaults
        top_k = _default(req.top_k, d["top_k"])
        if top_k >= self.vocab_size:
            top_k = 0  # keeping every token is no filter at all
        temperature = _default(req.temperature, d["temperature"])
        if 0.0 < temperature < _MIN_TEMPERATURE:
            temperature = 0.0  # dividing logits by ~0 overflows; this close to 0 is greedy
        room = min(self.settings.default_max_tokens, d.get("max_tokens", self.context_limit),
                   self.context_limit - len(ids))
        params = SamplingParams(
            max_tokens=max_tokens or max(1, room),
            temperature=temperature,
            top_p=_default(req.top_p, d["top_p"]),
            top_k=top_k,
            min_p=_default(req.min_p, d["min_p"]),
            seed=req.seed,
            presence_penalty=_default(req.presence_penalty, 0.0),
            frequency_penalty=_default(req.frequency_penalty, 0.0),
            repetition_penalty=_default(req.repetition_penalty, d["repetition_penalty"]),
            stop=req.stop if req.stop is not None else (),  # "" is refused, not ignored
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            # a stream needs only each step's delta; a whole response, the whole at the end
            output_kind="delta" if req.stream else "final",
            logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens if skip_special_tokens is None
            else skip_special_tokens,
            logit_bias=self._logit_bias(req.logit_bias),
            prompt_logprobs=prompt_logprobs,
            min_tokens=req.min_tokens,
            bad_words=tuple(req.bad_words or ()),
            allowed_token_ids=req.allowed_token_ids,
            structured_outputs=structured,
        )
        if max_tokens is not None:
            self.engine.check(ids, params)
            return params
        return self._largest_accepted(ids, params)

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        """OpenAI's logit_bias: token ids, as JSON keys (strings), to biases."""
        out = {}
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit() and int(key) < self.vocab_size):
                raise APIError(400, f"logit_bias keys must be token ids in "
                               f"[0, {self.vocab_size}); got {key!r}.", "logit_bias",
                               "invalid_value")
            out[int(key)] = float(value)
        return out

    def _largest_accepted(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        """params with the largest max_tokens <= params.max_tokens that engine.check takes
        (it is monotone in max_tokens); the engine's refusal if not even 1 fits."""
        try:
            self.engine.check(ids, params)
            return params
        except RequestTooLong:
            if params.max_tokens == 1:
                raise
        lo, hi = 0, params.max_tokens - 1  # lo: known to fit (0 = none yet); hi: may fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                self.engine.check(ids, dataclasses.replace(params, max_tokens=mid))
                lo = mid
            except RequestTooLong:
                hi = mid - 1
        if lo == 0:
            self.engine.check(ids, dataclasses.replace(params, max_tokens=1))  # raises
        return dataclasses.replace(params, max_tokens=max(lo, 1))

    # ---- running --------------------------------------------------------------------------

    async def start(self, request_id: str, ids: list[int], params: SamplingParams,
                    prompt: str | None) -> RequestStream:
        """Submit a request. `params` come from sampling_params(), which has run
        engine.check; the engine refuses a full queue or a dead engine right here, so those
        are HTTP errors and a stream can start before the first token (a long prefill)."""
        self.check_ready()
        gen = self.engine.generate(request_id, ids, params, prompt)
        return RequestStream(self.engine, request_id, gen, self.metrics.tracker())

    async def start_n(self, ids: RequestIds, jobs: list[Job], n: int = 1
                      ) -> list[RequestStream]:
        """`n` choices of each job (a prompt's token ids, SamplingParams and text): one
        engine request each, in order, prompt by prompt, so that stream k is choice k of
        the response (vLLM's order). With a seed, choice j of a prompt samples with seed +
        j. Engine ids are `ids.engine`, or `{ids.engine}-{k}` for more than one. All or none
        start: if one is refused, those already started are aborted and the refusal
        raised."""
        total = len(jobs) * n
        if total > self.engine.max_open_requests:
            what = f"n = {n} choices" if len(jobs) == 1 else \
                f"{len(jobs)} prompts x n = {n} choices"
            raise APIError(400, f"{what} are more requests than this server holds at once "
                           f"({self.engine.max_open_requests}).",
                           "n" if len(jobs) == 1 else "prompt", "invalid_value")
        log.info("%s: %s prompt tokens, %d choice(s)%s", ids.public,
                 "+".join(str(len(job[0])) for job in jobs), n,
                 "" if ids.engine == ids.public else f" (engine id {ids.engine})")
        streams: list[RequestStream] = []
        try:
            for k in range(total):
                prompt_ids, params, text = jobs[k // n]
                j = k % n
                if params.seed is not None and j:
                    params = dataclasses.replace(params, seed=params.seed + j)
                engine_id = ids.engine if total == 1 else f"{ids.engine}-{k}"
                streams.append(await self.start(engine_id, prompt_ids, params, text))
        except BaseException:
            await close_all(streams)
            raise
        return streams

    async def run_n(self, ids: RequestIds, jobs: list[Job], n: int = 1
                    ) -> list[RequestOutput]:
        """Run start_n's requests to the end; their last (cumulative) outputs, in order."""
        streams = await self.start_n(ids, jobs, n)
        try:
            return list(await asyncio.gather(*(last_output(s) for s in streams)))
        finally:
            await close_all(streams)

    # ---- logprobs -------------------------------------------------------------------------

    def prompt_logprobs(self, out: RequestOutput) -> list[dict[str, PromptLogprob] | None]:
        """vLLM's prompt_logprobs: for each prompt token (None for the first), the token and
        the top alternatives, by token id."""
        result: list[dict[str, PromptLogprob] | None] = []
        for e in out.prompt_logprobs or ():
            if e is None:
                result.append(None)
                continue
            ranked = sorted(e.top.items(), key=lambda kv: -kv[1])
            entry = {str(tid): PromptLogprob(logprob=_finite(lp), rank=r,
                                             decoded_token=self.token_text(tid))
                     for r, (tid, lp) in enumerate(ranked, 1)}
            if str(e.token_id) not in entry:
                entry = {str(e.token_id): PromptLogprob(
                    logprob=_finite(e.logprob), decoded_token=self.token_text(e.token_id)),
                    **entry}
            result.append(entry)
        return result

    def _token_text(self, token_id: int) -> str:
        return self.tokenizers.get().decode([token_id])

    def chat_logprobs(self, entries: list[TokenLogprob] | None, top_n: int) -> ChatLogprobs:
        content = []
        for e in entries or ():
            text = self.token_text(e.token_id)
            top = sorted(e.top.items(), key=lambda kv: -kv[1])[:top_n]
            content.append(ChatTokenLogprob(
                token=text, logprob=_finite(e.logprob), bytes=list(text.encode()),
                top_logprobs=[ChatTopLogprob(token=(t := self.token_text(tid)),
                                             logprob=_finite(lp), bytes=list(t.encode()))
                              for tid, lp in top]))
        return ChatLogprobs(content=content)

    def completion_logprobs(self, entries: list[TokenLogprob] | None,
                            offset: int) -> CompletionLogprobs:
        """`offset`: where the first of these tokens starts in the completion text."""
        result = CompletionLogprobs()
        for e in entries or ():
            text = self.token_text(e.token_id)
            result.tokens.append(text)
            result.token_logprobs.append(_finite(e.logprob))
            top = {self.token_text(tid): _finite(lp) for tid, lp in e.top.items()}
            top.setdefault(text, _finite(e.logprob))
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(text)
        return result


def _default(value, default):
    return default if value is None else value


def _finite(x: float) -> float:
    """-inf is not JSON; OpenAI reports impossible tokens at -9999."""
    return max(float(x), -9999.0)
