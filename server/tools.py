"""Tool calling in chat: what a request's `tools` and `tool_choice` ask for, the prompt's
tools and earlier calls, and the reply turned into OpenAI's tool_calls (whole, or as stream
deltas).

- "none": the tools go to the template, the reply is text.
- "auto": the model decides; its text goes through the server's --tool-call-parser.
- "required" / a named function: enforced with structured output, so that even a small model
  returns valid calls: a named function's output is its parameters' JSON schema; "required"
  gives a JSON list of {"name", "parameters"} items, each one of the tools (vLLM's shape).

A template that does not render tools (the embedded SmolLM2's) gets them written into the
system message, and earlier calls into the assistant's text, in the Hermes format
(`<tool_call>{"name", "arguments"}</tool_call>`), which the `hermes` parser reads back.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError
from .protocol import ChatCompletionRequest
from .tool_parsers import ToolCall, ToolParser

_ANY_OBJECT = {"type": "object"}


@dataclass
class ToolUse:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict]  # OpenAI's tool objects, for the template
    parser: ToolParser | None = None
    named: str | None = None
    parallel: bool = True
    schema: dict | None = None  # the structured output that enforces the calls

    def make_id(self) -> str:
        return self.parser.make_id() if self.parser else f"call_{uuid.uuid4().hex[:24]}"

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole reply."""
        if self.mode == "named":
            try:
                ok = isinstance(json.loads(text), dict)
            except ValueError:
                ok = False
            return (None, [ToolCall(self.named, text, self.make_id())]) if ok else (text, [])
        if self.mode == "required":
            try:
                items = json.loads(text)
                calls = [ToolCall(it["name"], json.dumps(it["parameters"], ensure_ascii=False),
                                  self.make_id()) for it in items]
            except (ValueError, TypeError, KeyError):
                return text, []
            return None, calls
        if self.mode == "auto" and self.parser is not None:
            content, calls = self.parser.parse(text)
            return content, calls if self.parallel else calls[:1]
        return text, []


def tool_use(req: ChatCompletionRequest, parser: ToolParser | None) -> ToolUse | None:
    """The request's tool use (None without tools); 400 for a choice it cannot have."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools.", "tool_choice", "invalid_value")
        return None
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise APIError(400, "Tool names must be unique.", "tools", "invalid_value")
    tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools]
    parallel = req.parallel_tool_calls is not False
    if choice is None:
        choice = "auto"  # OpenAI's default when tools are given
    if choice == "none":
        return ToolUse("none", tools)
    if choice == "auto":
        if parser is None:
            raise APIError(400, '"auto" tool choice needs the server started with '
                           "--enable-auto-tool-choice and --tool-call-parser; or set "
                           'tool_choice to "required", "none" or a named function.',
                           "tool_choice", "invalid_value")
        return ToolUse("auto", tools, parser, parallel=parallel)
    params = {t.function.name: t.function.parameters or _ANY_OBJECT for t in req.tools}
    if choice == "required":
        items = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [name]},
                                 "parameters": schema},
                  "required": ["name", "parameters"]} for name, schema in params.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolUse("required", tools, parser, parallel=parallel, schema=_hoist_defs(schema))
    name = choice.function.name
    if name not in params:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools "
                       f"({', '.join(names)}).", "tool_choice", "invalid_value")
    return ToolUse("named", tools, parser, named=name, parallel=parallel, schema=params[name])


def _hoist_defs(schema: dict) -> dict:
    """The tools' `$defs` moved to the top of the combined schema, where `#/$defs/..`
    references point."""
    schema = copy.deepcopy(schema)
    items = schema["items"].get("anyOf", [schema["items"]])
    defs: dict = {}
    for item in items:
        params = item["properties"]["parameters"]
        for key, value in params.pop("$defs", {}).items() if isinstance(params, dict) else ():
            if defs.get(key, value) != value:
                raise APIError(400, f"Two tools define $defs/{key} differently.", "tools",
                               "invalid_value")
            defs[key] = value
    if defs:
        schema["$defs"] = defs
    return schema


def template_messages(messages: list[dict], tools: list[dict] | None,
                      template_has_tools: bool) -> list[dict]:
    """Messages as the template takes them: tool call arguments as objects; for a template
    without tools support, tools and calls written as text (Hermes format)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                try:
                    args = json.loads(c["function"]["arguments"])
                except ValueError:
                    raise APIError(400, "A tool call's arguments in the messages are not JSON.",
                                   "messages", "invalid_value") from None
                calls.append({**c, "function": {**c["function"], "arguments": args}})
            m["tool_calls"] = calls
            if not template_has_tools:
                text = "\n".join("<tool_call>\n" + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False) + "\n</tool_call>" for c in calls)
                m["content"] = (m["content"] + "\n" if m["content"] else "") + text
                del m["tool_calls"]
        out.append(m)
    if tools and not template_has_tools:
        text = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def tools_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query. The functions "
            f"are listed within <tools></tools>:\n<tools>\n{listing}\n</tools>\n"
            "For each call, answer with a JSON object of the function's name and arguments "
            "within <tool_call></tool_call>:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


@dataclass
class ToolStream:
    """One streamed choice's deltas: content as long as it is surely content, tool calls in
    OpenAI's delta shape (a named function's arguments as they come; other calls once
    parsed, at the end)."""

    use: ToolUse
    sent: int = 0  # characters of the text handled so far
    call_id: str | None = None
    calls: list[ToolCall] = field(default_factory=list)

    def step(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        """(content delta, tool call deltas) for the cumulative `text`."""
        use = self.use
        if use.mode == "named":
            deltas = []
            if self.call_id is None:
                self.call_id = use.make_id()
                deltas.append({"index": 0, "id": self.call_id, "type": "function",
                               "function": {"name": use.named, "arguments": ""}})
            if len(text) > self.sent:
                deltas.append({"index": 0, "function": {"arguments": text[self.sent:]}})
                self.sent = len(text)
            if finished:
                self.calls = [ToolCall(use.named, text, self.call_id)]
            return "", deltas
        if use.mode == "auto" and use.parser is not None and not finished:
            end = max(self.sent, use.parser.content_end(text))
            delta, self.sent = text[self.sent:end], end
            return delta, []
        if use.mode in ("auto", "required") and not finished:
            return "", []  # "required": the whole list is parsed at the end
        if not finished:
            delta, self.sent = text[self.sent:], len(text)
            return delta, []
        content, self.calls = use.calls(text)
        if not self.calls:
            delta, self.sent = text[self.sent:], len(text)
            return delta, []
        start = use.parser.content_start(text) if use.mode == "auto" else self.sent
        delta = text[self.sent:max(self.sent, start)]
        self.sent = len(text)
        deltas = [{"index": k, "id": c.id, "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}}
                  for k, c in enumerate(self.calls)]
        return delta.rstrip() if delta.strip() else "", deltas
