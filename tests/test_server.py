"""The OpenAI-compatible server end to end: a real `tr-serve --device cpu --world-size 2`
process serving the embedded SmolLM2 model, driven with the official openai client and httpx.

One server for the whole module (started with an API key, so every request here also checks
that a right key is accepted); `running_server` is shared with test_server_errors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest

API_KEY = "test-key-123"
MODEL = "smollm2-test"
START_TIMEOUT_S = float(os.environ.get("TR_TEST_SERVER_START_S", "300"))


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    base: str  # http://127.0.0.1:PORT
    api_key: str | None
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.api_key or "none",
                             max_retries=0, timeout=120, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=self.api_key or "none",
                                  max_retries=0, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (zombies count as gone)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "tr-serve")
    if os.path.exists(script):
        return [script]
    found = shutil.which("tr-serve")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from tr_engine.cli import serve_main; "
            "sys.exit(serve_main())"]


@contextlib.contextmanager
def running_server(*flags: str, api_key: str | None = None):
    """Start tr-serve in its own process group, wait for /health, stop it with SIGTERM at the
    end and check that it exits 0 and leaves no process behind."""
    port = _free_port()
    log_fd, log_path = tempfile.mkstemp(prefix="tr-serve-", suffix=".log")
    cmd = [*_command(), "--device", "cpu", "--world-size", "2", "--host", "127.0.0.1",
           "--port", str(port), *flags]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, stdout=log_fd, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    os.close(log_fd)
    server = Server(proc, f"http://127.0.0.1:{port}", api_key, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tr-serve exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                if httpx.get(server.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tr-serve not healthy after {START_TIMEOUT_S:.0f} s:\n"
                            f"{server.log()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(server)


def _stop(server: Server) -> None:
    proc, pgid = server.proc, server.proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        code = None
    deadline = time.monotonic() + 10
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group_members(pgid)
    if code is None or left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
    log = server.log()
    os.unlink(server.log_path)
    assert code is not None, f"tr-serve did not stop within 15 s of SIGTERM:\n{log[-4000:]}"
    assert not left, f"processes left behind after shutdown: {left}\n{log[-4000:]}"
    assert code == 0, f"tr-serve exited with {code}:\n{log[-4000:]}"


# ---- helpers for the tests ------------------------------------------------------------------


def scrape(server: Server) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = httpx.get(server.base + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def kv_used(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("tr_engine:kv_cache_used_tokens{")}


def wait_idle(server: Server, timeout: float) -> dict[str, float]:
    """Scrape until no request runs or waits and every rank's KV usage is zero."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(server)
        used = kv_used(m)
        idle = (m["tr_engine:num_requests_running"] == 0
                and m["tr_engine:num_requests_waiting"] == 0
                and used and all(v == 0 for v in used.values()))
        if idle:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {timeout} s: running "
                                 f"{m['tr_engine:num_requests_running']}, KV {used}")
        time.sleep(0.2)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: "):])
        else:
            assert line == "", f"unexpected line in the stream: {line!r}"
    return events


# ---- the module's server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    # float32: greedy outputs must not depend on how requests are batched
    with running_server("--served-model-name", MODEL, "--dtype", "float32",
                        "--max-model-len", "4096",
                        "--kv-cache-tokens", "1024", "--max-num-seqs", "16",
                        api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _tokenize(server: Server, **body) -> list[int]:
    r = httpx.post(server.base + "/tokenize", json=body, headers=server.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def test_health_version_models(server, client):
    assert httpx.get(server.base + "/health").status_code == 200
    assert httpx.get(server.base + "/version").json()["version"]
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_answers_two_plus_two(server, client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "4" in choice.message.content, choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = _tokenize(server, messages=QUESTION)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.model == MODEL


def test_chat_stream_matches_non_streaming(client):
    kw = dict(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == full.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_string_and_token_prompt_agree(server, client):
    prompt = "The capital of France is"
    ids = _tokenize(server, prompt=prompt)
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text and by_text.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert by_text.usage.completion_tokens == by_ids.usage.completion_tokens


def test_completion_sse_stream_ends_with_done(server, client):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.base + "/v1/completions", json=body,
                      headers=server.headers(), timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                     temperature=0)
    assert text == full.choices[0].text
    keys = {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert {k: usage[k] for k in keys} == full.usage.model_dump(include=keys)
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
    assert chunks[-2]["choices"][0]["finish_reason"] == full.choices[0].finish_reason


def test_ignore_eos_runs_to_max_tokens(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                       max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_stop_string_ends_the_output(client):
    kw = dict(model=MODEL, prompt="The history of Rome", max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[len(words) // 2]
    r = client.completions.create(**kw, stop=[stop]).choices[0]
    assert r.finish_reason == "stop"
    assert r.text == full[:full.index(stop)]


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and 1 <= len(entry.top_logprobs) <= 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob >= max(t.logprob for t in entry.top_logprobs) - 1e-4
    r = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=6,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) \
        == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0,
              top_p=0.95, seed=1234)
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first


def test_sixteen_concurrent_streams_match_serial(server, client):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]

    async def stream_all() -> list[str]:
        async with server.async_client() as aclient:
            async def one(prompt: str) -> str:
                parts = []
                stream = await aclient.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
                async for chunk in stream:
                    parts.append(chunk.choices[0].text)
                return "".join(parts)
            return await asyncio.gather(*(one(p) for p in prompts))

    together = asyncio.run(stream_all())
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                       temperature=0).choices[0].text for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really differ


def _busy(server: Server) -> dict[str, float]:
    """Wait until a request runs and holds KV; return that scrape."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = scrape(server)
        if m["tr_engine:num_requests_running"] >= 1 and sum(kv_used(m).values()) > 0:
            return m
        time.sleep(0.1)
    raise AssertionError("the request never showed as running")


def test_stream_disconnect_frees_kv(server):
    # Long enough (ignore_eos) that it would run for minutes on two CPU cores.
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", server.base + "/v1/completions", json=body, headers=server.headers()) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6))]
        assert any(line.startswith("data: {") for line in got)
        busy = _busy(server)
    # the connection is closed now
    idle = wait_idle(server, timeout=20)
    assert idle["tr_engine:generation_tokens_total"] - busy["tr_engine:generation_tokens_total"] \
        < 1000


def test_non_streaming_disconnect_frees_kv(server):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True}
    before = scrape(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/completions", json=body, headers=server.headers(),
                   timeout=httpx.Timeout(10, read=3))
    idle = wait_idle(server, timeout=20)
    assert idle["tr_engine:generation_tokens_total"] \
        - before["tr_engine:generation_tokens_total"] < 1000


def test_metrics_follow_requests(server, client):
    before = scrape(server)
    r = client.completions.create(model=MODEL, prompt="Counting: one, two,", max_tokens=6,
                                  temperature=0, extra_body={"ignore_eos": True})
    after = scrape(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("tr_engine:prompt_tokens_total") >= r.usage.prompt_tokens
    assert delta("tr_engine:generation_tokens_total") >= r.usage.completion_tokens == 6
    assert delta("tr_engine:time_to_first_token_seconds_count") == 1
    assert delta("tr_engine:e2e_request_latency_seconds_count") == 1
    assert delta("tr_engine:inter_token_latency_seconds_count") >= 1
    assert delta('tr_engine:request_success_total{finished_reason="length"}') == 1
    assert set(kv_used(after)) == {'tr_engine:kv_cache_used_tokens{rank="0"}',
                                   'tr_engine:kv_cache_used_tokens{rank="1"}'}
    assert after["tr_engine:kv_cache_capacity_tokens"] == 1024
    assert after["tr_engine:prefill_tokens_per_second"] > 0


def test_second_chat_turn_hits_the_prefix_cache(server, client):
    """Turn 2 of a chat over a long system prompt reuses turn 1's KV: usage reports it in
    chat and completions, streamed and not, /metrics counts it, and /reset_prefix_cache
    empties the cache."""
    system = {"role": "system", "content": "You are a librarian. " + "The catalogue lists "
              "books by author, title and year. " * 6}
    turn1 = [system, {"role": "user", "content": "Which year?"}]
    first_prompt = _tokenize(server, messages=turn1)
    one = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=3,
                                         temperature=0)
    before = scrape(server)
    turn2 = [*turn1, {"role": "assistant", "content": one.choices[0].message.content},
             {"role": "user", "content": "And the author?"}]
    two = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=3,
                                         temperature=0)
    whole = len(first_prompt) // 16 * 16  # whole blocks of turn 1's prompt
    assert two.usage.prompt_tokens_details.cached_tokens >= whole >= 64
    after = scrape(server)
    hits = after["tr_engine:prefix_cache_hits_total"] - before["tr_engine:prefix_cache_hits_total"]
    assert hits == two.usage.prompt_tokens_details.cached_tokens
    assert after["tr_engine:prefix_cache_queries_total"] \
        - before["tr_engine:prefix_cache_queries_total"] == two.usage.prompt_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=turn2, max_tokens=3, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= whole
    ids = _tokenize(server, messages=turn2)
    same = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0)
    assert same.usage.prompt_tokens_details.cached_tokens >= whole
    r = httpx.post(server.base + "/reset_prefix_cache", headers=server.headers(), timeout=30)
    assert r.status_code == 200
    assert httpx.post(server.base + "/reset_prefix_cache", timeout=30).status_code == 401
    again = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].text == same.choices[0].text
    wait_idle(server, timeout=20)


def test_tokenize_detokenize_round_trip(server):
    text = "Sharded KV caches are fun."
    ids = _tokenize(server, prompt=text, add_special_tokens=False)
    r = httpx.post(server.base + "/detokenize", json={"tokens": ids}, headers=server.headers())
    assert r.status_code == 200 and r.json() == {"prompt": text}
    r = httpx.post(server.base + "/tokenize", json={"prompt": text}, headers=server.headers())
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 4096


def test_prompt_over_kv_capacity_names_both_numbers(server):
    # This server's KV cache (1024 tokens per rank, 2048 for both) ends before its context.
    ids = (_tokenize(server, prompt="apple") * 2100)[:2100]
    r = httpx.post(server.base + "/v1/completions", headers=server.headers(), timeout=30,
                   json={"model": MODEL, "prompt": ids, "max_tokens": 1})
    err = assert_openai_error(r, 400)
    assert err["code"] == "context_length_exceeded"
    numbers = {int(x) for x in re.findall(r"\d+", err["message"])}
    assert 2100 in numbers and numbers & {1024, 2048}, err["message"]


PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1]}),
]


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_api_key_required(server, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.request(method, server.base + path, json=body, headers=headers, timeout=30)
        err = assert_openai_error(r, 401)
        assert err["code"] == "invalid_api_key"
    r = httpx.request(method, server.base + path, json=body, headers=server.headers(),
                      timeout=60)
    assert r.status_code == 200, r.text


def test_open_routes_need_no_key(server):
    for path in ("/health", "/metrics", "/version", "/openapi.json"):
        assert httpx.get(server.base + path).status_code == 200, path
    paths = httpx.get(server.base + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(paths)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="wrong",
                      max_retries=0).models.list()


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_start_up_logged_phases(server):
    log = server.log()
    assert re.search(r"serving \S+ at http://127\.0\.0\.1:\d+/v1", log), log[-2000:]
    assert "Traceback" not in log


# ---- n, logit_bias, echo ----------------------------------------------------------------------


def test_n_choices_are_seeded_requests(client):
    kw = dict(model=MODEL, messages=QUESTION, max_tokens=6, temperature=1.0)
    r = client.chat.completions.create(**kw, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(**kw, seed=5 + i) for i in range(3)]
    texts = [one.choices[0].message.content for one in singles]
    assert [c.message.content for c in r.choices] == texts
    assert len(set(texts)) > 1  # the seeds really differ
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(one.usage.completion_tokens for one in singles)


def test_n_streamed_matches_not_streamed(client):
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=6, temperature=1.0,
              seed=11, n=2)
    full = client.completions.create(**kw)
    texts = {0: "", 1: ""}
    usage = None
    for chunk in client.completions.create(**kw, stream=True,
                                           stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [c.text for c in full.choices]
    assert usage == full.usage


def test_logit_bias_forces_and_bans_tokens(server, client):
    token = _tokenize(server, prompt=" banana", add_special_tokens=False)[-1]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                  logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == _detokenize(server, [token] * 4)
    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0)
    first = _tokenize(server, prompt=plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text


def _detokenize(server: Server, ids: list[int]) -> str:
    r = httpx.post(server.base + "/detokenize", json={"tokens": ids}, headers=server.headers())
    return r.json()["prompt"]


def test_echo_prepends_the_prompt(server, client):
    prompt = "The capital of France is"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw, echo=True).choices[0].text == prompt + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        **kw, echo=True, stream=True))
    assert streamed == prompt + plain
    messages = [*QUESTION, {"role": "assistant", "content": "Two plus two"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                       temperature=0, extra_body={"echo": True})
    assert r.choices[0].message.content.startswith("Two plus two")


def test_echo_with_logprobs_scores_the_prompt(server, client):
    prompt = "One, two, three,"
    ids = _tokenize(server, prompt=prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    n = len(ids) + r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == r.choices[0].text and r.choices[0].text.startswith(prompt)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    # a prompt token's logprob is the model's: "two" after "One," is likely, not certain
    assert -20 < lp.token_logprobs[len(ids) - 1] < 0
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


def test_n_streams_disconnect_frees_kv(server):
    # 600 tokens each: the three slabs fit in the KV cache together (1500 would queue two),
    # and decoding them takes seconds, long after the hang-up below
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 600, "n": 3,
            "temperature": 1.0, "ignore_eos": True, "stream": True}
    before = scrape(server)
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", server.base + "/v1/completions", json=body, headers=server.headers()) as r:
        assert r.status_code == 200
        seen = set()
        for line, _ in zip(r.iter_lines(), range(400)):
            if line.startswith("data: {"):
                seen.add(json.loads(line[6:])["choices"][0]["index"])
            if len(seen) == 3:
                break
        assert seen == {0, 1, 2}
        # Under a loaded machine the three may already have ended when the last of them
        # shows in the stream (seen in the full suite on two cores, not alone); the abort
        # is checked when they were still running, the freed KV always.
        running = scrape(server)["tr_engine:num_requests_running"]
    idle = wait_idle(server, timeout=20)
    generated = idle["tr_engine:generation_tokens_total"] \
        - before["tr_engine:generation_tokens_total"]
    if running == 3:
        assert generated < 3 * 600  # all three were aborted, not run to the end
