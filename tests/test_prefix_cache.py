"""Prefix caching on 1-3 gloo ranks: every request that reuses cached KV gives exactly the
greedy tokens transformers' `generate` gives for its whole prompt, float32.

One engine per world size runs every case (small blocks and chunks, so prefixes end inside
blocks and chunks, and a small pool, so documents are evicted): a follow-up on a document,
a prefix that ends mid-chunk and mid-block, two requests on one document at once, a
follow-up on a request still decoding, a second chat turn, and documents revisited after
eviction. The KV accounting is checked after each case.
"""

from __future__ import annotations

import pytest
from checkpoints import byte_ids as ids
from checkpoints import greedy_reference, make_checkpoint, matches_transformers

from tr_engine import LLM, SamplingParams

NEW = 12
BLOCK, CHUNK = 8, 32
KV_TOKENS = 240  # per rank: a few documents, then eviction
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("qwen3", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return greedy_reference(ckpt)


def exact(out, prompt: list[int], hf) -> bool:
    return matches_transformers(hf.model, out, prompt, hf(tuple(prompt), len(out.token_ids)))


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda p: f"P{p}")
def llm(request, ckpt):
    with LLM(ckpt, device="cpu", world_size=request.param, dtype="float32",
             block_size=BLOCK, prefill_chunk=CHUNK, kv_cache_tokens=KV_TOKENS,
             max_model_len=256, attention_strategy="auto", shard_min_tokens=0) as engine:
        yield engine


def run(llm, prompts: list[list[int]], params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


def settled(llm) -> None:
    """After every request ended: nothing in use, nothing reserved, every row free."""
    s = llm.engine.scheduler
    assert s.kv_used() == [0] * s.world and s.blocks.reserved() == [0] * s.world
    assert len(s.free_rows) == s.max_num_seqs
    idle, cached = s.blocks.pages_idle(), s.blocks.pages_cached()
    assert idle == cached  # every cached page is idle, and no page leaked


def whole(n: int) -> int:
    return n // BLOCK * BLOCK


def test_follow_up_on_a_document(llm, hf):
    llm.engine.reset_prefix_cache()
    doc = ids(70, 1)
    first = run(llm, [doc])[0]
    assert first.num_cached_tokens == 0 and exact(first, doc, hf)
    follow = doc + ids(10, 2)
    out = run(llm, [follow])[0]
    assert out.num_cached_tokens == whole(70)  # the document's full blocks
    assert exact(out, follow, hf)
    settled(llm)


def test_prefix_that_ends_mid_chunk_and_mid_block(llm, hf):
    doc = ids(70, 1)  # cached by the test before, or computed again here
    run(llm, [doc])
    prompt = doc[:45] + ids(9, 3)  # 45: inside the second chunk and the sixth block
    out = run(llm, [prompt])[0]
    assert out.num_cached_tokens == whole(45)
    assert exact(out, prompt, hf)
    settled(llm)


def test_prefix_on_one_rank_only(llm, hf):
    """One cached block: it lies on one rank, and the others attend no prefix at all (every
    rank must still run the prefix variant of the strategy's collectives)."""
    scheduler = llm.engine.scheduler
    auto = scheduler.choose_strategy
    try:
        for i, strategy in enumerate(("tokenring", "ring", "allgather_kv")):
            scheduler.choose_strategy = lambda new, cached, s=strategy: s
            doc = ids(BLOCK + 3, 20 + i)
            run(llm, [doc])
            prompt = doc + ids(20, 30 + i)
            out = run(llm, [prompt])[0]
            assert out.num_cached_tokens == BLOCK and exact(out, prompt, hf), strategy
    finally:
        scheduler.choose_strategy = auto
    settled(llm)


def test_two_requests_on_one_document_at_once(llm, hf):
    doc = ids(50, 4)
    a, b = doc + ids(5, 5), doc + ids(7, 6)
    pages_before = sum(llm.engine.scheduler.blocks.pages_cached())
    outs = run(llm, [a, b])
    assert exact(outs[0], a, hf) and exact(outs[1], b, hf)
    assert outs[0].num_cached_tokens == 0
    assert outs[1].num_cached_tokens == whole(50)  # stored once, by the first
    # the document's 6 full blocks are cached once (plus each request's own full blocks)
    added = sum(llm.engine.scheduler.blocks.pages_cached()) - pages_before
    own = sum((len(p) + NEW - 1) // BLOCK - whole(50) // BLOCK for p in (a, b))
    assert added <= whole(50) // BLOCK + own
    settled(llm)


def test_follow_up_on_a_request_still_decoding(llm, hf):
    engine = llm.engine
    doc = ids(60, 7)
    engine.add_request("long", doc, SamplingParams(max_tokens=40, temperature=0,
                                                   ignore_eos=True))
    outs, so_far = {}, []  # each output holds its step's token: the reply so far is theirs
    while len(engine._seqs) and not any(s.fed >= 10 for s in engine._seqs.values()):
        for o in engine.step():
            outs[o.request_id] = o
            so_far += o.outputs[0].delta_token_ids
    follow = doc + so_far[:9] + ids(4, 8)  # the document and what it said so far
    engine.add_request("follow", follow, GREEDY)
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id] = o
    assert exact(outs["long"], doc, hf) and exact(outs["follow"], follow, hf)
    assert outs["follow"].num_cached_tokens == whole(69)  # document and reply, whole blocks
    settled(llm)


def test_second_chat_turn(llm, hf):
    system = {"role": "system", "content": "You read the manual below. " + "x" * 60}
    turn1 = [system, {"role": "user", "content": "What is in it?"}]
    first = llm.chat(turn1, GREEDY)[0]
    p1 = llm.engine.encode_chat(turn1)
    turn2 = turn1 + [{"role": "assistant", "content": "It is about x."},
                     {"role": "user", "content": "Say more."}]
    p2 = llm.engine.encode_chat(turn2)
    assert p2[: len(p1)] == p1  # the template only appends
    second = llm.chat(turn2, GREEDY)[0]
    assert exact(first, p1, hf) and exact(second, p2, hf)
    assert second.num_cached_tokens >= whole(len(p1))
    settled(llm)


def test_evicted_documents_revisited(llm, hf):
    s = llm.engine.scheduler
    capacity = s.blocks.num_pages * BLOCK * s.world
    docs = [ids(90, 100 + i) for i in range(capacity // 90 + 2)]  # more than the pool holds
    for d in docs:
        out = run(llm, [d])[0]
        assert exact(out, d, hf)
    settled(llm)
    last, first = docs[-1] + [1, 2, 3], docs[0] + [1, 2, 3]
    out_last, out_first = run(llm, [last])[0], run(llm, [first])[0]
    assert out_last.num_cached_tokens == whole(90)  # the newest is still cached
    assert out_first.num_cached_tokens < whole(90)  # the oldest went first
    assert exact(out_last, last, hf) and exact(out_first, first, hf)
    settled(llm)
    llm.engine.reset_prefix_cache()
    assert s.blocks.pages_cached() == [0] * s.world and not s.blocks.cache
