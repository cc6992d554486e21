"""tool_choice "auto" with each --tool-call-parser on a small random checkpoint of its family,
whose chat template renders tools (written here in each family's format): the prompt holds
the tools and earlier calls exactly as transformers renders them, and a reply in the family's
call format (forced with a regular expression, since a random model writes no calls of its
own) comes back as OpenAI tool_calls, streamed and not."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from checkpoints import make_checkpoint
from test_server import running_server

HERMES = """{%- if tools %}<|im_start|>system
You may call functions:
<tools>
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""

LLAMA3 = """{%- if tools %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
Answer a call as {"name": <name>, "parameters": <arguments>}.
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|eot_id|>{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for c in m.tool_calls %}{% set f = c.function %}
{{- {"name": f.name, "parameters": f.arguments} | tojson }}{% endfor %}<|eot_id|>
{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

MISTRAL = """{%- for m in messages %}
{%- if m.role == 'user' %}{% if loop.last and tools %}[AVAILABLE_TOOLS]
{{- tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]
{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS]
{{- m.tool_calls | map(attribute='function') | list | tojson }}</s>
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]
{%- else %}{{ m.content }}</s>{%- endif %}{%- endfor %}"""

CITY = r'"city": "[a-z]{1,6}"'
# family -> (checkpoint family, parser, template, a reply in its format, its content)
FAMILIES = {
    "hermes": ("qwen3", "hermes", HERMES,
               r'Sure\. <tool_call>\n\{"name": "get_weather", "arguments": \{' + CITY
               + r'\}\}\n</tool_call>', "Sure."),
    "llama3_json": ("llama3.1", "llama3_json", LLAMA3,
                    r'\{"name": "get_weather", "parameters": \{' + CITY + r'\}\}', None),
    "mistral": ("mistral", "mistral", MISTRAL,
                r'\[TOOL_CALLS\]\[\{"name": "get_weather", "arguments": \{' + CITY
                + r'\}\}\]', None),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def rendered(tok, messages, **kw) -> list[int]:
    """transformers' rendering of the conversation, tokenized."""
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    from transformers import AutoTokenizer

    family, parser, template, reply, content = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    path = root / "model"
    shutil.copytree(make_checkpoint(family, root / "base"), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 1024  # room for the tools (a byte a token)
    (path / "config.json").write_text(json.dumps(config))
    with running_server("--model", str(path), "--world-size", "1", "--dtype", "float32",
                        "--max-model-len", "1024", "--enable-auto-tool-choice",
                        "--tool-call-parser", parser) as server:
        yield server, AutoTokenizer.from_pretrained(path), reply, content


def _ask(client, messages=QUESTION, reply=None, **kw):
    extra = {"structured_outputs": {"regex": reply}} if reply else {}
    extra.update(kw.pop("extra_body", {}))
    return client.chat.completions.create(model=kw.pop("model"), messages=messages,
                                          tools=[WEATHER], max_tokens=kw.pop("max_tokens", 120),
                                          temperature=0, extra_body=extra, **kw)


def test_auto_tool_choice(family):
    server, tok, reply, content = family
    client = server.client()
    model = client.models.list().data[0].id
    r = _ask(client, reply=reply, model=model)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content == content
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and re.fullmatch("[a-z]{1,6}", args["city"])
    # the tools went through the model's template
    want = rendered(tok, QUESTION, tools=[WEATHER], add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(want)

    chunks = [ch for ch in _ask(client, reply=reply, model=model, stream=True) if ch.choices]
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or ()]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        ("get_weather", args)]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text.strip() == (content or "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # no call in the reply: plain content, finish "stop" or "length"
    r = _ask(client, reply="[a-z ]{3,20}", model=model)
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content


def test_history_with_calls_renders_through_template(family):
    server, tok, _, _ = family
    client = server.client()
    model = client.models.list().data[0].id
    call = {"id": "abcdefghi", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}
    history = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "abcdefghi", "content": "18 C"}]
    r = _ask(client, history, model=model, max_tokens=2, tool_choice="none")
    as_template = QUESTION + [
        {"role": "assistant", "content": "", "tool_calls": [
            {**call, "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "18 C"}]
    want = rendered(tok, as_template, tools=[WEATHER], add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(want)
    if "enable_thinking" in tok.chat_template:
        off = _ask(client, model=model, max_tokens=1, tool_choice="none",
                   extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        want = rendered(tok, QUESTION, tools=[WEATHER], add_generation_prompt=True,
                        enable_thinking=False)
        assert off.usage.prompt_tokens == len(want)
        on = _ask(client, model=model, max_tokens=1, tool_choice="none")
        assert off.usage.prompt_tokens == on.usage.prompt_tokens + len("<think>\n\n</think>\n\n")
