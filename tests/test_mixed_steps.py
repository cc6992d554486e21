"""Mixed steps on 1-3 gloo ranks: streams decode in the same forwards that prefill long
prompts, under a small token budget, and every request still gives exactly the greedy
tokens transformers' `generate` gives for it alone (float32).

One engine per world size runs every case. Small blocks, a small budget and a model whose
attention is dear next to its layers, so the chunks of a long prompt are cut to the budget
and shrink as its prefix grows.
"""

from __future__ import annotations

import pytest
from checkpoints import Recorder, greedy_reference, make_checkpoint, matches_transformers
from checkpoints import byte_ids as ids

from tr_engine import SamplingParams
from tr_engine.distributed import zigzag
from tr_engine.llm import LLM

BLOCK, CHUNK, BUDGET = 4, 96, 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("llama3.2", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return greedy_reference(ckpt)


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda p: f"P{p}")
def llm(request, ckpt):
    with LLM(ckpt, device="cpu", world_size=request.param, dtype="float32",
             block_size=BLOCK, prefill_chunk=CHUNK, max_num_batched_tokens=BUDGET,
             kv_cache_tokens=600, max_model_len=400, shard_min_tokens=0) as engine:
        yield engine


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)


def test_streams_decode_in_every_step_of_long_prefills_and_all_stay_exact(llm, hf):
    engine = llm.engine
    world = engine.world
    streams = {f"s{i}": ids(3 + 2 * i, seed=i) for i in range(3)}
    longs = {"long-a": ids(230, seed=10), "long-b": ids(150, seed=11)}
    news = {"s0": 60, "s1": 60, "s2": 60, "long-a": 4, "long-b": 4}
    rec = Recorder(engine.scheduler)
    final, seqs = {}, {}
    try:
        for rid, prompt in streams.items():
            seqs[rid] = engine.add_request(rid, prompt, greedy(news[rid]))
        while len([s for s in engine.scheduler.decoding if s.request_id in streams]) < 3:
            engine.step()
        first = len(rec.plans)
        for rid, prompt in longs.items():
            seqs[rid] = engine.add_request(rid, prompt, greedy(news[rid]))
        while engine.has_work():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
    finally:
        rec.close()
    for rid, prompt in {**streams, **longs}.items():
        ref = hf(tuple(prompt), news[rid])
        assert matches_transformers(hf.model, final[rid], prompt, ref), f"P={world} {rid}"

    plans = rec.plans[first:]
    chunks = [p for p in plans if p.prefill is not None]
    assert sum(len(p.prefill.tokens) for p in chunks) == 230 + 150
    # every chunk of the long prompts rode with the streams' decode tokens
    assert all(p.kind == "mixed" and len(p.decode.seq_ids) >= 3 for p in chunks)
    step = 2 * world * BLOCK
    sizes = {len(p.prefill.tokens) for p in chunks if not p.prefill.sample}
    assert all(n % step == 0 and n < engine.scheduler.prefill_chunk for n in sizes)
    if world < 3:  # deeper into a prompt, its chunks shrink (one size only at the floor)
        assert len(sizes) > 1
    # the budget is per rank: a rank's shard of the chunk and the decode tokens
    for p in chunks:
        shard = max(zigzag.local_len(len(p.prefill.tokens), world, r, BLOCK) for r in range(world))
        assert shard + len(p.decode.seq_ids) <= max(BUDGET, step // world + len(p.decode.seq_ids))
    # the shorter long prompt went first, so it got its first token first
    done = [p.prefill.seq_id for p in chunks if p.prefill.sample]
    assert done == [seqs["long-b"].seq_id, seqs["long-a"].seq_id]
    s = engine.scheduler
    assert s.kv_used() == [0] * world and s.blocks.reserved() == [0] * world
