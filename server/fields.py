"""The request fields vLLM's server takes beyond plain sampling, and what this server does
with each: honoured (turned into SamplingParams or template options by the routes), refused
with a 400 that names the field where this server cannot do what it asks, or, where vLLM too
lets it change nothing, logged once as ignored. docs/serving.md has the whole table.

`structured_outputs_of` gathers the several ways a request can ask for structured output
(vLLM's structured_outputs, OpenAI's response_format, the older guided_* fields, and the
schema a tool_choice enforces) into one StructuredOutputs.
"""

from __future__ import annotations

import json
import logging

from tr_engine.sampling_params import StructuredOutputs

from .errors import APIError
from .protocol import ChatCompletionRequest, _Sampling

log = logging.getLogger("tr_engine.server")
_IGNORED_LOGGED: set[str] = set()
# template variables the server sets itself: chat_template_kwargs may not override them
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "return_dict", "chat_template", "tokenizer",
    "return_tensors", "padding", "truncation", "max_length"})
GRAMMAR_BACKENDS = (None, "auto", "xgrammar")


def refuse(message: str, param: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


def _ignored(name: str, why: str) -> None:
    if name not in _IGNORED_LOGGED:
        _IGNORED_LOGGED.add(name)
        log.warning("request field %s ignored: %s (logged once)", name, why)


def check_sampling_fields(req: _Sampling) -> None:
    """The fields chat and completions share: refuse what cannot be honoured."""
    refused = [
        (req.best_of not in (None, 1), "best_of", "Only best_of = 1 is supported."),
        (req.use_beam_search, "use_beam_search", "Beam search is not supported."),
        (req.length_penalty != 1.0, "length_penalty",
         "length_penalty applies to beam search, which is not supported."),
        (req.priority != 0, "priority",
         "This server schedules first come, first served; priority must be 0."),
        (req.logits_processors is not None, "logits_processors",
         "Custom logits processors are not supported."),
        (req.cache_salt is not None, "cache_salt",
         "Per-request prefix cache salts are not supported."),
        (req.kv_transfer_params is not None, "kv_transfer_params",
         "Disaggregated serving (kv_transfer_params) is not supported."),
        (req.vllm_xargs is not None, "vllm_xargs", "vllm_xargs are not supported."),
        (req.mm_processor_kwargs is not None, "mm_processor_kwargs",
         "This server serves text models only."),
        (bool(req.return_tokens_as_token_ids), "return_tokens_as_token_ids",
         "return_tokens_as_token_ids is not supported."),
        (bool(req.return_token_ids), "return_token_ids", "return_token_ids is not supported."),
        (req.guided_decoding_backend not in GRAMMAR_BACKENDS, "guided_decoding_backend",
         "The only structured output backend is xgrammar."),
        (req.guided_whitespace_pattern is not None, "guided_whitespace_pattern",
         "guided_whitespace_pattern is not supported (JSON is compact unless "
         "structured_outputs.disable_any_whitespace is false)."),
        (req.structural_tag is not None, "structural_tag", "Structural tags are not supported."),
        (bool(req.stream_options and req.stream_options.continuous_usage_stats),
         "stream_options.continuous_usage_stats",
         "continuous_usage_stats is not supported; include_usage gives the usage at the end."),
    ]
    for bad, param, message in refused:
        if bad:
            raise refuse(message, param)
    if not req.spaces_between_special_tokens:
        _ignored("spaces_between_special_tokens",
                 "fast tokenizers decode special tokens without extra spaces, as in vLLM")


def check_chat_fields(req: ChatCompletionRequest) -> None:
    check_sampling_fields(req)
    if req.functions is not None or req.function_call is not None:
        param = "functions" if req.functions is not None else "function_call"
        raise refuse("The deprecated functions/function_call are not supported; use tools and "
                     "tool_choice.", param)
    if req.chat_template is not None:
        raise refuse("Request chat templates are not accepted; the model's own is used.",
                     "chat_template")
    if not req.include_reasoning:
        raise refuse("include_reasoning = false needs a reasoning parser, which this server "
                     "does not have.", "include_reasoning")
    if req.add_generation_prompt and req.continue_final_message:
        raise refuse("continue_final_message needs add_generation_prompt set to false.",
                     "continue_final_message")
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise refuse("continue_final_message needs the last message to be the assistant's.",
                     "continue_final_message")
    clash = sorted(RESERVED_TEMPLATE_KWARGS & set(req.chat_template_kwargs or ()))
    if clash:
        raise refuse(f"chat_template_kwargs may not set {', '.join(clash)} (request fields of "
                     "their own, or the renderer's).", "chat_template_kwargs")


def structured_outputs_of(req: _Sampling, tool_schema: dict | None = None
                          ) -> StructuredOutputs | None:
    """The one StructuredOutputs the request asks for, or None; 400 if it asks in more than
    one way, or for what is not supported."""
    found: list[StructuredOutputs] = []
    so = req.structured_outputs
    if so is not None:
        if so.structural_tag is not None:
            raise refuse("Structural tags are not supported.", "structured_outputs.structural_tag")
        if so.whitespace_pattern is not None:
            raise refuse("whitespace_pattern is not supported.",
                         "structured_outputs.whitespace_pattern")
        found.append(StructuredOutputs(
            json=_schema_text(so.json_, "structured_outputs.json"), regex=so.regex,
            choice=so.choice, grammar=so.grammar, json_object=bool(so.json_object),
            any_whitespace=so.disable_any_whitespace is False, param="structured_outputs"))
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "structural_tag":
            raise refuse("Structural tags are not supported.", "response_format")
        if rf.type == "json_object":
            found.append(StructuredOutputs(json_object=True, param="response_format"))
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise refuse("response_format json_schema needs json_schema.schema.",
                             "response_format.json_schema")
            found.append(StructuredOutputs(
                json=_schema_text(rf.json_schema.schema_, "response_format"),
                param="response_format.json_schema"))
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = getattr(req, name)
        if value is None:
            continue
        kind = name.removeprefix("guided_")
        if kind == "json":
            value = _schema_text(value, name)
        found.append(StructuredOutputs(**{kind: value}, param=name))
    if tool_schema is not None:
        found.append(StructuredOutputs(json=json.dumps(tool_schema), param="tool_choice"))
    if len(found) > 1:
        raise refuse(f"Ask for one structured output at a time; this request sets "
                     f"{', '.join(s.param for s in found)}.", found[1].param)
    return found[0] if found else None


def _schema_text(schema, param: str) -> str | None:
    if schema is None or isinstance(schema, str):
        return schema
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise refuse(f"{param} is not a JSON schema: {e}", param) from None
