"""Tool call parsers on known text (each family's format), the streamed deltas they give, and
how tools and earlier calls reach a template: no server, no model."""

from __future__ import annotations

import json

import pytest
from tr_engine.server.tool_parsers import PARSERS, make_parser
from tr_engine.server.tools import ToolStream, ToolUse, template_messages, tools_prompt

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}

# (parser, reply, expected content, expected calls as (name, arguments))
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris"}}\n</tool_call>', "Let me check.", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>\n'
     '{"name": "b", "arguments": {"x": [1, 2]}}\n</tool_call>', None,
     [("a", {}), ("b", {"x": [1, 2]})]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {"k": "v"}}', None, [("a", {"k": "v"})]),
    ("hermes", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
    ("hermes", "<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>",
     []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"n": 1}}; '
     '{"name": "b", "parameters": {}}', None, [("a", {"n": 1}), ("b", {})]),
    ("llama3_json", "The answer is {braces} in text.", "The answer is {braces} in text.", []),
    ("llama3_json", '  {"name": "a", "arguments": {"q": "é"}}', None, [("a", {"q": "é"})]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]', None,
     [("get_weather", {"city": "Rome"})]),
    ("mistral", 'Sure [TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", '
     '"arguments": {"z": null}}]', "Sure", [("a", {}), ("b", {"z": None})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]a[ARGS]{}', None,
     [("get_weather", {"city": "Lyon"}), ("a", {})]),
    ("mistral", "Just text.", "Just text.", []),
]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_parse_known_text(name, text, content, calls):
    got_content, got = make_parser(name).parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got)


def test_ids():
    assert all(c.isalnum() and len(c) == 9 for c in
               [make_parser("mistral").make_id() for _ in range(20)])
    assert make_parser("hermes").make_id().startswith("call_")
    with pytest.raises(ValueError, match="unknown tool call parser"):
        make_parser("nope")
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral"}


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_stream_matches_whole(name, text, content, calls):
    """Fed one character at a time, a stream's content deltas never hold a call's text and
    add up to the content; its calls are the whole reply's."""
    ts = ToolStream(ToolUse("auto", [WEATHER], make_parser(name)))
    streamed, deltas = "", []
    for k in range(1, len(text) + 1):
        part, d = ts.step(text[:k], k == len(text))
        streamed += part
        deltas += d
    got = [(d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas]
    assert got == calls
    assert [d["index"] for d in deltas] == list(range(len(calls)))
    if calls:
        assert streamed.strip() == (content or "")
        for marker in ("<tool_call>", "[TOOL_CALLS]", '{"name"'):
            assert marker not in streamed
    else:
        assert streamed == text


def test_named_stream_sends_arguments_as_they_come():
    ts = ToolStream(ToolUse("named", [WEATHER], named="get_weather"))
    first, d1 = ts.step('{"ci', False)
    _, d2 = ts.step('{"city": "Oslo"}', True)
    assert first == ""
    assert d1[0]["function"] == {"name": "get_weather", "arguments": ""} and d1[0]["id"]
    assert "".join(d["function"]["arguments"] for d in d1 + d2) == '{"city": "Oslo"}'
    assert ts.calls[0].name == "get_weather"


def test_required_output_to_calls():
    use = ToolUse("required", [WEATHER])
    content, calls = use.calls('[{"name": "get_weather", "parameters": {"city": "Nice"}}]')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Nice"})]
    assert use.calls('[{"name": "get_wea')[1] == []  # cut by max_tokens: text, no calls


def test_template_messages_without_template_tools():
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
    ]
    with_template = template_messages(history, [WEATHER], True)
    assert with_template[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert len(with_template) == 3
    plain = template_messages(history, [WEATHER], False)
    assert plain[0] == {"role": "system", "content": tools_prompt([WEATHER])}
    assert "tool_calls" not in plain[2]
    _, calls = make_parser("hermes").parse(plain[2]["content"])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                  {"city": "Paris"})]
    assert plain[3] == history[2]
