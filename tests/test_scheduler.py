"""The scheduler, KV blocks and the prefix cache on their own: plain Python, no model, no
device."""

from __future__ import annotations

import pytest

from tr_engine.attention import layout
from tr_engine.errors import QueueFull, RequestTooLong
from tr_engine.kv_blocks import BlockManager, block_keys, chunk_blocks, plan_ranks
from tr_engine.sampling_params import SamplingParams
from tr_engine.scheduler import Scheduler
from tr_engine.sequence import Sequence, Status

B = 4  # block size in these tests


def make(world=2, pages=25, max_len=1000, chunk=16, seqs=4, waiting=8, caching=True):
    return Scheduler(world, pages, B, max_len, chunk, seqs, waiting,
                     lambda new, cached: "ring", caching)


def seq(i, prompt_len, max_tokens=4, first=1):
    return Sequence(i, f"r{i}", list(range(first, first + prompt_len)), SamplingParams(
        max_tokens=max_tokens, temperature=0))


def drive(s: Scheduler, token=7):
    """Run one step with a fake sampled token; return the plan."""
    plan = s.schedule()
    if plan is not None:
        n = 1 if plan.kind == "prefill" else len(plan.decode.seq_ids)
        s.update(plan, [token] * n)
    return plan


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
                assert layout.owner(n, world, pos - start, B)[0] == rank
    for r in range(world):  # a rank's real tokens fill its blocks in order
        count = sum(1 for _, rr in blocks if rr == r)
        assert -(-layout.local_len(n, world, r, B) // B) == count


def test_plan_ranks_counts_every_block_and_balances_decode():
    for world, prompt, total, chunk in [(1, 5, 7, 8), (2, 37, 60, 16), (3, 8, 9, 24),
                                        (4, 3, 40, 32)]:
        ranks = plan_ranks([], prompt, total, chunk, world, B)
        assert len(ranks) == -(-total // B)
        counts = [ranks.count(r) for r in range(world)]
        assert max(counts) - min(counts) <= 2 + -(-prompt // chunk)


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
    kinds = [drive(s).kind for _ in range(8)]
    assert kinds == ["decode", "prefill"] * 4  # the long prompt never stalls the stream


def test_continuous_batching_join_and_leave():
    s = make(world=1, seqs=8)
    s.add(seq(0, 3, max_tokens=10))
    drive(s)
    s.add(seq(1, 3, max_tokens=10, first=50))
    assert drive(s).kind == "decode"  # decode of 0 comes before the next prefill
    assert drive(s).kind == "prefill"  # then 1 joins
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
    assert [p.prefill.seq_id for p in plans if p.kind == "prefill"] == [0, 0, 0, 1]
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
    # a request that needs 5 pages: admitted at once, evicting the oldest document's blocks
    e = seq(9, 20, max_tokens=1, first=5000)
    s.add(e)
    s.schedule()
    assert e.status is Status.PREFILLING
    s.finish(e, "abort")
    hits = {}
    for i in (2, 0):  # doc 2 is intact; doc 0, the least recently used, went first
        d = seq(10 + i, 16, max_tokens=1, first=100 * i + 1)
        s.add(d)
        run_all(s)
        hits[i] = d.num_cached
    assert hits == {2: 12, 0: 0}


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


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_tables_follow_the_scheduler_under_random_traffic(world):
    """Random arrivals, lengths, shared prefixes and early stops: after every step, the
    table each rank built from the ops holds exactly each running sequence's pages there,
    and each decode token's slot lies in a page of its owner's table."""
    import random

    rnd = random.Random(world)
    s = make(world=world, pages=40, max_len=200, chunk=2 * world * B * 2, seqs=6, waiting=64)
    tables = RankTables(world, 7)
    docs = [[rnd.randint(1, 50) for _ in range(24)] for _ in range(3)]
    pending = []
    for i in range(60):
        prompt = rnd.choice(docs)[: rnd.randint(1, 24)] + [rnd.randint(1, 50)
                                                          for _ in range(rnd.randint(0, 9))]
        pending.append(Sequence(i, f"r{i}", prompt, SamplingParams(
            max_tokens=rnd.randint(1, 12), temperature=0)))
    decode_steps = 0
    for _ in range(5000):
        while pending and rnd.random() < 0.3:
            s.add(pending.pop(0))
        plan = s.schedule()
        if plan is None:
            if not pending:
                break
            continue
        tables.apply(plan)
        if plan.kind == "decode":
            decode_steps += 1
            d = plan.decode
            for row, kv, owner in zip(d.rows, d.kv_len, d.owner):
                assert kv[owner] // B < len(tables.host[owner][row])
        n = 1 if plan.kind == "prefill" else len(plan.decode.seq_ids)
        for q in s.update(plan, [rnd.choice([5, 5, 5, 2]) for _ in range(n)]):
            if q.output_ids[-1] == 2 or len(q.output_ids) >= q.params.max_tokens:
                s.finish(q, "stop")
        for q in s.prefilling + s.decoding:
            if q.started:
                for r in range(world):
                    assert tables.host[r][q.row] == q.table[r]
    assert not pending and not s.has_work() and decode_steps > 50
    assert s.blocks.hits > 0 and s.blocks.pages_in_use() == [0] * world
