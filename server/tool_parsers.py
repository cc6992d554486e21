"""Tool calls out of a model's text, per model family (vLLM's --tool-call-parser names):

- `hermes`: Hermes 2/3, Qwen2.5, Qwen3: `<tool_call>{"name": .., "arguments": {..}}</tool_call>`,
  one block per call, possibly after some text.
- `llama3_json`: Llama 3.1/3.2: the whole reply is `{"name": .., "parameters": {..}}` (calls
  separated by `;`), possibly after `<|python_tag|>`.
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}`, or (newer
  tokenizers) `name[ARGS]{..}` after each `[TOOL_CALLS]`.

A parser gives the reply's content and calls at the end, and, while streaming, how much of the
text so far is surely content (everything before a call starts, less a tail that could still
turn out to be the start of one), so that calls never leak into content deltas.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()  # text that opens the calls
    needs_special_tokens = False  # its markers are special tokens the detokenizer would drop

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole reply; no calls and the text as content if it holds
        none, or none that parse."""
        start = self._start(text)
        if start is None:
            return text, []
        try:
            calls = self._calls(text[start:])
        except (ValueError, TypeError, KeyError, AttributeError):
            return text, []
        if not calls:
            return text, []
        content = text[:start].strip()
        return content or None, calls

    def content_end(self, text: str) -> int:
        """How much of a partial reply is surely content."""
        start = self._start(text)
        if start is not None:
            return start
        for marker in self.markers:  # a tail that may still grow into a marker
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:k]):
                    return len(text) - k
        return len(text)

    def content_start(self, text: str) -> int:
        """Where the calls start in a whole reply (its length if nowhere)."""
        start = self._start(text)
        return len(text) if start is None else start

    def make_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def _start(self, text: str) -> int | None:
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def _calls(self, text: str) -> list[ToolCall]:
        raise NotImplementedError

    def _call(self, obj: dict, arguments_key: str = "arguments") -> ToolCall:
        name = obj["name"]
        args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(name, str) or not isinstance(args, dict):
            raise ValueError("not a call")
        return ToolCall(name, json.dumps(args, ensure_ascii=False), self.make_id())


def _objects(text: str) -> list:
    """The JSON values one after another in `text`, separated by whitespace, `;` or `,`."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i >= len(text):
            return out
        value, i = decoder.raw_decode(text, i)
        out.append(value)


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for block in text.split("<tool_call>")[1:]:
            body = block.split("</tool_call>")[0].strip()
            if body:  # an unclosed last block (the reply ended first) still counts
                calls += [self._call(obj) for obj in _objects(body)]
        return calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>",)

    def _start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith("{"):
            return len(text) - len(stripped)
        return super()._start(text)

    def content_end(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or "<|python_tag|>".startswith(stripped):
            return 0  # too early to tell: a reply that is a call starts with `{`
        return super().content_end(text)

    def _calls(self, text: str) -> list[ToolCall]:
        text = text.replace("<|python_tag|>", "")
        return [self._call(obj, "parameters") for obj in _objects(text)]


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    needs_special_tokens = True

    def make_id(self) -> str:
        # Mistral's chat templates take ids of exactly 9 letters and digits
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for part in text.split("[TOOL_CALLS]")[1:]:
            part = part.strip()
            if not part:
                continue
            if "[ARGS]" in part.split("{")[0]:  # name[ARGS]{...}
                name, _, args = part.partition("[ARGS]")
                obj = _objects(args)[0]
                calls.append(self._call({"name": name.strip(), "arguments": obj}))
                continue
            for value in _objects(part):
                items = value if isinstance(value, list) else [value]
                calls += [self._call(obj) for obj in items]
        return calls


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def make_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of "
                         f"{', '.join(sorted(PARSERS))}")
    return PARSERS[name]()
