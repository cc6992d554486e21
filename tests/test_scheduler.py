"""The scheduler, KV blocks and the prefix cache on their own: plain Python, no model, no
device."""

from __future__ import annotations

import pytest

from tr_engine.config import EngineConfig
from tr_engine.distributed import zigzag
from tr_engine.engine.scheduler import Scheduler
from tr_engine.engine.sequence import Sequence, Status
from tr_engine.errors import QueueFull, RequestTooLong
from tr_engine.kv.block_manager import BlockManager, block_keys, chunk_blocks, plan_pages
from tr_engine.plan import ClusterInfo, StepPlan
from tr_engine.sampling_params import SamplingParams

B = 4  # block size in these tests


def make(world=2, pages=25, max_len=1000, chunk=16, seqs=4, waiting=8, caching=True,
         budget=None, prefix_cost=0.0, short=0):
    config = EngineConfig(world_size=world, prefill_chunk=chunk, max_num_seqs=seqs,
                          max_waiting=waiting, enable_prefix_caching=caching,
                          max_num_batched_tokens=budget, shard_min_tokens=short, block_size=B)
    info = ClusterInfo(num_pages=pages, block_size=B, max_model_len=max_len,
                       prefix_cost=prefix_cost)
    return Scheduler(config, info, lambda new, cached: "ring")


def seq(i, prompt_len, max_tokens=4, first=1):
    return Sequence(i, f"r{i}", list(range(first, first + prompt_len)), SamplingParams(
        max_tokens=max_tokens, temperature=0))


def drive(s: Scheduler, token=7):
    """Run one step with a fake sampled token; return the plan."""
    plan = s.schedule()
    if plan is not None:
        s.update(plan, [token] * sampled(plan))
    return plan


def sampled(plan) -> int:
    """How many tokens a step samples: the first of each prompt a chunk ends (the sharded
    one's, each short prompt's), then one per decoding sequence."""
    n = sum(1 for p in [plan.prefill, *plan.local] if p is not None and p.sample)
    return n + (len(plan.decode.seq_ids) if plan.decode is not None else 0)


def run_all(s: Scheduler, limit=500):
    for _ in range(limit):
        plan = drive(s)
        if plan is None:
            return
        for q in list(s.decoding):
            if len(q.output_ids) >= q.params.max_tokens:
                s.finish(q, "length")
    raise AssertionError("did not finish")


@pytest.mark.parametrize("world,n,start", [(1, 5, 0), (2, 37, 8), (3, 8, 4), (4, 100, 0),
                                           (2, 64, 16)])
def test_chunk_blocks_follow_the_zigzag_layout(world, n, start):
    """Each block a chunk writes lies whole on the rank the aligned zigzag layout gives its
    tokens, and the blocks cover exactly the chunk's real tokens."""
    blocks = chunk_blocks(start, n, world, B)
    assert [j for j, _ in blocks] == list(range(start // B, -(-(start + n) // B)))
    for j, rank in blocks:
        for pos in range(j * B, min((j + 1) * B, start + n)):
            if pos >= start:
                assert zigzag.owner(n, world, pos - start, B)[0] == rank
    for r in range(world):  # a rank's real tokens fill its blocks in order
        count = sum(1 for _, rr in blocks if rr == r)
        assert -(-zigzag.local_len(n, world, r, B) // B) == count


def _walk(held, start, prompt, total, chunks, world):
    """plan_pages by hand: every chunk's blocks walked one by one, then decode blocks."""
    counts, need, a = list(held), [0] * world, start
    for n in chunks:
        for _, r in chunk_blocks(a, n, world, B):
            counts[r] += 1
            need[r] += 1
        a += n
    assert a == prompt
    for _ in range(-(-prompt // B) * B, total, B):
        r = counts.index(min(counts))
        counts[r] += 1
        need[r] += 1
    return need


@pytest.mark.parametrize("world,held,start,prompt,total,chunk,first", [
    (1, [0], 0, 5, 7, None, None), (2, [0, 0], 0, 37, 60, 16, None),
    (3, [0, 0, 0], 0, 8, 9, 24, None), (4, [0] * 4, 0, 3, 40, 32, None),
    (2, [3, 1], 16, 90, 130, 32, 16), (2, [0, 0], 0, 1000, 1100, 256, 48),
    (3, [1, 0, 0], 4, 300, 301, 72, 24)])
def test_plan_pages_counts_every_block_and_balances_decode(world, held, start, prompt, total,
                                                           chunk, first):
    chunk = chunk or 8 * world * B
    chunks, a, n = [], start, first or chunk
    while a < prompt:
        chunks.append(min(n, prompt - a))
        a, n = a + chunks[-1], chunk
    need = plan_pages(held, start, prompt, total, chunk, world, B, first)
    assert need == _walk(held, start, prompt, total, chunks, world)
    assert sum(need) == -(-total // B) - start // B
    counts = [h + n for h, n in zip(held, need)]
    assert max(counts) - min(counts) <= 2 + len(chunks) + max(held)


def test_block_keys_name_the_whole_prefix():
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], B)
    assert len(a) == 2 and len(set(a)) == 2
    b = block_keys([0, 2, 3, 4, 5, 6, 7, 8], B)  # same second block, other first block
    assert a[1] != b[1] and a[0] != b[0]
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], B) == a  # deterministic
    assert block_keys([5, 6, 7, 8], B, parent=a[0]) == a[1:]


def test_too_long_is_refused_with_both_numbers():
    s = make(pages=3, max_len=50)  # 12 tokens per rank
    with pytest.raises(RequestTooLong, match=r"maximum context length is 50.*needs 60"):
        s.check(40, 20)
    with pytest.raises(RequestTooLong, match=r"KV cache holds 24 tokens.*needs 30"):
        s.check(25, 5)
    s.check(10, 5)


def test_queue_bound():
    s = make(waiting=2, seqs=1)
    s.add(seq(0, 4))
    s.add(seq(1, 4))
    with pytest.raises(QueueFull):
        s.add(seq(2, 4))


def test_chunked_prefill_then_decode():
    s = make(world=2, chunk=16)
    a = seq(0, 40, max_tokens=3)
    s.add(a)
    kinds = []
    for _ in range(5):
        plan = drive(s)
        kinds.append(plan.kind)
        if plan.kind == "prefill":
            p = plan.prefill
            assert p.tokens == a.prompt_ids[p.start : p.start + len(p.tokens)]
            assert len(p.tokens) <= 16 and p.start % B == 0
    assert kinds == ["prefill", "prefill", "prefill", "decode", "decode"]
    assert a.prefilled == 40 and a.output_ids == [7, 7, 7]
    # 40 prompt tokens in chunks 16, 16, 8 plus two fed tokens, split over the ranks
    assert sum(a.kv_len) == 42
    for r in range(2):  # every rank's keys are the first kv_len slots of its table
        assert len(a.table[r]) == -(-a.kv_len[r] // B)


def test_prefill_chunks_interleave_with_running_decodes():
    s = make(world=2, chunk=16, pages=100)
    s.add(seq(0, 4, max_tokens=50))
    drive(s)  # short prompt: one prefill, now decoding
    s.add(seq(1, 64, max_tokens=2, first=100))
    for i in range(4):  # every chunk of the long prompt carries the stream's next token
        plan = drive(s)
        assert plan.kind == "mixed" and plan.decode.seq_ids == [0]
        assert plan.prefill.start == 16 * i and len(plan.prefill.tokens) == 16
    plan = drive(s)
    assert plan.kind == "decode" and plan.decode.seq_ids == [0, 1]


def test_continuous_batching_join_and_leave():
    s = make(world=1, seqs=8)
    s.add(seq(0, 3, max_tokens=10))
    drive(s)
    s.add(seq(1, 3, max_tokens=10, first=50))
    plan = drive(s)  # 1's prefill rides with 0's decode, and 1 joins
    assert plan.kind == "mixed" and plan.decode.seq_ids == [0] and plan.prefill.sample
    assert len(s.find("r0").output_ids) == 2 and s.find("r1").output_ids == [7]
    plan = drive(s)
    assert plan.kind == "decode" and plan.decode.seq_ids == [0, 1]
    s.finish(s.find("r0"), "stop")
    plan = drive(s)
    assert plan.decode.seq_ids == [1]


def test_fcfs_admission_waits_for_room_and_abort_frees():
    s = make(world=2, pages=5, seqs=8, caching=False)
    big = seq(0, 30, max_tokens=5)  # 34 KV positions: 9 blocks, 5 on one rank
    s.add(big)
    drive(s)
    drive(s)
    s.add(seq(1, 10, max_tokens=2, first=100))
    s.add(seq(2, 1, max_tokens=1, first=200))
    plan = drive(s)
    assert plan.kind == "decode" and s.num_waiting == 2  # no room; 2 may not overtake 1
    assert s.kv_used() == [B * len(t) for t in big.table]
    s.finish(big, "abort")
    assert big.status is Status.FINISHED and s.kv_used() == [0, 0]
    assert s.blocks.reserved() == [0, 0]
    drive(s)
    assert s.num_waiting == 0 and s.num_running == 2


def test_abort_while_waiting_and_while_prefilling():
    s = make(world=2, pages=100, chunk=16)
    a, b = seq(0, 40), seq(1, 5, first=100)
    s.add(a)
    s.add(b)
    drive(s)  # first chunk of a
    s.finish(a, "abort")
    s.finish(b, "abort")
    assert not s.has_work() and s.blocks.reserved() == [0, 0] and s.kv_used() == [0, 0]
    assert s.schedule() is None


# ---- the prefix cache ----------------------------------------------------------------------
def pages_of(s: Scheduler) -> tuple[list[int], list[int]]:
    return s.blocks.pages_in_use(), s.blocks.pages_idle()


def test_a_repeated_prompt_reuses_its_blocks_and_computes_the_rest():
    s = make(world=2, pages=50)
    a = seq(0, 30, max_tokens=3)
    s.add(a)
    run_all(s)
    assert s.kv_used() == [0, 0] and sum(s.blocks.pages_idle()) > 0
    cached = sum(s.blocks.pages_cached())
    # the same 30 tokens and 6 more: 7 full blocks of the first prompt are reused (28
    # tokens), and the 8 tokens from 28 on are prefilled
    b = Sequence(1, "r1", a.prompt_ids + [99] * 6, SamplingParams(max_tokens=2))
    s.add(b)
    plan = drive(s)
    assert plan.kind == "prefill" and plan.prefill.start == 28 and b.num_cached == 28
    assert plan.prefill.tokens == b.prompt_ids[28:]
    assert sum(plan.prefill.prefix_len) == 28
    first = {op.rank: op for op in plan.tables}
    assert all(op.at == 0 for op in first.values())  # the row starts over with the hits
    for r in range(2):  # each rank's table begins with its pages of a's first 7 blocks
        mine = [page for rr, page in a.blocks[:7] if rr == r]
        assert first[r].pages[: len(mine)] == mine
    assert b.blocks[:7] == a.blocks[:7]
    assert s.blocks.hits == 28 and s.blocks.queries == 30 + 36
    run_all(s)
    assert sum(s.blocks.pages_cached()) > cached  # b's own full blocks joined the cache
    assert s.kv_used() == [0, 0] and s.blocks.reserved() == [0, 0]


def test_a_whole_cached_prompt_still_computes_its_last_token():
    s = make(world=1, pages=50)
    a = seq(0, 16, max_tokens=2)
    s.add(a)
    run_all(s)
    b = seq(1, 16, max_tokens=2)  # the same 16 tokens: 3 blocks reused, the last computed
    s.add(b)
    plan = drive(s)
    assert b.num_cached == 12 and plan.prefill.tokens == b.prompt_ids[12:]


def test_generated_tokens_are_cached_for_the_next_turn():
    s = make(world=2, pages=50)
    a = seq(0, 10, max_tokens=9)
    s.add(a)
    run_all(s)
    # positions 0..17 have KV (10 prompt + 8 fed): blocks 0..3 are full and cached
    turn2 = Sequence(1, "r1", a.prompt_ids + a.output_ids + [5, 5, 5], SamplingParams())
    s.add(turn2)
    drive(s)
    assert turn2.num_cached == 16


def test_two_requests_on_one_document_store_it_once():
    s = make(world=2, pages=60, chunk=16)
    doc = list(range(1, 41))
    a = Sequence(0, "a", doc + [1000], SamplingParams(max_tokens=2))
    b = Sequence(1, "b", doc + [2000], SamplingParams(max_tokens=2))
    s.add(a)
    s.add(b)  # both admitted at once, before anything is cached
    plans = []
    while b.prefilled < b.prompt_len:
        plans.append(drive(s))
    assert b.num_cached == 40  # looked up again when its prefill began: a's 10 blocks
    assert [p.prefill.seq_id for p in plans if p.prefill is not None] == [0, 0, 0, 1]
    doc_pages = {p for p in a.blocks[:10]}
    assert set(b.blocks[:10]) == doc_pages
    assert sum(s.blocks.pages_in_use()) == len(set(a.blocks) | set(b.blocks))
    run_all(s)
    assert s.blocks.reserved() == [0, 0]


def test_idle_cached_blocks_never_block_admission_and_go_lru_first():
    s = make(world=1, pages=12, seqs=1, chunk=8)
    docs = [seq(i, 16, max_tokens=1, first=100 * i + 1) for i in range(3)]
    for d in docs:  # each leaves 4 cached blocks: the pool is full of idle blocks
        s.add(d)
        run_all(s)
    assert s.blocks.pages_idle() == [12] and s.kv_used() == [0]
    # a request that needs 5 pages: admitted at once; its first chunk (2 blocks) evicts the
    # oldest document's, latest position first
    e = seq(9, 20, max_tokens=1, first=5000)
    s.add(e)
    s.schedule()
    assert e.status is Status.PREFILLING
    s.finish(e, "abort")
    hits = {}
    for i in (2, 0):  # doc 2 is intact; doc 0, the least recently used, lost its tail
        d = seq(10 + i, 16, max_tokens=1, first=100 * i + 1)
        s.add(d)
        run_all(s)
        hits[i] = d.num_cached
    assert hits == {2: 12, 0: 8}


def test_reset_drops_idle_blocks_only():
    s = make(world=2, pages=40)
    a = seq(0, 20, max_tokens=2)
    s.add(a)
    run_all(s)
    b = seq(1, 20, max_tokens=50, first=500)
    s.add(b)
    drive(s)  # b holds its blocks
    assert s.reset_prefix_cache() == 5  # a's full blocks: its 20 prompt tokens
    assert sum(s.blocks.pages_idle()) == 0 and sum(s.blocks.pages_cached()) > 0
    s.finish(b, "abort")
    s.reset_prefix_cache()
    assert s.blocks.pages_cached() == [0, 0] and s.kv_used() == [0, 0]
    assert len(s.blocks.cache) == 0


def test_caching_off_reuses_nothing():
    s = make(world=2, pages=50, caching=False)
    for i in range(2):
        q = seq(i, 30, max_tokens=2)
        s.add(q)
        drive(s)
        assert q.num_cached == 0
        run_all(s)
    assert s.blocks.pages_cached() == [0, 0]


def test_block_manager_counts():
    m = BlockManager(2, 4, B)
    m.reserve([2, 0])
    p = m.take(0)
    m.register(b"k", 0, p)
    assert m.pages_in_use() == [1, 0] and m.reserved() == [1, 0]
    m.unpin(0, p)
    assert m.pages_idle() == [1, 0] and m.lookup([b"k", b"x"]) == [(0, p)]
    assert m.can_reserve([3, 4], []) and not m.can_reserve([4, 0], [])
    m.unreserve([1, 0])


class RankTables:
    """What each rank builds from the plans' table ops (as runner.BlockTables does)."""

    def __init__(self, world: int, rows: int) -> None:
        self.host = [[[] for _ in range(rows)] for _ in range(world)]

    def apply(self, plan) -> None:
        for op in plan.tables:
            row = self.host[op.rank][op.row]
            del row[op.at :]
            row.extend(op.pages)


def test_two_sequences_opening_blocks_on_one_rank_in_one_step_each_get_theirs():
    s = make(world=2, pages=25, seqs=4)
    tables = RankTables(2, 5)
    # the first one decodes once before the second's prefill: their next decode feeds
    # position 4 of both, so both open block 1 (on rank 1) in that step
    for i in range(2):
        s.add(seq(i, 2 + i, max_tokens=6, first=10 * i + 1))
    for _ in range(10):
        plan = drive(s)
        tables.apply(plan)
        if plan.kind == "decode" and len(plan.tables) == 2:
            break
    else:
        raise AssertionError("no decode step opened two blocks")
    assert {(op.rank, op.row) for op in plan.tables} == {(1, q.row) for q in s.decoding}
    for q in s.decoding:
        assert tables.host[1][q.row] == q.table[1] and len(q.table[1]) == 1


@pytest.mark.parametrize("world,budget,short", [
    (1, None, 0), (2, None, 0), (3, None, 0), (1, 13, 0), (2, 30, 0), (3, 40, 0),
    (2, None, 14), (2, 30, 14), (3, 40, 14)])
def test_rank_tables_follow_the_scheduler_under_random_traffic(world, budget, short):
    """Random arrivals, lengths, shared prefixes and early stops (and, with a token budget,
    mixed steps whose chunks shrink deeper into a prompt; with `short`, prompts under it on
    single ranks beside sharded ones): after every step, the table each rank built from
    the ops holds exactly each running sequence's pages there, each decode token's slot
    lies in a page of its owner's table, and a short request's pages all lie on its
    home."""
    import random

    rnd = random.Random(world + short)
    s = make(world=world, pages=40, max_len=200, chunk=2 * world * B * 4, seqs=6, waiting=64,
             budget=budget, prefix_cost=0.02, short=short)
    tables = RankTables(world, 7)
    docs = [[rnd.randint(1, 50) for _ in range(24)] for _ in range(3)]
    pending = []
    for i in range(60):
        prompt = rnd.choice(docs)[: rnd.randint(1, 24)] + [rnd.randint(1, 50)
                                                          for _ in range(rnd.randint(0, 9))]
        pending.append(Sequence(i, f"r{i}", prompt, SamplingParams(
            max_tokens=rnd.randint(1, 12), temperature=0)))
    decode_steps, homes = 0, set()
    for _ in range(5000):
        while pending and rnd.random() < 0.3:
            s.add(pending.pop(0))
        plan = s.schedule()
        if plan is None:
            if not pending:
                break
            continue
        tables.apply(plan)
        if plan.decode is not None:
            decode_steps += 1
            d = plan.decode
            for row, kv, owner in zip(d.rows, d.kv_len, d.owner):
                assert kv[owner] // B < len(tables.host[owner][row])
        for q in s.update(plan, [rnd.choice([5, 5, 5, 2]) for _ in range(sampled(plan))]):
            if q.output_ids[-1] == 2 or len(q.output_ids) >= q.params.max_tokens:
                s.finish(q, "stop")
        for q in s.prefilling + s.decoding:
            if q.started:
                for r in range(world):
                    assert tables.host[r][q.row] == q.table[r]
            if q.home >= 0:
                assert q.prompt_len < short and all(r == q.home for r, _ in q.blocks)
                homes.add(q.home)
    assert not pending and not s.has_work() and decode_steps > 50
    assert len(homes) == (world if short else 0)
    assert s.blocks.hits > 0 and s.blocks.pages_in_use() == [0] * world
    assert s.blocks.reserved() == [0] * world


def test_a_mixed_step_fills_the_token_budget_and_chunks_shrink_with_the_prefix():
    s = make(world=2, pages=200, chunk=128, budget=48, prefix_cost=1 / 256)
    for i in range(3):  # three streams decoding
        s.add(seq(i, 3, max_tokens=100, first=100 * i + 1))
    for _ in range(3):
        drive(s)
    long = seq(9, 300, max_tokens=1, first=1000)
    s.add(long)
    sizes = []
    while long.prefilled < long.prompt_len:
        plan = drive(s)
        assert plan.kind == "mixed" and len(plan.decode.seq_ids) == 3
        p = plan.prefill
        sizes.append(len(p.tokens))
        if not p.sample:  # whole zigzag blocks that fill a rank's budget
            assert len(p.tokens) % (2 * 2 * B) == 0
            a, c = p.start, len(p.tokens)

            def cost(n, a=a):  # a rank: 3 decode tokens, n/2 new ones over a + n/2 keys
                return 3 + n / 2 + (n / 2) * (a + n / 2) / 256

            assert (c == 16 or cost(c) <= 48) and cost(c + 16) > 48
    assert sizes[0] > sizes[-2] and sum(sizes) == 300
    assert sizes == sorted(sizes, reverse=True)[: len(sizes) - 1] + sizes[-1:]
    run_all(s)
    assert s.blocks.reserved() == [0, 0] and s.kv_used() == [0, 0]


@pytest.mark.parametrize("world", [1, 2])
def test_a_prompt_prefilled_while_others_decode_keeps_its_pages_in_one_run(world):
    """Decoding sequences open blocks on pages from the back of the free list, a prompt's
    chunks take theirs from the front: with streams opening blocks between its chunks, a
    long prompt's pages on each rank are still consecutive (the prefill reads its prefix
    in place), and the streams' pages too."""
    s = make(world=world, pages=300, chunk=128, budget=40, prefix_cost=1 / 256)
    streams = [seq(i, 3, max_tokens=200, first=100 * i + 1) for i in range(3)]
    for q in streams:
        s.add(q)
    for _ in range(3):
        drive(s)
    long = seq(9, 400, max_tokens=1, first=1000)
    s.add(long)
    opened = 0
    while long.prefilled < long.prompt_len:
        before = sum(len(q.blocks) for q in streams)
        drive(s)
        opened += sum(len(q.blocks) for q in streams) - before
    assert opened > 3  # the streams took pages between the prompt's chunks
    for r in range(world):
        pages = long.table[r]
        assert pages == list(range(pages[0], pages[0] + len(pages)))
        for q in streams:  # later blocks from the back: descending runs
            later = q.table[r][1:]
            assert later == sorted(later, reverse=True)


def test_nothing_decoding_prefills_whole_chunks():
    s = make(world=2, pages=200, chunk=64, budget=20, prefix_cost=1 / 64)
    a = seq(0, 200, max_tokens=1)
    s.add(a)
    plans = [drive(s) for _ in range(4)]
    assert [p.kind for p in plans] == ["prefill"] * 4
    assert [len(p.prefill.tokens) for p in plans] == [64, 64, 64, 8]


def test_a_short_prompt_goes_before_a_long_prefill_which_never_starves():
    from tr_engine.engine.scheduler import MAX_PASSED_OVER

    s = make(world=1, pages=400, chunk=8, seqs=16, waiting=32)
    long = seq(0, 200, max_tokens=1)
    s.add(long)
    drive(s)
    shorts = [seq(i, 6, max_tokens=1, first=100 * i) for i in range(1, 9)]
    for q in shorts:
        s.add(q)
    order = [drive(s).prefill.seq_id for _ in range(10)]
    # each short prompt is one chunk; the long one gets every (MAX_PASSED_OVER + 1)-th turn
    assert order[:MAX_PASSED_OVER] == [1, 2, 3, 4][:MAX_PASSED_OVER]
    assert order[MAX_PASSED_OVER] == 0
    assert sorted(order) == [0, 0] + list(range(1, 9))
    assert all(q.output_ids for q in shorts) and long.prefilled == 24


def homes(s: Scheduler) -> dict[str, int]:
    return {q.request_id: q.home for q in s.prefilling + s.decoding}


def test_short_requests_live_on_one_rank_each_spread_by_load():
    """Prompts under shard_min_tokens go whole to one rank each, the least loaded; every
    rank prefills its own in the same step, and a long prompt still shards."""
    s = make(world=3, pages=50, seqs=8, short=20)
    for i in range(6):
        s.add(seq(i, 5, max_tokens=4, first=10 * i + 1))
    s.add(seq(9, 30, max_tokens=2, first=500))
    plan = s.schedule()
    assert homes(s) == {"r0": 0, "r1": 1, "r2": 2, "r3": 0, "r4": 1, "r5": 2, "r9": -1}
    assert sorted(p.home for p in plan.local) == [0, 1, 2]  # one per rank, side by side
    assert plan.prefill is not None and plan.prefill.home == -1
    for p in plan.local:  # all of a short prompt, its pages on its home only
        q = next(q for q in s.prefilling if q.seq_id == p.seq_id)
        assert p.tokens == q.prompt_ids and p.strategy == "local"
        assert [r for r, _ in q.blocks] == [p.home] * 2
        assert {op.rank for op in plan.tables if op.row == q.row and op.pages} == {p.home}
    for q in s.prefilling:  # what each reserved over its life: (5 + 4 - 1) / 4 blocks
        if q.home >= 0:
            held = [sum(1 for r, _ in q.blocks if r == k) for k in range(3)]
            assert [h + n for h, n in zip(held, q.reserved)] == \
                [2 if k == q.home else 0 for k in range(3)]
    s.update(plan, [7] * sampled(plan))
    decodes = 0
    while s.has_work():
        plan = drive(s)
        if plan.decode is not None:
            d = plan.decode
            decodes += 1
            assert all(o == h for o, h in zip(d.owner, d.home) if h >= 0)
        for q in list(s.decoding):
            if len(q.output_ids) >= q.params.max_tokens:
                s.finish(q, "length")
    assert decodes > 0
    assert s.kv_used() == [0, 0, 0] and s.blocks.reserved() == [0, 0, 0]


def test_short_documents_one_after_another_spread_over_the_ranks_pools():
    """On an idle engine every rank's load is the same: each new short document goes to
    the rank caching the least, so three of them are cached on three ranks, not evicting
    each other on one."""
    s = make(world=3, pages=6, seqs=4, short=20)
    for i in range(3):
        s.add(seq(i, 12, max_tokens=4, first=100 * i + 1))
        run_all(s)
    assert s.blocks.pages_cached() == [3, 3, 3]  # 15 tokens of KV each: 3 full blocks
    for i in range(3):  # each is still whole where it is
        keys = block_keys(list(range(100 * i + 1, 100 * i + 13)), B)
        assert len(s.blocks.lookup(keys)) == 3


def test_a_follow_up_goes_to_the_rank_holding_its_prefix_unless_that_one_is_busier():
    s = make(world=2, pages=50, seqs=8, short=40)
    doc = list(range(100, 112))  # 3 blocks
    f0 = seq(0, 3, max_tokens=50, first=1)
    a = Sequence(1, "a", doc, SamplingParams(max_tokens=1, temperature=0))
    s.add(f0)
    s.add(a)
    drive(s)
    assert f0.home == 0 and a.home == 1
    s.finish(a, "stop")  # its blocks stay cached on rank 1
    g = seq(2, 3, max_tokens=50, first=300)
    s.add(g)
    drive(s)
    assert g.home == 1  # the least loaded then
    s.finish(f0, "stop")  # now rank 0 idles and rank 1 runs g: one request's load more
    c = Sequence(3, "c", doc + [7, 8, 9], SamplingParams(max_tokens=2, temperature=0))
    d = Sequence(4, "d", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    s.add(c)
    s.add(d)
    drive(s)
    assert c.home == 1 and c.num_cached == 12  # the three blocks a stored
    assert d.home == 0
    s.add(h := seq(5, 3, max_tokens=50, first=700))
    drive(s)
    assert h.home == 0
    s.add(e := Sequence(6, "e", doc + [4], SamplingParams(max_tokens=2, temperature=0)))
    s.add(x := seq(7, 3, max_tokens=50, first=900))
    drive(s)
    # rank 1 (c, g) has one more than rank 0 (d, h): still the cache's rank; then x goes
    # to rank 0, and with rank 1 two ahead a third follow-up computes its prefix afresh
    assert e.home == 1 and e.num_cached == 12 and x.home == 0
    s.finish(d, "stop")
    s.finish(h, "stop")
    s.add(y := Sequence(8, "y", doc + [5], SamplingParams(max_tokens=2, temperature=0)))
    drive(s)
    assert y.home == 0 and y.num_cached == 0


def test_short_requests_too_big_for_one_rank_or_scored_are_sharded():
    s = make(world=2, pages=5, short=40)
    big = seq(0, 10, max_tokens=20)  # 29 KV tokens: 8 blocks, more than one rank's 5
    scored = Sequence(1, "r1", [1, 2, 3], SamplingParams(max_tokens=2, prompt_logprobs=0))
    s.add(big)
    s.add(scored)
    s.schedule()
    assert big.home == -1 and scored.home == -1


def test_a_short_request_no_rank_has_room_for_is_sharded_rather_than_kept_waiting():
    s = make(world=2, pages=10, seqs=4, short=40, chunk=32)
    s.add(a := seq(0, 20, max_tokens=2))  # a prompt of 5 of rank 0's 10 pages
    s.add(b := seq(1, 20, max_tokens=2, first=100))  # 5 of rank 1's
    # 5 more and the watermark: on no rank, 2 + 3 sharded
    s.add(c := seq(2, 20, max_tokens=2, first=200))
    drive(s)
    assert (a.home, b.home, c.home) == (0, 1, -1)
    assert c.status is Status.PREFILLING or c.status is Status.DECODING


# ---- pages as they are written, preemption, eviction order ---------------------------------
def model(tokens: list[int]) -> int:
    """A stand-in for greedy decoding: the next token is a function of all the tokens before
    it (never 0..2), so a sequence recomputed from its prompt and outputs continues exactly."""
    h = 7
    for t in tokens:
        h = (h * 31 + t) % 1000003
    return 3 + h % 47


def alone(prompt: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(model(prompt + out))
    return out


def step_model(s: Scheduler):
    """One step with the stand-in model's tokens; finishes those at max_tokens."""
    plan = s.schedule()
    if plan is None:
        return None
    by_id = {q.seq_id: q for q in s.prefilling + s.decoding}
    tokens = [model(by_id[i].prompt_ids + by_id[i].output_ids) for i in plan.sampled()]
    for q in s.update(plan, tokens):
        if len(q.output_ids) >= q.params.max_tokens:
            s.finish(q, "length")
    return plan


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_partly_evicted_document_keeps_its_head_on_every_rank(world):
    """A finished document's blocks are evicted latest position first on each rank: after
    a request needs a few of its idle pages, a follow-up reuses all of it up to the first
    evicted block, and the evicted ones are each rank's latest blocks of it."""
    chunk = 2 * world * B * 2  # 4 blocks on every rank
    s = make(world=world, pages=12, seqs=4, chunk=chunk)
    doc = seq(0, 2 * chunk, max_tokens=1)  # 8 blocks on every rank: 4 pages stay free
    s.add(doc)
    while s.has_work():
        step_model(s)
    blocks = list(doc.blocks)  # (rank, page) by position; all cached and idle now
    assert s.blocks.pages_idle() == [8] * world == s.blocks.pages_cached()
    x = seq(1, chunk + chunk // 2, max_tokens=1, first=500)  # 6 pages on every rank
    s.add(x)
    while s.has_work():
        step_model(s)
    lost = [j for j, key in enumerate(doc.keys) if key not in s.blocks.cache]
    for r in range(world):  # on each rank, the 2 lost blocks are its latest ones
        mine = [j for j, (rr, _) in enumerate(blocks) if rr == r]
        assert [j for j in mine if j in lost] == mine[-2:]
    follow = Sequence(2, "r2", doc.prompt_ids + [9, 9, 9], SamplingParams(max_tokens=1))
    s.add(follow)
    step_model(s)
    assert follow.num_cached == min(lost) * B > 0
    if world == 1:
        assert follow.num_cached == 6 * B  # all but the latest 2 blocks


def test_admission_takes_the_prompt_pages_only():
    s = make(world=1, pages=40, seqs=16, waiting=16, chunk=16)
    for i in range(10):  # each could fill 27 pages (8 + 100 tokens), each starts with 2
        s.add(seq(i, 8, max_tokens=100, first=10 * i + 1))
    plan = s.schedule()
    assert s.num_running == 10 and s.num_waiting == 0
    # the pages a step has not filled yet count as used: reserved for the prompts
    assert s.kv_used() == [20 * B] and s.blocks.reserved() == [20 - 2]
    assert plan.prefill is not None


def test_check_still_refuses_what_could_never_fit():
    s = make(world=2, pages=10, max_len=1000)  # 80 tokens in all
    with pytest.raises(RequestTooLong, match="KV cache holds 80 tokens"):
        s.check(20, 70)
    s.check(20, 40)


def test_the_latest_admitted_is_preempted_then_resumes_first_and_exactly():
    s = make(world=1, pages=10, seqs=4, chunk=16)  # 40 token slots; a and b need 31 each
    a, b = seq(0, 8, max_tokens=24), seq(1, 8, max_tokens=24, first=50)
    s.add(a)
    s.add(b)
    while s.num_preemptions == 0:
        step_model(s)
    # the pool ran out: b, the latest admitted, gave back all of its pages and its row
    assert b.status is Status.WAITING and s.waiting[0] is b and b.preemptions == 1
    assert b.blocks == [] and b.row == -1 and s.blocks.reserved() == [0]
    assert s.kv_used() == [B * len(a.blocks)] and a.status is Status.DECODING
    had = b.prompt_ids + b.output_ids
    assert b.output_ids and b.prefill_len == len(had)
    late = seq(2, 4, max_tokens=2, first=90)
    s.add(late)
    while True:  # nothing that arrived later is admitted before it
        plan = step_model(s)
        if plan.prefill is not None and plan.prefill.seq_id == b.seq_id:
            break
        assert late.status is Status.WAITING
    # its prefill: prompt and outputs, after the blocks that survived in the prefix cache
    p = plan.prefill
    assert p.start >= B and p.tokens == had[p.start : p.start + len(p.tokens)]
    while s.has_work():
        step_model(s)
    assert a.output_ids == alone(a.prompt_ids, 24) and b.output_ids == alone(b.prompt_ids, 24)
    assert late.output_ids == alone(late.prompt_ids, 2)
    assert s.kv_used() == [0] and s.blocks.reserved() == [0] and len(s.free_rows) == 4


def test_aborting_a_preempted_request_frees_everything():
    s = make(world=2, pages=6, seqs=4, chunk=16)
    a, b = seq(0, 8, max_tokens=30), seq(1, 8, max_tokens=30, first=50)
    s.add(a)
    s.add(b)
    while s.num_preemptions == 0:
        step_model(s)
    victim = b if b.status is Status.WAITING else a
    assert victim is b
    s.finish(b, "abort")
    assert b.status is Status.FINISHED and not s.waiting
    while s.has_work():
        step_model(s)
    assert a.output_ids == alone(a.prompt_ids, 30)
    assert s.kv_used() == [0, 0] and s.blocks.reserved() == [0, 0] and len(s.free_rows) == 4
    assert s.blocks.pages_idle() == s.blocks.pages_cached()


@pytest.mark.parametrize("world,short,budget", [(1, 0, None), (2, 0, None), (3, 0, 40),
                                                (2, 14, 30), (3, 14, None)])
def test_requests_that_outgrow_the_pool_all_finish_exactly(world, short, budget):
    """Random arrivals of requests that together need several times the pool: preemptions
    happen, every request gets exactly the tokens it gets alone, the ranks' tables follow
    the plans, and everything is given back at the end."""
    import random

    rnd = random.Random(10 * world + short)
    s = make(world=world, pages={1: 16, 2: 10, 3: 8}[world], max_len=200,
             chunk=2 * world * B * 2, seqs=6, waiting=64, budget=budget, prefix_cost=0.02,
             short=short)
    tables = RankTables(world, 7)
    docs = [[rnd.randint(3, 50) for _ in range(20)] for _ in range(3)]
    pending = [Sequence(i, f"r{i}", rnd.choice(docs)[: rnd.randint(1, 20)] + [
        rnd.randint(3, 50) for _ in range(rnd.randint(0, 6))], SamplingParams(
        max_tokens=rnd.randint(1, 20), temperature=0)) for i in range(40)]
    everyone = list(pending)
    for _ in range(5000):
        while pending and rnd.random() < 0.5:
            s.add(pending.pop(0))
        plan = step_model(s)
        if plan is None:
            if not pending:
                break
            continue
        tables.apply(plan)
        for q in s.prefilling + s.decoding:
            if q.started:
                for r in range(world):
                    assert tables.host[r][q.row] == q.table[r]
    assert not pending and not s.has_work() and s.num_preemptions >= 3
    for q in everyone:
        assert q.output_ids == alone(q.prompt_ids, q.params.max_tokens), q.request_id
    assert s.kv_used() == [0] * world and s.blocks.reserved() == [0] * world
    assert s.blocks.pages_idle() == s.blocks.pages_cached()


def test_a_large_waiting_request_is_passed_at_most_max_overtaken_times():
    from tr_engine.engine.scheduler import MAX_OVERTAKEN

    s = make(world=1, pages=20, seqs=16, waiting=64, chunk=64)
    s.add(hog := seq(0, 40, max_tokens=30))  # 10 of the 20 pages at first, then more
    step_model(s)
    s.add(big := seq(1, 40, max_tokens=2, first=100))  # 10 pages: not while hog runs
    small = [seq(2 + i, 3, max_tokens=2, first=200 + 10 * i) for i in range(MAX_OVERTAKEN + 3)]
    for q in small:
        s.add(q)
    step_model(s)
    # the small ones that fit go past it, up to MAX_OVERTAKEN of them; the rest wait behind it
    went = [q for q in small if q.status is not Status.WAITING]
    assert big.status is Status.WAITING and len(went) == MAX_OVERTAKEN
    assert big.overtaken == MAX_OVERTAKEN
    while True:  # then none goes before it: it is admitted as soon as hog leaves room
        step_model(s)
        if big.status is not Status.WAITING:
            break
        assert all(q.status is Status.WAITING for q in small[MAX_OVERTAKEN:])
    while s.has_work():
        step_model(s)
    assert all(q.output_ids == alone(q.prompt_ids, q.params.max_tokens)
               for q in [hog, big, *small])


# ---- the host tier's index -------------------------------------------------------------------
def test_host_tier_copies_evicted_blocks_out_and_back_in_order_within_its_bound():
    m = BlockManager(1, 2, B, host_slots=2)
    keys = [bytes([i]) * 16 for i in range(4)]
    for key in keys[:2]:  # two cached blocks, idle
        m.reserve([1])
        page = m.take(0)
        m.register(key, 0, page)
        m.unpin(0, page)
    m.reserve([2])
    a, b = m.take(0), m.take(0)  # both evicted: copied to the host first
    assert [(c.page, c.slot, c.to_host) for c in m.drain_copies()] == [(0, 0, True), (1, 1, True)]
    assert m.lookup(keys) == [] and m.lookup_host(keys) == [(0, 0), (0, 1)]
    for key, page in zip(keys[2:], (a, b)):  # two more, evicted in turn: the LRU slot goes
        m.register(key, 0, page)
        m.unpin(0, page)
    m.reserve([1])
    m.take(0)
    assert m.host_used() == [2] and m.lookup_host(keys) == [] and not m.host.has(keys[0])
    assert m.lookup_host(keys[1:]) == [(0, 1), (0, 0)]  # keys[2] took keys[0]'s slot
    m.drain_copies()
    # restoring keys[1] takes the last page, which evicts keys[3]: its copy out goes first,
    # into the slot of keys[2], not into the least recently used one being read from
    m.reserve([1])
    (restored,) = m.restore(m.lookup_host(keys[1:2]), keys[1:2])
    page = restored[1]
    copies = [(c.page, c.slot, c.to_host) for c in m.drain_copies()]
    assert copies == [(page, 0, True), (page, 1, False)]
    assert m.lookup(keys[1:2]) == [restored] and m.host.has(keys[1]) and m.host.has(keys[3])
    assert not m.host.has(keys[2]) and m.pages_offloaded == 4 and m.pages_restored == 1
    assert m.reset() == 0 and m.host_used() == [0] and not m.host.where


def test_idle_blocks_go_to_free_host_slots_ahead_of_eviction_which_then_copies_nothing():
    m = BlockManager(1, 4, B, host_slots=3)
    keys = [bytes([i]) * 16 for i in range(4)]
    m.reserve([3])
    pages = [m.take(0) for _ in range(3)]
    for key, page in zip(keys, pages):
        m.register(key, 0, page)
    m.release([(0, p) for p in pages])  # a document ends: idle tail first
    assert m.write_ahead(2) == 2  # the two evicted first: its tail
    ahead = m.drain_copies()
    assert [(c.page, c.slot, c.to_host, c.ahead) for c in ahead] == \
        [(pages[2], 0, True, 1), (pages[1], 1, True, 1)]
    assert m.lookup(keys[:3]) == [(0, p) for p in pages]  # still cached on the device
    m.pin(0, pages[0])  # in use again: not written ahead while pinned
    assert m.write_ahead(5) == 0 and m.ahead_batches == 1
    m.unpin(0, pages[0])
    assert m.write_ahead(5) == 1 and m.ahead_batches == 2  # the last free slot
    assert [c.ahead for c in m.drain_copies()] == [2]
    # a step that evicts the written-ahead pages copies nothing, and waits for their batches
    plan = StepPlan("decode")
    m.reserve([2])
    m.take(0), m.take(0)  # the free page, then the LRU idle one (pages[2], batch 1)
    assert m.hand_over(plan).copies == [] and plan.copy_wait == 1
    assert m.lookup_host(keys[:3]) == [(0, 2), (0, 1), (0, 0)]
    assert m.hand_over(StepPlan("decode")).copy_wait == 0  # said once
    # a block on the host alone is never pushed out by a write-ahead: no free slot, none
    m.register(keys[3], 0, 3)
    m.unpin(0, 3)
    assert m.write_ahead(5) == 0 and not m.host.has(keys[3])
    m.reserve([3])
    assert [m.take(0) for _ in range(3)] == [1, 0, 3]  # the LRU idle pages: batches 1, 2
    # keys[3]'s eviction copies it into the least recently used slot, keys[2]'s (batch 1)
    copies = m.drain_copies()
    assert [(c.page, c.slot, c.to_host, c.ahead) for c in copies] == [(3, 0, True, 0)]
    assert m.hand_over(StepPlan("decode")).copy_wait == 2
    assert m.pages_written_ahead == 3 and m.pages_offloaded == 4
