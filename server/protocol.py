"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests are validated strictly (no "5" for 5, no 1 for true, no NaN), so a wrong type is a
400 rather than a guess. Fields the OpenAI API has but this server does not implement are
declared, and the server refuses values other than their defaults instead of ignoring them
(server/fields.py); a top-level field nobody here knows is ignored, as vLLM does, and logged
once per name. Nested objects (messages, tools) ignore what they do not know.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from tr_engine.outputs import RequestOutput

INT64_MAX = 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
Seed = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]


def _utf8(value: str) -> str:
    # JSON may spell a lone surrogate ("\ud800"): a Python str, but no UTF-8 exists for it,
    # so neither the tokenizer nor a response echoing it could take it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate at character {e.start}, which is not "
                         "Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]  # every string a request carries


log = logging.getLogger("tr_engine.server")
_UNKNOWN_LOGGED: set[str] = set()


class _Nested(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class _Request(_Nested):
    """A request body: fields it does not declare are kept aside (model_extra), never used,
    and logged once per name."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_unknown(self):
        new = sorted(set(self.model_extra or ()) - _UNKNOWN_LOGGED)
        if new:
            _UNKNOWN_LOGGED.update(new)
            log.warning("%s: unknown field(s) ignored: %s (logged once per name)",
                        type(self).__name__, ", ".join(new))
        return self


class StreamOptions(_Nested):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(_Nested):
    type: Literal["text"]
    text: Text


class FunctionCall(_Nested):
    name: Text
    arguments: Text  # JSON text of an object


class ToolCallParam(_Nested):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Nested):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: Text | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message answers this call
    # declared after role and tool_calls, so that its check sees them
    content: Text | list[TextPart] | None = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_needed(cls, content, info: ValidationInfo):
        if content is None and not (info.data.get("role") == "assistant"
                                    and info.data.get("tool_calls")):
            raise ValueError("content is required (only an assistant message with "
                             "tool_calls may leave it out)")
        return content

    @property
    def text(self) -> str:
        content = self.content
        if content is None:
            return ""
        if not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        return content

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates take it: role and one string of content, with
        tool calls (their arguments as objects, as templates expect) and tool call ids."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": c.function.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_Nested):
    name: Annotated[Text, Field(min_length=1, max_length=64)]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(_Nested):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Nested):
    name: Text


class NamedToolChoice(_Nested):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Nested):
    name: Text | None = None
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Nested):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParam(_Nested):
    """vLLM's structured_outputs."""

    json_: Text | dict[str, Any] | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    structural_tag: Any = None
    whitespace_pattern: Text | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    disable_fallback: bool | None = None


class _Sampling(_Request):
    """The sampling knobs chat and completions share (vLLM's names and meanings)."""

    model: Text | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    user: Text | None = None
    logit_bias: dict[Text, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # vLLM's sampling extras
    min_tokens: int = Field(default=0, ge=0)
    bad_words: list[Text] | None = None
    allowed_token_ids: list[TokenId] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    prompt_logprobs: int | None = None
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    spaces_between_special_tokens: bool = True
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    priority: int = 0
    request_id: Text | None = None
    logits_processors: Any = None
    cache_salt: Text | None = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    mm_processor_kwargs: Any = None
    add_special_tokens: bool | None = None  # chat: False, completions: True
    # structured outputs: vLLM's field, OpenAI's response_format, vLLM's older guided_*
    structured_outputs: StructuredOutputsParam | None = None
    response_format: ResponseFormat | None = None
    guided_json: Text | dict[str, Any] | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    guided_decoding_backend: Text | None = None
    guided_whitespace_pattern: Text | None = None
    structural_tag: Any = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None  # OpenAI's deprecated function calling: refused, use tools
    function_call: Any = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, Any]] | None = None
    chat_template: Text | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Text | None = None
    include_reasoning: bool = True


class CompletionRequest(_Sampling):
    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: Text | None = None
    prompt_embeds: Any = None


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[TokenId]


# ---- responses --------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None  # 1 for the likeliest token; None where not known
    decoded_token: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    # OpenAI's tool call deltas: {"index", "id", "type", "function": {"name", "arguments"}}
    # the first time a call shows, then {"index", "function": {"arguments": more}}
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler) -> dict[str, Any]:
        # OpenAI sends only what the chunk carries: {"role": ..} first, {} at the end.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's: per prompt token (None for the first), token id -> its logprob entry
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    """Also the shape of each streamed chunk (`usage` then null until the last one)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tr_engine"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def usage(outs: RequestOutput | list[RequestOutput], n: int | None = None) -> UsageInfo:
    """Each prompt once, the completions of every choice; `outs` are n choices of each
    prompt in turn (n None: all of one prompt)."""
    outs = outs if isinstance(outs, list) else [outs]
    firsts = outs[:: n or len(outs)]  # each prompt's first choice
    prompt = sum(len(o.prompt_token_ids) for o in firsts)
    completion = sum(o.outputs[0].num_tokens for o in outs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     # each prompt as its first choice met it (the others reuse its KV)
                     prompt_tokens_details=PromptTokensDetails(
                         cached_tokens=sum(o.num_cached_tokens for o in firsts)))
