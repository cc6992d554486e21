"""Every request field beyond plain sampling on a live `tr-serve` (the embedded model): each
one vLLM users send either changes the result as it says, or is refused with a 400 naming
it; an unknown field changes nothing and is logged. Prompts are checked against
transformers' own chat template rendering."""

from __future__ import annotations

import httpx
import pytest
from test_server import assert_openai_error, running_server

MODEL = "smollm2-fields"
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server():
    with running_server("--served-model-name", MODEL, "--dtype", "float32",
                        "--max-model-len", "2048", "--kv-cache-tokens", "2048",
                        "--world-size", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tr_engine.models.embedded import embedded_model_path

    return AutoTokenizer.from_pretrained(str(embedded_model_path()))


def chat(client, messages=HI, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    extra = {k: kw.pop(k) for k in list(kw) if k in EXTRA}
    extra.update(kw.pop("extra_body", {}))
    return client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra,
                                          **kw)


EXTRA = {"min_tokens", "bad_words", "allowed_token_ids", "add_generation_prompt",
         "continue_final_message", "chat_template_kwargs", "stop_token_ids", "prompt_logprobs",
         "truncate_prompt_tokens", "ignore_eos", "some_unknown_field", "documents"}


def test_min_tokens(client):
    free = chat(client, max_tokens=64)
    assert free.choices[0].finish_reason == "stop"  # it ends on its own first ...
    n = free.usage.completion_tokens
    held = chat(client, max_tokens=64, min_tokens=n + 5)
    assert held.usage.completion_tokens >= n + 5  # ... but not before min_tokens
    assert held.choices[0].message.content.startswith(free.choices[0].message.content)


def test_bad_words(client, tokenizer):
    base = chat(client, max_tokens=8).choices[0].message.content
    word = base.split()[0].strip(",.!")
    out = chat(client, max_tokens=8, bad_words=[word]).choices[0].message.content
    assert out != base
    ids = tokenizer.encode(out, add_special_tokens=False)
    for variant in (word, " " + word):
        bad = tokenizer.encode(variant, add_special_tokens=False)
        assert not any(ids[i:i + len(bad)] == bad for i in range(len(ids))), (out, word)


def test_allowed_token_ids(client, tokenizer):
    allowed = tokenizer.encode(" yes no maybe", add_special_tokens=False)
    r = chat(client, max_tokens=5, allowed_token_ids=allowed, ignore_eos=True)
    got = tokenizer.encode(r.choices[0].message.content, add_special_tokens=False)
    assert r.usage.completion_tokens == 5 and set(got) <= set(allowed)


def test_stop_token_ids_in_chat(client, tokenizer):
    base = chat(client, max_tokens=12)
    ids = tokenizer.encode(base.choices[0].message.content, add_special_tokens=False)
    stop = ids[2]
    r = chat(client, max_tokens=12, stop_token_ids=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == stop
    assert r.usage.completion_tokens == ids.index(stop) + 1


def test_template_options(client, tokenizer):
    def reference(messages, **kw):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 **kw)["input_ids"])

    r = chat(client, max_tokens=1)
    assert r.usage.prompt_tokens == reference(HI, add_generation_prompt=True)
    r = chat(client, max_tokens=1, add_generation_prompt=False)
    assert r.usage.prompt_tokens == reference(HI, add_generation_prompt=False)
    prefill = HI + [{"role": "assistant", "content": "Hello! My name is"}]
    r = chat(client, prefill, max_tokens=4, add_generation_prompt=False,
             continue_final_message=True)
    assert r.usage.prompt_tokens == reference(prefill, continue_final_message=True)
    # the model goes on with the assistant's sentence rather than opening a new turn
    want = reference(prefill, continue_final_message=True)
    assert want < reference(prefill, add_generation_prompt=True)
    r = chat(client, max_tokens=1, truncate_prompt_tokens=5)
    assert r.usage.prompt_tokens == 5


def test_chat_template_kwargs_reach_the_template(server, client):
    # the embedded template reads no variables, so a kwarg changes nothing; one that would
    # clobber the renderer's own arguments is refused
    a = chat(client, max_tokens=6).choices[0].message.content
    b = chat(client, max_tokens=6, chat_template_kwargs={"enable_thinking": False})
    assert b.choices[0].message.content == a
    r = httpx.post(server.base + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": HI, "chat_template_kwargs": {"tokenize": False}})
    assert assert_openai_error(r, 400)["param"] == "chat_template_kwargs"


def test_prompt_logprobs(server, client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1,
                                  temperature=0, extra_body={"prompt_logprobs": 2})
    got = r.model_extra.get("prompt_logprobs") or r.choices[0].model_extra["prompt_logprobs"]
    n = r.usage.prompt_tokens
    assert len(got) == n and got[0] is None
    for entry in got[1:]:
        assert 2 <= len(entry) <= 3
        ranks = sorted(v["rank"] for v in entry.values() if v["rank"] is not None)
        assert ranks == [1, 2]
        assert all(v["logprob"] <= 0 for v in entry.values())
    # the same numbers as echo's logprobs of the prompt
    e = client.completions.create(model=MODEL, prompt="The capital of France is",
                                  max_tokens=1, temperature=0, echo=True, logprobs=2)
    echoed = e.choices[0].logprobs.token_logprobs[1:n]
    prompt_ids = httpx.post(server.base + "/tokenize", json={
        "prompt": "The capital of France is"}).json()["tokens"]
    chosen = [got[i + 1][str(t)]["logprob"] for i, t in enumerate(prompt_ids[1:])]
    assert chosen == pytest.approx(echoed, abs=1e-4)


def test_unknown_field_changes_nothing_and_is_logged(server, client):
    a = chat(client, max_tokens=6).choices[0].message.content
    b = chat(client, max_tokens=6, some_unknown_field={"x": 1}).choices[0].message.content
    assert a == b
    assert "some_unknown_field" in server.log()


REFUSED = [
    ({"best_of": 2}, "best_of"), ({"use_beam_search": True}, "use_beam_search"),
    ({"length_penalty": 0.5}, "length_penalty"), ({"priority": 1}, "priority"),
    ({"logits_processors": ["x.y"]}, "logits_processors"), ({"cache_salt": "s"}, "cache_salt"),
    ({"kv_transfer_params": {}}, "kv_transfer_params"), ({"vllm_xargs": {"a": 1}}, "vllm_xargs"),
    ({"chat_template": "{{ x }}"}, "chat_template"), ({"include_reasoning": False},
                                                      "include_reasoning"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"return_tokens_as_token_ids": True}, "return_tokens_as_token_ids"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"mm_processor_kwargs": {}}, "mm_processor_kwargs"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"allowed_token_ids": [10 ** 9]}, "allowed_token_ids"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
]


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_refused_fields(server, body, param):
    r = httpx.post(server.base + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": HI, "max_tokens": 4, **body})
    assert assert_openai_error(r, 400)["param"] == param


def test_refused_in_completions(server):
    for body, param in [({"prompt_embeds": "AAAA"}, "prompt_embeds"), ({"best_of": 3}, "best_of"),
                        ({"echo": True, "logprobs": 1, "prompt_logprobs": 2},
                         "prompt_logprobs")]:
        r = httpx.post(server.base + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **body})
        assert assert_openai_error(r, 400)["param"] == param


def test_request_id_names_the_response(client):
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(2) as pool:  # the same id twice at once: both are served
        got = list(pool.map(lambda _: chat(client, max_tokens=4, extra_body={
            "request_id": "mine-1"}), range(2)))
    assert [r.id for r in got] == ["chatcmpl-mine-1"] * 2
    assert got[0].choices[0].message.content == got[1].choices[0].message.content


def test_chat_prompt_logprobs(server, client):
    r = chat(client, max_tokens=1, prompt_logprobs=1)
    got = r.model_extra["prompt_logprobs"]
    assert len(got) == r.usage.prompt_tokens and got[0] is None
    assert all(any(v["rank"] == 1 for v in entry.values()) for entry in got[1:])
    body = {"model": MODEL, "messages": HI, "stream": True, "prompt_logprobs": 1}
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=30)
    assert assert_openai_error(r, 400)["param"] == "prompt_logprobs"
