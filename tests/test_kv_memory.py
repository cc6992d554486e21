"""KV memory on 1-3 gloo ranks (float32, against transformers): pages are taken as they are
written, and requests that together outgrow the pool are preempted and recomputed, each
still giving exactly transformers' greedy tokens, its stream only pausing.

One engine per world size, with a pool that holds a few of these requests at once: prompts
under `SHORT` live on one rank, longer ones are sharded, so both kinds are preempted.
"""

from __future__ import annotations

import pytest
from checkpoints import byte_ids as ids
from checkpoints import greedy_reference, make_checkpoint

from tr_engine import LLM, SamplingParams
from tr_engine.engine.sequence import Status

BLOCK, CHUNK = 8, 32
KV_TOKENS = 96  # per rank: 12 blocks
SHORT = 48  # shard_min_tokens
NEW = 40


def params(n: int = NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("llama3.2", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return greedy_reference(ckpt)


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda p: f"P{p}")
def llm(request, ckpt):
    with LLM(ckpt, device="cpu", world_size=request.param, dtype="float32",
             block_size=BLOCK, prefill_chunk=CHUNK, kv_cache_tokens=KV_TOKENS,
             max_model_len=256, shard_min_tokens=SHORT, max_num_batched_tokens=64) as engine:
        yield engine


def prompts(world: int, seed: int) -> list[list[int]]:
    """4 per rank, short (20 tokens: 8 blocks over their life) and sharded (56: 12 blocks)
    in turn: about three times what the pool holds."""
    return [ids(20 if i % 2 else 56, seed + i) for i in range(4 * world)]


def settled(llm) -> None:
    s = llm.engine.scheduler
    assert s.kv_used() == [0] * s.world and s.blocks.reserved() == [0] * s.world
    assert len(s.free_rows) == s.max_num_seqs and not s.has_work()
    assert s.blocks.pages_idle() == s.blocks.pages_cached()  # no page leaked


def drive(llm, requests: list[tuple[str, list[int]]]):
    """Add the requests, step until all end; returns their outputs, every delta of their
    streams, and their sequences (which say whether they were preempted)."""
    engine = llm.engine
    seqs = {rid: engine.add_request(rid, prompt, params()) for rid, prompt in requests}
    final, deltas = {}, {rid: [] for rid, _ in requests}
    while engine.has_work():
        for out in engine.step():
            deltas[out.request_id] += out.outputs[0].delta_token_ids
            if out.finished:
                final[out.request_id] = out
    return final, deltas, seqs


def test_pages_are_taken_as_written(llm):
    """Twice as many of these requests run at once as their prompt + max_tokens would
    allow: admission takes their prompts' pages only."""
    engine = llm.engine
    world = engine.scheduler.world
    for i in range(4 * world):
        engine.add_request(f"w{i}", ids(10, 900 + i), params(NEW + 20))
    engine.step()
    s = engine.scheduler
    # a request's life is 70 tokens (9 blocks): a rank's 12 blocks hold one of them
    assert s.num_running == 4 * world and s.num_waiting == 0
    for i in range(4 * world):
        engine.abort(f"w{i}")
    settled(llm)


def test_requests_outgrowing_the_pool_all_finish_exactly(llm, hf):
    world = llm.engine.scheduler.world
    before = llm.engine.scheduler.num_preemptions
    requests = [(f"a{i}", p) for i, p in enumerate(prompts(world, 100))]
    final, deltas, seqs = drive(llm, requests)
    preempted = [rid for rid, s in seqs.items() if s.preemptions]
    assert preempted and llm.engine.scheduler.num_preemptions > before
    for rid, prompt in requests:
        out = final[rid]
        assert out.finish_reason == "length"
        assert out.token_ids == hf(tuple(prompt), NEW), rid
        # the stream paused and went on: its chunks are the whole output, once each
        assert deltas[rid] == out.token_ids, rid
    settled(llm)


def test_aborting_a_preempted_request_frees_everything(llm, hf):
    engine = llm.engine
    world = engine.scheduler.world
    requests = [(f"b{i}", p) for i, p in enumerate(prompts(world, 200))]
    seqs = {rid: engine.add_request(rid, prompt, params()) for rid, prompt in requests}
    final = {}
    aborted = None
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if aborted is None:
            victim = next((s for s in seqs.values()
                           if s.preemptions and s.status is Status.WAITING), None)
            if victim is not None:
                aborted = victim.request_id
                out = engine.abort(aborted)
                assert out.finished and out.outputs[0].finish_reason == "abort"
    assert aborted is not None
    for rid, prompt in requests:
        if rid != aborted:
            assert final[rid].token_ids == hf(tuple(prompt), NEW), rid
    settled(llm)
