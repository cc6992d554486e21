"""Outputs handed over after the next step is queued (TR_ENGINE_OVERLAP_OUTPUTS=1), live: a
real `tr-serve --device cpu --world-size 2` on a small random checkpoint with the overlap
forced on (on the CPU it is off by default), driven with the openai client.

With it on, a decode step's outputs wait in the engine thread until the next step's work is
queued; the event loop gets them then. So every case here is about what must not change: each
stream gets every token once, in order, as one chunk (logprobs asked for), with transformers'
greedy tokens and logprobs (float32 forward, within 1e-4); requests of different lengths
end with their own last token and usage while the others go on; a stream the client drops
is aborted and its KV freed; and an idle server delivers a lone request's tokens without
waiting for a step that never comes.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from checkpoints import byte_ids, greedy_reference, make_checkpoint, reference_logprobs
from test_server import running_server, wait_idle

MODEL = "overlap-test"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return greedy_reference(ckpt)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(ckpt):
    before = os.environ.get("TR_ENGINE_OVERLAP_OUTPUTS")
    os.environ["TR_ENGINE_OVERLAP_OUTPUTS"] = "1"  # the server process inherits it
    try:
        with running_server("--model", ckpt, "--served-model-name", MODEL, "--dtype",
                            "float32", "--max-model-len", "512", "--kv-cache-tokens", "2048",
                            "--block-size", "16") as s:
            yield s
    finally:
        if before is None:
            del os.environ["TR_ENGINE_OVERLAP_OUTPUTS"]
        else:
            os.environ["TR_ENGINE_OVERLAP_OUTPUTS"] = before


async def stream(client, prompt: list[int], n: int) -> dict:
    chunks = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=n, temperature=0, logprobs=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    got = {"tokens": [], "logprobs": [], "finish": [], "usage": None}
    async for c in chunks:
        if c.usage is not None:
            got["usage"] = c.usage
        for choice in c.choices:
            assert len(choice.logprobs.tokens) == 1, "one chunk a token"
            got["tokens"] += choice.logprobs.tokens
            got["logprobs"] += choice.logprobs.token_logprobs
            got["finish"].append(choice.finish_reason)
    return got


def test_concurrent_streams_of_different_lengths_match_transformers(server, hf, tokenizer):
    prompts = [byte_ids(9 + 5 * i, seed=40 + i) for i in range(4)]
    lengths = [3, 11, 24, 40]

    async def run():
        client = server.async_client()
        return await asyncio.gather(*(stream(client, p, n) for p, n in zip(prompts, lengths)))

    for prompt, n, got in zip(prompts, lengths, asyncio.run(run())):
        tokens = hf(tuple(prompt), n)
        assert got["tokens"] == [tokenizer.decode([t]) for t in tokens]
        ref = reference_logprobs(hf.model, prompt, tokens)
        assert (torch.tensor(got["logprobs"], dtype=torch.float64) - ref).abs().max() < 1e-4
        assert got["finish"] == [None] * (n - 1) + ["length"]
        assert got["usage"].completion_tokens == n and got["usage"].prompt_tokens == len(prompt)
    wait_idle(server, timeout=30)


def test_a_lone_request_on_an_idle_server_is_not_held(server, hf):
    # its last token's step has no next step: the output must still come
    prompt = byte_ids(12, seed=7)
    r = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                           temperature=0, logprobs=0,
                                           extra_body={"ignore_eos": True})
    ref = reference_logprobs(hf.model, prompt, hf(tuple(prompt), 6))
    got = torch.tensor(r.choices[0].logprobs.token_logprobs, dtype=torch.float64)
    assert r.choices[0].finish_reason == "length" and (got - ref).abs().max() < 1e-4


def test_a_dropped_stream_is_aborted_and_the_others_go_on(server, hf, tokenizer):
    keep, drop = byte_ids(10, seed=1), byte_ids(14, seed=2)

    async def run():
        client = server.async_client()
        kept = asyncio.ensure_future(stream(client, keep, 30))
        chunks = await client.completions.create(
            model=MODEL, prompt=drop, max_tokens=200, temperature=0, logprobs=0, stream=True,
            extra_body={"ignore_eos": True})
        seen = 0
        async for _ in chunks:
            seen += 1
            if seen == 4:
                break
        await chunks.close()
        return await kept

    got = asyncio.run(run())
    assert got["tokens"] == [tokenizer.decode([t]) for t in hf(tuple(keep), 30)]
    m = wait_idle(server, timeout=30)  # the dropped one's KV went back too
    assert m["tr_engine:num_requests_running"] == 0
