"""Sampling defaults from the model's generation_config.json, CORS, X-Request-Id and lists
of prompts in /v1/completions, against a real `tr-serve` on one CPU rank serving a small
random Llama whose generation_config.json recommends sampling values, driven with the
openai client and httpx. The defaults are checked against transformers' generate with the
same repetition penalty and its float64 logprobs.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from checkpoints import EOS, byte_ids, make_checkpoint, reference_logprobs
from test_server import assert_openai_error, running_server, scrape, sse_events

MODEL = "tiny-defaults"
ORIGIN = "http://ui.example"
GENERATION = {"temperature": 0.7, "top_p": 0.9, "top_k": 1, "repetition_penalty": 1.3}
NEW = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt"))
    file = path / "generation_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **GENERATION}))
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server("--model", str(ckpt), "--world-size", "1", "--served-model-name", MODEL,
                        "--dtype", "float32", "--allowed-origins", ORIGIN) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def hf(ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], repetition_penalty: float) -> list[int]:
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=None, bos_token_id=None,
                           repetition_penalty=repetition_penalty)
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), generation_config=gen)[0, len(prompt):
                                                                            ].tolist()


def same(a: list[float], b: list[float]) -> bool:
    """The same tokens: logprobs equal up to the prefix cache's rounding (a repeated prompt
    is prefilled from cached KV)."""
    return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b))


def completion_logprobs(client, prompt, **kw) -> list[float]:
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, logprobs=0,
                                  extra_body={"ignore_eos": True, **kw.pop("extra", {})}, **kw)
    return r.choices[0].logprobs.token_logprobs


# ---- generation_config.json ----------------------------------------------------------------


def test_startup_logs_the_model_defaults(server):
    line = next(x for x in server.log().splitlines() if "sampling defaults" in x)
    for key, value in GENERATION.items():
        assert f"{key}={value}" in line, line


def test_model_defaults_fill_unset_fields_and_request_values_win(client, hf):
    """With top_k 1 from the file, a request that sets nothing is greedy with the file's
    repetition penalty (transformers' generate with it); one that sets repetition_penalty
    1 is plain greedy. The prompt is one where the penalty changes the greedy tokens."""
    prompt = next(p for p in (byte_ids(n, seed) for n in (6, 9, 12) for seed in range(20))
                  if hf_greedy(hf, p, 1.3) != hf_greedy(hf, p, 1.0))
    for penalty, kw in ((1.3, {}), (1.0, {"extra": {"repetition_penalty": 1.0}})):
        got = completion_logprobs(client, prompt, **kw)
        ref = reference_logprobs(hf, prompt, hf_greedy(hf, prompt, penalty)).tolist()
        assert got == pytest.approx(ref, abs=1e-4), penalty


def test_sampled_defaults_are_the_files_values(client):
    """top_k 0 in the request turns sampling on; what is sampled then (seeded) is what
    the file's temperature, top_p and repetition penalty sample, set by hand, and not
    what the plain defaults sample."""
    prompt = byte_ids(10, 3)
    defaults = completion_logprobs(client, prompt, seed=11, extra={"top_k": 0})
    by_hand = completion_logprobs(client, prompt, seed=11, temperature=0.7, top_p=0.9,
                                  extra={"top_k": 0, "repetition_penalty": 1.3})
    plain = completion_logprobs(client, prompt, seed=11, temperature=1.0, top_p=1.0,
                                extra={"top_k": 0, "repetition_penalty": 1.0})
    assert same(defaults, by_hand)
    assert not same(defaults, plain)


def test_chat_takes_the_defaults_too(client):
    def run(**kw):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=NEW,
            logprobs=True, seed=5, extra_body={"ignore_eos": True, "top_k": 0, **kw})
        return [e.logprob for e in r.choices[0].logprobs.content]

    assert same(run(), run(temperature=0.7, top_p=0.9, repetition_penalty=1.3))
    assert not same(run(), run(temperature=1.0, top_p=1.0, repetition_penalty=1.0))


# ---- CORS -----------------------------------------------------------------------------------


def test_cors_preflight_and_simple_requests(server):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type,authorization"}
    r = httpx.options(server.base + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(server.base + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    other = "http://elsewhere.example"
    r = httpx.options(server.base + "/v1/chat/completions", headers={**pre, "Origin": other})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.base + "/v1/models", headers={"Origin": other})
    assert "access-control-allow-origin" not in r.headers


# ---- X-Request-Id -------------------------------------------------------------------------


def test_request_id_is_echoed_and_names_the_response(server, client):
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="ab", max_tokens=2, extra_headers={"X-Request-Id": "job-42.a"})
    assert raw.headers["x-request-id"] == "job-42.a"
    assert raw.parse().id == "cmpl-job-42.a"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
        extra_headers={"X-Request-Id": "job-43"})
    assert raw.headers["x-request-id"] == "job-43" and raw.parse().id == "chatcmpl-job-43"
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True,
        extra_headers={"X-Request-Id": "job-44"})
    assert {c.id for c in stream} == {"chatcmpl-job-44"}
    assert "chatcmpl-job-44" in server.log()


def test_request_id_is_made_when_not_given(server, client):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="ab", max_tokens=2)
    made = raw.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert raw.parse().id == f"cmpl-{made}"
    assert f"cmpl-{made}" in server.log()
    # also on responses the routes never see
    r = httpx.get(server.base + "/nowhere", headers={"X-Request-Id": "lost-1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "lost-1"
    assert re.fullmatch(r"[0-9a-f]{32}", httpx.get(server.base + "/health").headers[
        "x-request-id"])


def test_the_same_request_id_twice_at_once(server):
    """A client may reuse its id (a retry); both requests are served."""
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 6, "ignore_eos": True}

    async def both():
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as http:
            return await asyncio.gather(*(
                http.post("/v1/completions", json=body, headers={"X-Request-Id": "same"})
                for _ in range(2)))

    for r in asyncio.run(both()):
        assert r.status_code == 200 and r.json()["id"] == "cmpl-same"
        assert r.json()["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("value", ["x" * 300, "has space", "tab\there"])
def test_bad_request_id_is_refused(server, value):
    r = httpx.post(server.base + "/v1/completions", headers={"X-Request-Id": value},
                   json={"model": MODEL, "prompt": "a", "max_tokens": 1})
    err = assert_openai_error(r, 400)
    assert "X-Request-Id" in err["message"]


# ---- a list of prompts ----------------------------------------------------------------------


PROMPTS = [byte_ids(5, 1), byte_ids(9, 2), byte_ids(3, 3)]


def _alone(client, prompt) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_list_of_prompts_gives_choices_in_order(client):
    alone = [_alone(client, p) for p in PROMPTS]
    r = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=4, temperature=0,
                                  n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [t for t in alone for _ in range(2)]
    assert r.usage.prompt_tokens == sum(map(len, PROMPTS))
    assert r.usage.completion_tokens == 6 * 4
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    texts = ["hello", "a longer prompt"]
    r = client.completions.create(model=MODEL, prompt=texts, max_tokens=3, temperature=0,
                                  echo=True)
    assert [c.text[: len(t)] for c, t in zip(r.choices, texts)] == texts
    assert [c.text[len(t):] for c, t in zip(r.choices, texts)] == [
        client.completions.create(model=MODEL, prompt=t, max_tokens=3, temperature=0)
        .choices[0].text for t in texts]


def test_list_of_prompts_streams(server, client):
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 4, "temperature": 0, "n": 2,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts, finished = [""] * 6, [None] * 6
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
        finished[choice["index"]] = choice["finish_reason"] or finished[choice["index"]]
    assert texts == [_alone(client, p) for p in PROMPTS for _ in range(2)]
    assert finished == ["length"] * 6
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == sum(map(len, PROMPTS))
    assert usage["completion_tokens"] == 24


@pytest.mark.parametrize("prompt, where", [
    ([[1, 2], [3, 999999]], "prompt 1"),
    ([[1, 2], [5] * 400], "prompt 1"),  # longer than the 256-token context
    ([[1, 2], []], "prompt 1"),
    (["fine", "x" * 5000], "prompt 1"),
])
def test_one_bad_prompt_refuses_the_whole_request(server, prompt, where):
    before = scrape(server)["tr_engine:prompt_tokens_total"]
    r = httpx.post(server.base + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    err = assert_openai_error(r, 400)
    assert where in err["message"].lower(), err
    assert scrape(server)["tr_engine:prompt_tokens_total"] == before  # nothing ran


# ---- the generation config without a server -------------------------------------------------


def test_generation_config_modes(ckpt, tmp_path):
    from tr_engine.models.generation_defaults import sampling_defaults

    assert sampling_defaults(ckpt, "auto") == GENERATION
    assert sampling_defaults(ckpt, "vllm") == {}
    assert sampling_defaults(tmp_path, "auto") == {}  # no file: the plain defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "max_new_tokens": 64, "do_sample": True, "top_k": None}))
    assert sampling_defaults(ckpt, str(tmp_path)) == {"temperature": 0.6, "max_tokens": 64}
    with pytest.raises(ValueError, match="auto, vllm or a folder"):
        sampling_defaults(ckpt, "nowhere")
    for bad, match in (({"top_p": 1.5}, "top_p"), ({"top_k": "20"}, "top_k must be a number"),
                       ({"temperature": True}, "temperature")):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            sampling_defaults(ckpt, str(tmp_path))


def test_flags_reach_the_settings():
    from tr_engine.cli import load_settings

    config, settings = load_settings(["--generation-config", "vllm", "--allowed-origins",
                                      '["http://a.example", "http://b.example"]',
                                      "--allowed-methods", "GET,POST", "--allow-credentials"])
    assert config.generation_config == "vllm"
    assert settings.allowed_origins == ("http://a.example", "http://b.example")
    assert settings.allowed_methods == ("GET", "POST") and settings.allowed_headers == ("*",)
    assert settings.allow_credentials
    _, plain = load_settings([])
    assert plain.allowed_origins == () and load_settings([])[0].generation_config == "auto"


def test_offline_llm_takes_the_defaults(ckpt, hf):
    """LLM.generate without SamplingParams: the file's values (greedy through top_k 1, with
    its repetition penalty), as transformers' generate gives them."""
    from tr_engine import LLM, SamplingParams

    prompt = byte_ids(9, 4)
    with LLM(str(ckpt), device="cpu", dtype="float32") as llm:
        assert llm.get_default_sampling_params() == SamplingParams(**GENERATION)
        assert llm.get_default_sampling_params().max_tokens == 16
        out = llm.generate({"prompt_token_ids": prompt})[0]
    ref = hf_greedy(hf, prompt, 1.3)  # EOS does not stop it; it may stop the engine
    n = min(len(out.token_ids), NEW)
    assert out.token_ids[:n] == ref[:n]
    assert len(out.token_ids) == 16 or out.token_ids[-1] == EOS
