"""Short requests on single ranks beside sharded long ones, on 2 and 3 gloo ranks: prompts
under shard_min_tokens live on one rank each (KV, prefill, decode there alone) while a
long prompt shards over all of them, in the same steps, under a token budget. Every request
gives exactly the greedy tokens transformers' `generate` gives for it alone, with each
token's logprob within 1e-4 of transformers' forward (float32).

One engine per world size runs every case.
"""

from __future__ import annotations

import pytest
from checkpoints import Recorder, greedy_reference, make_checkpoint, matches_transformers
from checkpoints import byte_ids as ids

from tr_engine import SamplingParams
from tr_engine.llm import LLM

BLOCK, CHUNK, BUDGET, SHORT = 4, 96, 40, 100


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("qwen3", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return greedy_reference(ckpt)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"P{p}")
def llm(request, ckpt):
    with LLM(ckpt, device="cpu", world_size=request.param, dtype="float32",
             block_size=BLOCK, prefill_chunk=CHUNK, max_num_batched_tokens=BUDGET,
             kv_cache_tokens=600, max_model_len=400, shard_min_tokens=SHORT) as engine:
        yield engine


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)


def run(engine, final: dict) -> None:
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out


def test_short_requests_on_single_ranks_beside_a_sharded_prompt_stay_exact(llm, hf):
    engine = llm.engine
    world = engine.world
    shorts = {f"s{i}": ids(3 + 9 * i, seed=i) for i in range(2 * world)}
    later = {"late-a": ids(70, seed=20), "late-b": ids(40, seed=21)}
    longs = {"long": ids(230, seed=10)}
    news = {**{r: 40 for r in shorts}, "late-a": 12, "late-b": 12, "long": 16}
    rec = Recorder(engine.scheduler)
    final, homes = {}, {}
    try:
        for rid, prompt in shorts.items():
            engine.add_request(rid, prompt, greedy(news[rid]))
        while len(engine.scheduler.decoding) < len(shorts):
            engine.step()
        for rid, prompt in {**longs, **later}.items():
            engine.add_request(rid, prompt, greedy(news[rid]))
        while engine.has_work():
            for q in engine.scheduler.prefilling + engine.scheduler.decoding:
                homes[q.request_id] = q.home
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
    finally:
        rec.close()
    everything = {**shorts, **later, **longs}
    for rid, prompt in everything.items():
        ref = hf(tuple(prompt), news[rid])
        assert matches_transformers(hf.model, final[rid], prompt, ref), f"P={world} {rid}"

    assert homes["long"] == -1 and all(homes[r] >= 0 for r in {**shorts, **later})
    per_rank = [sum(1 for r in shorts if homes[r] == k) for k in range(world)]
    assert per_rank == [2] * world  # spread by load
    plans = rec.plans
    # the short prompts arriving during the long prefill had steps with a sharded chunk,
    # a short prompt's chunk and decode tokens of both kinds
    both = [p for p in plans if p.prefill is not None and p.local and p.decode is not None]
    assert both
    mixed_decode = [p.decode for p in plans if p.decode is not None and p.decode.home
                    and min(p.decode.home) < 0 <= max(p.decode.home)]
    assert mixed_decode
    # a step's tokens on each rank stay within the budget (or the smallest chunks)
    for p in plans:
        if p.decode is None:
            continue
        work = [0] * world
        for h in p.decode.home:
            for r in (range(world) if h < 0 else (h,)):
                work[r] += 1
        for lp in p.local:
            work[lp.home] += len(lp.tokens)
        floor = BLOCK
        if p.prefill is not None:
            n = len(p.prefill.tokens)
            work = [w + -(-n // world) for w in work]
            floor += 2 * BLOCK
        assert max(work) <= max(BUDGET, len(p.decode.seq_ids) + floor)
    s = engine.scheduler
    assert s.kv_used() == [0] * world and s.blocks.reserved() == [0] * world


def test_a_short_conversation_s_next_turn_reuses_its_kv_on_the_same_rank(llm, hf):
    engine = llm.engine
    first = ids(45, seed=30)
    final = {}
    rec = Recorder(engine.scheduler)
    try:
        engine.add_request("turn-1", first, greedy(8))
        run(engine, final)
        reply = final["turn-1"].outputs[0].token_ids
        second = first + reply + ids(11, seed=31)
        engine.add_request("turn-2", second, greedy(8))
        run(engine, final)
    finally:
        rec.close()
    ref = hf(tuple(second), 8)
    assert matches_transformers(hf.model, final["turn-2"], second, ref)
    # every whole block of the first turn's prompt and reply is reused: 52 of 64 tokens
    assert final["turn-2"].num_cached_tokens == (45 + 8 - 1) // BLOCK * BLOCK
    homes = {p.seq_id: p.home for plan in rec.plans for p in plan.local}
    assert len(set(homes.values())) == 1 and -1 not in homes.values()
