"""A step whose forward raises fails that step's requests only; the engine goes on.

The fault is real: TR_ENGINE_INJECT_FAULT names a token id, and rank 0 raises where it
computes the logits of a step that feeds it (where an out-of-memory on a long prompt's
logprobs would raise, past the step's last collective, so the other rank stays in step).
Token 300 is no byte token of the test checkpoint (49000 a rare one of the embedded
model's), so only the prompts that carry it fail. Two gloo ranks: an LLM in this process,
then a real tr-serve over HTTP with the official client.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from checkpoints import byte_ids as ids
from checkpoints import greedy_reference, make_checkpoint

from tr_engine import LLM, SamplingParams
from tr_engine.errors import RequestFailed

FAULT = 300
SERVER_FAULT = 49000
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("qwen3", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def fault_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TR_ENGINE_INJECT_FAULT", str(FAULT))
        yield


@pytest.fixture(scope="module")
def llm(ckpt, fault_env):
    with LLM(ckpt, device="cpu", world_size=2, dtype="float32", block_size=8,
             prefill_chunk=32, kv_cache_tokens=128, max_model_len=128, max_num_seqs=2,
             shard_min_tokens=0) as engine:
        yield engine


def settled(llm) -> None:
    s = llm.engine.scheduler
    assert s.kv_used() == [0, 0] and s.blocks.reserved() == [0, 0]
    assert len(s.free_rows) == s.max_num_seqs and not s.has_work()


def test_a_failed_step_fails_its_requests_and_the_next_ones_succeed(llm, ckpt):
    hf = greedy_reference(ckpt)
    bad = ids(20, 1) + [FAULT] + ids(5, 2)
    out = llm.generate({"prompt_token_ids": bad}, GREEDY)[0]
    assert out.finish_reason == "error" and isinstance(out.error, RequestFailed)
    assert out.token_ids == [] and "RuntimeError" in str(out.error)
    settled(llm)
    good = ids(30, 3)
    assert llm.generate({"prompt_token_ids": good}, GREEDY)[0].token_ids == \
        hf(tuple(good), 6)
    assert llm.engine.failed_steps_total == 1


def test_only_the_failed_steps_requests_end(llm, ckpt):
    """Two running (the faulty prompt's prefill rides with the other's decode, so both
    fail) and one waiting for a row: the waiting one, not in that step, finishes exactly."""
    hf = greedy_reference(ckpt)
    engine = llm.engine
    first, waiting = ids(12, 4), ids(14, 5)
    engine.add_request("first", first, GREEDY)
    engine.step()  # its prefill: now it decodes
    engine.add_request("bad", [FAULT] + ids(9, 6), GREEDY)
    engine.add_request("waiting", waiting, GREEDY)  # max_num_seqs 2: it waits
    final = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert final["bad"].finish_reason == "error" and final["first"].finish_reason == "error"
    assert len(final["first"].token_ids) == 1  # the token before the failed step
    assert final["waiting"].token_ids == hf(tuple(waiting), 6)
    settled(llm)


@pytest.fixture(scope="module")
def server():
    from test_server import MODEL, running_server

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TR_ENGINE_INJECT_FAULT", str(SERVER_FAULT))  # tr-serve inherits it
        with running_server("--max-model-len", "128", "--kv-cache-tokens", "128",
                            "--served-model-name", MODEL, "--kv-offloading-size", "0.01") as s:
            yield s


def test_a_live_server_fails_the_request_and_stays_healthy(server):
    from test_server import MODEL, assert_openai_error, sse_events, wait_idle

    body = {"model": MODEL, "prompt": [1, 2, SERVER_FAULT, 3], "max_tokens": 3}
    r = httpx.post(server.base + "/v1/completions", json=body, timeout=120)
    err = assert_openai_error(r, 500)
    assert "could not serve this request" in err["message"]
    with httpx.stream("POST", server.base + "/v1/completions", json={**body, "stream": True},
                      timeout=120) as r:
        events = sse_events(r)
    assert "could not serve this request" in events[-2] and events[-1] == "[DONE]"
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none")
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3,
                                   temperature=0)
    assert ok.choices[0].finish_reason == "length" and len(ok.choices[0].text) > 0
    metrics = wait_idle(server, 60)
    assert metrics["tr_engine:failed_steps_total"] == 2
    assert metrics["tr_engine:engine_healthy"] == 1
    # the host tier's numbers are there (this server has one): 0.01 GiB over 2 ranks
    assert metrics["tr_engine:kv_host_capacity_tokens"] > 0
    assert metrics['tr_engine:kv_host_used_tokens{rank="1"}'] >= 0
    assert metrics["tr_engine:kv_host_restored_bytes_total"] == 0
