"""Structured outputs and tool calls on a live `tr-serve` (the embedded SmolLM2 model, two CPU
ranks) through the official openai client: JSON schemas, JSON objects, choices, regular
expressions and grammars always give what they ask for; named and required tool calls are
valid calls of the right function, streamed or not; tool results in the history are taken;
a schema the grammar library cannot compile is a 400 before any work."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from test_server import assert_openai_error, running_server, wait_idle

MODEL = "smollm2-structured"
SHORT = 48  # enough tokens for the compact JSON below


@pytest.fixture(scope="module")
def server():
    with running_server("--served-model-name", MODEL, "--dtype", "float32",
                        "--max-model-len", "2048",
                        "--kv-cache-tokens", "4096", "--max-num-seqs", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def fits(value, schema: dict) -> bool:
    """`value` against the subset of JSON schema these tests use (an independent check)."""
    t = schema.get("type")
    if "enum" in schema and value not in schema["enum"]:
        return False
    if t == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and set(schema.get("required", ())) <= set(value)
                and set(value) <= set(props)
                and all(fits(v, props[k]) for k, v in value.items()))
    if t == "array":
        return (isinstance(value, list) and len(value) >= schema.get("minItems", 0)
                and len(value) <= schema.get("maxItems", len(value))
                and all(fits(v, schema["items"]) for v in value))
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if t == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if t == "boolean":
        return isinstance(value, bool)
    return t is None


SCHEMAS = [
    {"type": "object", "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["color", "count"]},
    {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "adult": {"type": "boolean"}}, "required": ["name", "adult"]}},
     "required": ["person"]},
    {"type": "object", "properties": {
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                   "minItems": 1, "maxItems": 3}},
     "required": ["scores"]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_output_fits(client, schema):
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Describe an object as JSON."), max_tokens=SHORT,
        temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": "thing", "schema": schema}})
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    assert fits(json.loads(c.message.content), schema), c.message.content


def test_json_schema_sampled_and_in_completions(client):
    """Sampled at temperature 1 with several seeds, and through completions'
    structured_outputs: every output fits."""
    schema = SCHEMAS[0]
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ask("Pick a color."), max_tokens=SHORT, temperature=1.0,
            seed=seed, extra_body={"structured_outputs": {"json": schema}})
        assert fits(json.loads(r.choices[0].message.content), schema)
    r = client.completions.create(model=MODEL, prompt="A color and a count:", max_tokens=SHORT,
                                  temperature=0, extra_body={"guided_json": schema})
    assert r.choices[0].finish_reason == "stop"
    assert fits(json.loads(r.choices[0].text), schema), r.choices[0].text


def test_json_object(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Give me a JSON object about cats."), max_tokens=64,
        temperature=0, response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert c.message.content.lstrip().startswith("{")


def test_choice_regex_grammar(client):
    choices = ["yes", "no", 'maybe "so"']
    for prompt in ("Is the sky blue?", "Is fire cold?", "Answer me."):
        r = client.chat.completions.create(
            model=MODEL, messages=ask(prompt), max_tokens=8, temperature=0,
            extra_body={"structured_outputs": {"choice": choices}})
        assert r.choices[0].message.content in choices
        assert r.choices[0].finish_reason == "stop"
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{3}"
    r = client.completions.create(model=MODEL, prompt="A product code:", max_tokens=16,
                                  temperature=0, extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Count."), max_tokens=16, temperature=0,
        extra_body={"structured_outputs": {"grammar": 'root ::= ("one" | "two") " " [0-9]'}})
    assert re.fullmatch(r"(one|two) [0-9]", r.choices[0].message.content)


def test_stream_of_a_schema_is_the_same_json(client):
    kw = dict(model=MODEL, messages=ask("Describe an object."), max_tokens=SHORT, temperature=0,
              response_format={"type": "json_schema",
                               "json_schema": {"name": "t", "schema": SCHEMAS[2]}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    text = "".join(c.choices[0].delta.content or "" for c in
                   client.chat.completions.create(**kw, stream=True) if c.choices)
    assert text == whole and fits(json.loads(text), SCHEMAS[2])


def test_bad_schema_is_refused_before_work(server, client):
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}}},
         "strnig"),
        ({"structured_outputs": {"regex": "[a-"}}, "regular expression"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "grammar"),
        ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "exactly one"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "one structured output"),
        ({"structured_outputs": {"structural_tag": {"x": 1}}}, "Structural tags"),
        ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "xgrammar"),
    ]
    for body, words in bad:
        r = httpx.post(server.base + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": ask("hi"), "max_tokens": 4, **body})
        err = assert_openai_error(r, 400)
        assert words in err["message"], (body, err)
    wait_idle(server, 30)  # nothing was queued


def test_other_requests_unharmed(client):
    """A plain greedy request gives the same text next to structured ones as alone."""
    import concurrent.futures as cf

    plain = dict(model=MODEL, messages=ask("Name three fruits."), max_tokens=16, temperature=0)
    alone = client.chat.completions.create(**plain).choices[0].message.content
    with cf.ThreadPoolExecutor(4) as pool:
        structured = [pool.submit(client.chat.completions.create, model=MODEL,
                                  messages=ask("JSON please"), max_tokens=SHORT, temperature=0,
                                  extra_body={"structured_outputs": {"json": SCHEMAS[0]}})
                      for _ in range(3)]
        together = pool.submit(client.chat.completions.create, **plain)
        assert together.result().choices[0].message.content == alone
        for f in structured:
            assert fits(json.loads(f.result().choices[0].message.content), SCHEMAS[0])


# ---- tools ------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                              "enum": ["UTC", "CET"]}},
                   "required": ["zone"]}}}
QUESTION = ask("What is the weather in Paris?")


def _check_call(call, name: str, tools=(WEATHER, TIME)):
    assert call.type == "function" and call.id
    assert call.function.name == name
    schema = next(t for t in tools if t["function"]["name"] == name)["function"]["parameters"]
    assert fits(json.loads(call.function.arguments), schema), call.function.arguments


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_call(client, stream):
    kw = dict(model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], max_tokens=SHORT,
              temperature=0, tool_choice={"type": "function", "function": {"name": "get_time"}})
    if not stream:
        c = client.chat.completions.create(**kw).choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(c.message.tool_calls) == 1
        _check_call(c.message.tool_calls[0], "get_time")
        return
    chunks = [ch for ch in client.chat.completions.create(**kw, stream=True) if ch.choices]
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or ()]
    assert deltas[0].id and deltas[0].function.name == "get_time"
    args = "".join(d.function.arguments or "" for d in deltas)
    assert all(d.index == 0 for d in deltas)
    assert fits(json.loads(args), TIME["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call(client, stream):
    kw = dict(model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], max_tokens=96,
              temperature=0, tool_choice="required", parallel_tool_calls=False)
    if not stream:
        c = client.chat.completions.create(**kw).choices[0]
        assert c.finish_reason == "tool_calls", c
        calls = c.message.tool_calls
    else:
        chunks = [ch for ch in client.chat.completions.create(**kw, stream=True) if ch.choices]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        calls = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or ()]
    assert len(calls) == 1  # parallel_tool_calls false: at most one
    _check_call(calls[0], calls[0].function.name)


def test_tool_result_in_history(client):
    first = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER], max_tokens=SHORT, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],
                                       tool_choice="none", max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.message.content and not c.message.tool_calls
    # the call and its result are in the prompt: more tokens than the question alone
    alone = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER],
                                           tool_choice="none", max_tokens=1)
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 10


def test_tool_choice_refusals(server):
    def post(**body):
        return httpx.post(server.base + "/v1/chat/completions", timeout=30,
                          json={"model": MODEL, "messages": QUESTION, "max_tokens": 4, **body})

    err = assert_openai_error(post(tools=[WEATHER]), 400)  # "auto" without a parser
    assert "--enable-auto-tool-choice" in err["message"]
    err = assert_openai_error(post(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "nope"}}), 400)
    assert "nope" in err["message"]
    assert_openai_error(post(tool_choice="required"), 400)
    err = assert_openai_error(post(functions=[WEATHER["function"]]), 400)
    assert err["param"] == "functions"
    bad_history = QUESTION + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]
    assert_openai_error(post(messages=bad_history), 400)
    assert_openai_error(post(messages=[{"role": "user"}]), 400)  # content left out


def test_openai_client_error_type(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4,
                                       extra_body={"structured_outputs": {"regex": "(("}})
