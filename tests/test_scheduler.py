"""The scheduler and KV accounting on their own: plain Python, no model, no device."""

from __future__ import annotations

import pytest

from tr_engine.attention import layout
from tr_engine.errors import QueueFull, RequestTooLong
from tr_engine.kv_accounting import SlabAllocator, decode_owner, prompt_share, reservation
from tr_engine.sampling_params import SamplingParams
from tr_engine.scheduler import Scheduler
from tr_engine.sequence import Sequence, Status


def make(world=2, capacity=100, max_len=1000, chunk=16, seqs=4, waiting=8):
    return Scheduler(world, capacity, max_len, chunk, seqs, waiting, lambda new, cached: "ring")


def seq(i, prompt_len, max_tokens=4):
    return Sequence(i, f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(
        max_tokens=max_tokens, temperature=0))


def drive(s: Scheduler, token=7):
    """Run one step with a fake sampled token; return the plan."""
    plan = s.schedule()
    if plan is not None:
        n = 1 if plan.kind == "prefill" else len(plan.decode.seq_ids)
        s.update(plan, [token] * n)
    return plan


def test_reservation_matches_what_prefill_and_decode_store():
    for world, prompt, max_tokens, chunk in [(1, 5, 3, 4), (2, 37, 10, 16), (3, 8, 1, 100),
                                             (4, 3, 9, 2)]:
        need = reservation(prompt, max_tokens, world, chunk)
        assert sum(need) == prompt + max_tokens - 1
        assert sum(prompt_share(prompt, world, chunk)) == prompt
        assert max(need) - min(need) <= 2 + -(-prompt // chunk)  # shards stay even
        owners = [decode_owner(prompt, t, world) for t in range(max_tokens - 1)]
        assert all(0 <= o < world for o in owners)


def test_slab_allocator_first_fit_and_coalescing():
    a = SlabAllocator(10)
    s1, s2, s3 = a.allocate(3), a.allocate(3), a.allocate(3)
    assert (s1, s2, s3) == (0, 3, 6) and a.used == 9
    assert a.allocate(2) is None
    a.free(s2, 3)
    assert a.allocate(4) is None and a.largest_free() == 3
    a.free(s1, 3)
    a.free(s3, 3)
    assert a.largest_free() == 10 and a.used == 0
    assert a.allocate(10) == 0


def test_too_long_is_refused_with_both_numbers():
    s = make(capacity=10, max_len=50)
    with pytest.raises(RequestTooLong, match=r"maximum context length is 50.*needs 60"):
        s.check(40, 20)
    with pytest.raises(RequestTooLong, match=r"KV cache holds 20 tokens.*needs 30"):
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
            assert len(p.tokens) <= 16
    assert kinds == ["prefill", "prefill", "prefill", "decode", "decode"]
    assert a.prefilled == 40 and a.output_ids == [7, 7, 7]
    # 40 prompt tokens in chunks 16, 16, 8 plus two fed tokens, split over the ranks
    assert sum(a.kv_len) == 42
    assert a.kv_len[0] == sum(layout.local_len(n, 2, 0) for n in (16, 16, 8)) + 1


def test_prefill_chunks_interleave_with_running_decodes():
    s = make(world=2, chunk=8, capacity=200)
    s.add(seq(0, 4, max_tokens=50))
    drive(s)  # short prompt: one prefill, now decoding
    s.add(seq(1, 40, max_tokens=2))
    kinds = [drive(s).kind for _ in range(8)]
    assert kinds == ["decode", "prefill"] * 4  # the long prompt never stalls the stream


def test_continuous_batching_join_and_leave():
    s = make(world=1, seqs=8)
    s.add(seq(0, 3, max_tokens=10))
    drive(s)
    s.add(seq(1, 3, max_tokens=10))
    assert drive(s).kind == "decode"  # decode of 0 comes before the next prefill
    assert drive(s).kind == "prefill"  # then 1 joins
    plan = drive(s)
    assert plan.kind == "decode" and plan.decode.seq_ids == [0, 1]
    s.finish(s.find("r0"), "stop")
    plan = drive(s)
    assert plan.decode.seq_ids == [1]


def test_fcfs_admission_waits_for_room_and_abort_frees():
    s = make(world=2, capacity=20, seqs=8)
    big = seq(0, 30, max_tokens=5)  # needs 16 and 18 slots on the two ranks
    s.add(big)
    drive(s)
    drive(s)
    s.add(seq(1, 10, max_tokens=2))
    s.add(seq(2, 1, max_tokens=1))
    plan = drive(s)
    assert plan.kind == "decode" and s.num_waiting == 2  # no room; 2 may not overtake 1
    assert s.kv_used() == big.kv_len
    s.finish(big, "abort")
    assert big.status is Status.FINISHED and s.kv_used() == [0, 0]
    assert s.kv.reserved() == [0, 0]
    drive(s)
    assert s.num_waiting == 0 and s.num_running == 2


def test_abort_while_waiting_and_while_prefilling():
    s = make(world=2, capacity=100, chunk=4)
    a, b = seq(0, 20), seq(1, 5)
    s.add(a)
    s.add(b)
    drive(s)  # first chunk of a
    s.finish(a, "abort")
    s.finish(b, "abort")
    assert not s.has_work() and s.kv.reserved() == [0, 0]
    assert s.schedule() is None
