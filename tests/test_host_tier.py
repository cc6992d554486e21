"""The host-memory tier on 1 and 2 gloo ranks (float32, against transformers): documents
cycling through a KV pool that holds two (sharded, or short ones on one rank each) come
back from host memory whole, and every
output is exactly transformers' greedy; the tier never holds more than its size, and
resetting the prefix cache empties it.

The CPU backend's tier is a second pool in ordinary memory, filled and read by the same
plan entries as a card's pinned one.
"""

from __future__ import annotations

import pytest
from checkpoints import byte_ids as ids
from checkpoints import greedy_reference, make_checkpoint

from tr_engine import LLM, SamplingParams
from tr_engine.kv.block_manager import block_keys

BLOCK, CHUNK = 8, 32
DOC = 64  # tokens: 8 blocks
NEW = 6
SLOTS = 40  # host pages per rank
PAGE_BYTES = 2 * 2 * BLOCK * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, float32
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("llama3.2", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def hf(ckpt):
    return greedy_reference(ckpt)


# (ranks, shard_min_tokens, host pages per rank): sharded documents on 1 and 2 ranks, and on
# 2 ranks short ones, each on one rank (its home: the one caching less) and back to that rank
CASES = [(1, 0, SLOTS), (2, 0, SLOTS), (2, 1024, SLOTS)]


@pytest.fixture(scope="module", params=CASES,
                ids=lambda c: f"P{c[0]}" + ("-short" if c[1] else ""))
def llm(request, ckpt):
    world, shard_min, slots = request.param
    with LLM(ckpt, device="cpu", world_size=world, dtype="float32", block_size=BLOCK,
             prefill_chunk=CHUNK, kv_cache_tokens=20 * BLOCK // world, max_model_len=256,
             shard_min_tokens=shard_min,
             kv_offloading_size=slots * PAGE_BYTES * world / 2**30) as engine:
        yield engine


def run(llm, prompt: list[int]):
    return llm.generate({"prompt_token_ids": prompt}, GREEDY)[0]


def test_the_tier_has_the_size_asked(llm):
    tier = llm.engine.cluster.runner.host_tier
    slots = next(c[2] for c in CASES if c[:2] == (llm.engine.world,
                                                  llm.engine.config.shard_min_tokens))
    assert tier.num_slots == slots and llm.engine.info.page_bytes == PAGE_BYTES
    assert llm.engine.info.host_slots == slots


def test_documents_come_back_from_host_memory_whole(llm, hf):
    s = llm.engine.scheduler
    llm.engine.reset_prefix_cache()
    docs = [ids(DOC, 10 + i) for i in range(5)]  # the pool holds two of them
    for d in docs:
        out = run(llm, d)
        assert out.token_ids == hf(tuple(d), NEW)
    first = s.blocks.lookup(block_keys(docs[0], BLOCK))
    assert len(first) < DOC // BLOCK  # the first document left the cards
    hits, restored = s.host_hit_tokens, s.blocks.pages_restored
    for i in (0, 1, 2):  # each is back whole: from the host where the cards lost it
        prompt = docs[i] + ids(5, 50 + i)
        out = run(llm, prompt)
        assert out.num_cached_tokens == DOC, i
        assert out.token_ids == hf(tuple(prompt), NEW), i
    assert s.host_hit_tokens > hits and s.blocks.pages_restored > restored
    assert s.kv_used() == [0] * s.world


def test_idle_documents_are_on_the_host_before_their_eviction(llm, hf):
    """Write-ahead: while later work runs, an idle document is copied to free host slots, so
    a follow-up that brings another document back from the host and evicts it for the pages
    copies only one way (no eviction copy in its step), and every output is exact."""
    s = llm.engine.scheduler
    b = s.blocks
    llm.engine.reset_prefix_cache()
    docs = [ids(DOC, 200 + i) for i in range(3)]  # the pool holds two
    for d in docs:
        assert run(llm, d).token_ids == hf(tuple(d), NEW)
    run(llm, ids(3, 70))  # a short request: steps in which the last document's go ahead
    assert b.pages_written_ahead > 0
    evictions = b.pages_offloaded - b.pages_written_ahead
    prompt = docs[0] + ids(5, 60)
    out = run(llm, prompt)  # from the host, evicting another document's pages
    assert out.num_cached_tokens == DOC and out.token_ids == hf(tuple(prompt), NEW)
    assert b.pages_offloaded - b.pages_written_ahead == evictions
    assert b.lookup_host(block_keys(docs[1], BLOCK)) != []


def test_the_host_bound_holds_and_reset_empties_it(llm, hf):
    s = llm.engine.scheduler
    docs = [ids(DOC, 100 + i) for i in range(12 * s.world)]  # far more than the tier holds
    for d in docs:
        run(llm, d)
        assert all(n <= s.blocks.host.ranks[0].num_slots for n in s.blocks.host_used())
    assert max(s.blocks.host_used()) == s.blocks.host.ranks[0].num_slots  # full, never over
    prompt = docs[0] + [1, 2, 3]  # the oldest left the host tier too: computed again
    out = run(llm, prompt)
    assert out.num_cached_tokens < DOC and out.token_ids == hf(tuple(prompt), NEW)
    llm.engine.reset_prefix_cache()
    assert s.blocks.host_used() == [0] * s.world and not s.blocks.host.where
    assert s.blocks.pages_cached() == [0] * s.world and s.kv_used() == [0] * s.world
    assert s.blocks.reserved() == [0] * s.world


def test_page_copies_move_every_pooled_tensor_in_any_page_order():
    """The rank's copies alone, on the CPU pool: pages out to slots in scattered and reversed
    orders (as tail-first eviction hands them out), the pool overwritten, then back into
    other pages: every tensor of every page comes back bit for bit, and a slot written
    twice in one plan holds the later page."""
    import torch
    from tr_engine.backends import get_backend

    from tr_engine.kv.cache import KVCache
    from tr_engine.kv.host_tier import HostTier
    from tr_engine.plan import PageCopy

    cache = KVCache(3, 12, 4, 2, 5, torch.float32, torch.device("cpu"))
    for t in cache.tensors():
        t.copy_(torch.randn(t.shape))
    tier = HostTier(cache, 8, get_backend("cpu"), torch.device("cpu"))
    tier.piece = 3  # several gathers per batch

    def page(p):
        return [t[:, p * 4 : (p + 1) * 4].clone() for t in cache.tensors()]

    before = {p: page(p) for p in range(12)}
    out = [(11, 0), (10, 1), (9, 2), (3, 5), (0, 4), (7, 3), (5, 6), (6, 6)]  # slot 6 twice
    tier.copy([PageCopy(0, p, s, to_host=True) for p, s in out])
    for t in cache.tensors():
        t.zero_()
    back = [(0, 11), (1, 2), (2, 1), (5, 8), (4, 0), (3, 5), (6, 4)]  # slot -> page
    tier.copy([PageCopy(0, p, s, to_host=False) for s, p in back])
    source = {s: p for p, s in out}  # the last page written to each slot
    for s, p in back:
        for got, want in zip(page(p), before[source[s]]):
            assert torch.equal(got, want), (s, p)
    assert torch.count_nonzero(page(9)[0]) == 0  # untouched pages stay as they were


def test_each_attention_layer_waits_for_its_layer_of_the_copies():
    """A forward whose step restored pages layer by layer: each attention layer waits for
    its own layer's event (the stand-in's events count the waits) before it attends."""
    import torch
    from npu_standin import Event

    from tr_engine.layers.attention import Attention
    from tr_engine.layers.context import ForwardContext, forward_context

    events = [Event() for _ in range(3)]
    for e in events:
        e.record()
    seen = []

    class Step(ForwardContext):
        def attention(self, layer, q, k, v, scale):
            seen.append((layer, [e.waited for e in events]))
            return q

    ctx = Step()
    ctx.layer_ready = events
    q, kv = torch.zeros(2, 2, 4), torch.zeros(2, 1, 4)
    with forward_context(ctx):
        for layer in range(3):
            Attention(layer, 2, 1, 4)(q, kv, kv)
    assert seen == [(0, [1, 0, 0]), (1, [1, 1, 0]), (2, [1, 1, 1])]


def test_copy_batches_keep_every_dependency_and_stay_few():
    """Copies reordered into batches (host_tier._batches) leave the pool and the tier as the
    copies in their given order would; evictions interleaved with the restores that reuse
    their pages make two batches, not one a copy (on one H100 a follow-up's 15,000
    interleaved copies took 25 s as single-copy batches)."""
    import random

    from tr_engine.kv.host_tier import _batches
    from tr_engine.plan import PageCopy

    def run(order, pool, host):
        pool, host = dict(pool), dict(host)
        for c in order:
            if c.to_host:
                host[c.slot] = pool[c.page]
            else:
                pool[c.page] = host[c.slot]
        return pool, host

    rng = random.Random(0)
    for _ in range(300):
        pool = {p: f"p{p}" for p in range(6)}
        host = {s: f"s{s}" for s in range(6)}
        copies = [PageCopy(0, rng.randrange(6), rng.randrange(6), rng.random() < 0.5)
                  for _ in range(rng.randrange(1, 12))]
        batches = _batches(copies)
        assert sorted(map(id, copies)) == sorted(id(c) for b in batches for c in b)
        for b in batches:
            assert len({c.to_host for c in b}) == 1
            assert len({c.page for c in b}) == len(b) == len({c.slot for c in b})
        shuffled = [c for b in batches for c in rng.sample(b, len(b))]
        assert run(shuffled, pool, host) == run(copies, pool, host)
    interleaved = [c for i in range(1000) for c in (PageCopy(0, i, 5000 + i, True),
                                                     PageCopy(0, i, i, False))]
    assert [len(b) for b in _batches(interleaved)] == [1000, 1000]


def test_slots_held_for_a_restore_are_never_reused_and_come_back_most_recent():
    from tr_engine.kv.host_pages import HostIndex

    index = HostIndex(1, 4)
    for i in range(4):
        assert index.put(b"k%d" % i, 0) == i
    index.hold([(0, 0), (0, 2)])  # being restored from
    assert index.put(b"new1", 0) == 1  # the least recent slot not held
    assert index.put(b"new2", 0) == 3
    assert index.put(b"new3", 0) == 1  # the held ones are skipped, however many puts
    index.touch(b"k0")  # a held slot touched meanwhile: nothing to move yet
    index.release()
    assert list(index.ranks[0].used) == [3, 1, 0, 2]  # held ones back as the most recent
    assert index.lookup([b"k0"]) == [(0, 0)] and not index.has(b"k1")
    index.hold([(0, 3), (0, 1), (0, 0), (0, 2)])
    assert index.put(b"x", 0) is None  # every slot held: no slot, the block not kept
    index.release()


class Streams:
    """A backend of named streams and counting events, standing in for a device's: each
    stream operation, event and layer copy is logged as (stream, what, which)."""

    def __init__(self, monkeypatch, done=lambda n: True):
        import contextlib

        from tr_engine.kv.host_tier import HostTier

        self.log = log = []
        serial = iter(range(10**6))

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                log.append((self.name, "waits stream", other.name))

        class Event:
            def __init__(self, timing=False):
                self.timing, self.n = timing, next(serial)

            def record(self, stream):
                log.append((stream.name, "record", self.n))

            def wait(self, stream=None):  # None: the current stream, as torch's
                log.append(((stream or now[-1]).name, "wait", self.n))

            def query(self):
                return done(self.n)

            def elapsed_time(self, end):
                return 0.0

        streams = iter([Stream("copies"), Stream("evictions")])
        self.now = now = [Stream("main")]
        self.new_stream = lambda: next(streams)
        self.current_stream = lambda: now[-1]
        self.new_event = lambda timing=False: Event(timing)
        self.synchronize = lambda: log.append(("host", "synchronize", None))

        @contextlib.contextmanager
        def stream(s):
            now.append(s)
            yield
            now.pop()

        self.stream = stream
        real = HostTier._layer

        def layer(tier, pieces, at, buffer):
            log.append((now[-1].name, "evict" if pieces[0][0] else "restore", at))
            # each stream stages its pieces in a buffer of its own, made once
            assert buffer is (tier._out if now[-1].name == "evictions" else tier._in)
            assert tier._out is not tier._in
            real(tier, pieces, at, buffer)

        monkeypatch.setattr(HostTier, "_layer", layer)

    def tier(self, layers: int):
        import torch

        from tr_engine.kv.cache import KVCache
        from tr_engine.kv.host_tier import HostTier

        cache = KVCache(layers, 8, 4, 2, 5, torch.float32, torch.device("cpu"))
        for t in cache.tensors():
            t.copy_(torch.randn(t.shape))
        tier = HostTier(cache, 8, self, torch.device("cpu"))
        assert tier.out_stream.name == "evictions"
        # it warmed both paths up, a page there and back, before anything else
        there_and_back = [("evictions", "evict"), ("copies", "restore")] * layers
        ahead = [("evictions", "evict")] * layers
        assert [e[:2] for e in self.log if e[1] in ("evict", "restore")] == there_and_back + ahead
        assert self.log[-1] == ("host", "synchronize", None)
        del self.log[:]
        return tier


def test_evictions_run_beside_the_restores_each_layer_after_its_evictions(monkeypatch):
    """With copy streams (CUDA, NPU), a follow-up's evictions (all before its restores) go on
    a stream of their own: layer l's restores wait on the device for an event recorded after
    layer l's evictions, and the pages end as the copies in order would leave them."""
    import torch

    from tr_engine.plan import PageCopy

    layers = 3
    streams = Streams(monkeypatch)
    log = streams.log
    tier = streams.tier(layers)
    cache = tier.cache
    tier.copy([PageCopy(0, p, p, to_host=True) for p in (4, 5)])  # two slots filled
    del log[:]

    def page(p):
        return [t[:, p * 4 : (p + 1) * 4].clone() for t in cache.tensors()]

    before = {p: page(p) for p in range(8)}
    # a follow-up: evict page p to a slot, restore slot 4 or 5 into p, and so on
    copies = [c for p, src in ((0, 4), (1, 5)) for c in (PageCopy(0, p, p, to_host=True),
                                                        PageCopy(0, p, src, to_host=False))]
    events = tier.copy(copies + [PageCopy(0, 2, 6, to_host=True, ahead=1)], timed=True,
                       layered=True)
    assert len(events) == layers
    # a layer's copies are queued when the forward asks for its event, not before: a kernel
    # the forward loads at first launch waits behind one layer's copies, not all of them
    queued = lambda: [e[1:] for e in log if e[1] in ("evict", "restore")]  # noqa: E731
    assert queued() == []
    events[1].wait()
    assert queued() == [("evict", 0), ("restore", 0), ("evict", 1), ("restore", 1)]
    events[1].wait()  # asked again: nothing more
    assert len(queued()) == 4
    tier.finish()  # the layers the forward did not reach, then the copy ahead of eviction
    assert queued() == [(w, at) for at in range(layers) for w in ("evict", "restore")] + \
        [("evict", at) for at in range(layers)]
    assert log.index(("copies", "restore", layers - 1)) < log.index(
        ("main", "waits stream", "copies"))
    for at in range(layers):
        ev = log.index(("evictions", "evict", at))
        rec = next(i for i in range(ev, len(log)) if log[i][:2] == ("evictions", "record"))
        waited = log.index(("copies", "wait", log[rec][2]))
        assert ev < rec < waited < log.index(("copies", "restore", at))
    for p, src in ((0, 4), (1, 5)):
        for got, want in zip(page(p), before[src]):
            assert torch.equal(got, want)
    assert torch.equal(tier.host[0][:, 0], before[0][0].reshape(layers, -1))


def test_copies_ahead_of_eviction_wait_for_nothing_and_are_waited_for_by_batch(monkeypatch):
    """Write-ahead copies go on the evictions' stream after the main stream's work so far
    and after the step's own copies; the main stream waits for none of them, until a step
    names a batch (wait_ahead): then for the last event of a batch up to it, not for later
    batches, and not for batches already done."""
    import torch

    from tr_engine.plan import PageCopy

    done = set()
    streams = Streams(monkeypatch, done=lambda n: n in done)
    log = streams.log
    tier = streams.tier(2)
    before = [t[:, :4].clone() for t in tier.cache.tensors()]  # page 0
    # a decode step's own eviction of page 1, then batch 1 writes page 0 ahead
    tier.copy([PageCopy(0, 1, 1, to_host=True), PageCopy(0, 0, 0, to_host=True, ahead=1)])
    own = log.index(("main", "waits stream", "copies"))
    ahead = log.index(("evictions", "waits stream", "main"))
    assert log.index(("copies", "evict", 0)) < own < ahead < log.index(("evictions", "evict", 0))
    first = log[-1]
    assert first[:2] == ("evictions", "record")
    assert not any(e[0] == "main" and e[1] == "wait" for e in log)  # no forward waits
    for host, want in zip(tier.host, before):
        assert torch.equal(host[:, 0], want.reshape(2, -1))
    tier.copy([PageCopy(0, 2, 2, to_host=True, ahead=2)])
    second = log[-1]
    tier.copy([PageCopy(0, 3, 3, to_host=True, ahead=4)])
    del log[:]
    tier.wait_ahead(3)  # batches 1 and 2: the second's event covers the first
    assert log == [("main", "wait", second[2])]
    done.update({first[2], second[2]})
    del log[:]
    tier.wait_ahead(3)  # both done: nothing to wait for
    tier.wait_ahead(0)
    assert log == []
