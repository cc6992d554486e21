"""The scheduler: which work runs next. Pure Python; it emits plain StepPlans.

Policy:
- KV pages are taken as they are written. Admission reserves the pages of a request's
  prompt past its cached prefix (see kv.block_manager), and, while others run, leaves a
  small watermark (1% of a rank's pages) free for their decodes; a decoding sequence takes
  a page when its next token opens a block. Cached pages that no request uses count as free: they
  are evicted when needed. A request whose prompt + max_tokens could never fit the pool or
  the context is refused before it queues (`check`).
- Admission goes in arrival order, fewer than max_num_seqs running. A request whose prompt
  does not fit yet is passed by later ones that do (a small request is not stuck behind a
  large one), but only `MAX_OVERTAKEN` times: then nothing is admitted before it, and it
  goes in as soon as running requests free its room.
- Preemption (vLLM's way): when a decoding sequence needs a page and every rank it may
  use is full, the most recently admitted running sequence is preempted: its pages are
  freed (its cached blocks stay in the prefix cache, evictable tail first) and it goes to
  the front of the queue, before every arrival. It resumes with a prefill of its prompt and
  the tokens it has generated so far, through the prefix cache where its blocks survive,
  and samples its next token from the last one's logits: the same tokens it would have had,
  its stream only pauses; its prefill goes before the others'. No request is admitted in a
  step that preempted. A running sequence's KV is never dropped otherwise.
- Prefix caching: a prompt whose leading blocks are cached reuses their KV and prefills
  only the rest (a partial prefill over the cached prefix). The cache is looked up again
  when a sequence's prefill starts, so a request admitted while another one was prefilling
  the same document reuses that KV instead of storing it twice.
- With nothing decoding, a prompt is prefilled in chunks of at most `prefill_chunk` tokens
  (a multiple of 2P blocks, so chunks stay block-aligned), one sequence per step.
- Short prompts are not sharded (`shard_min_tokens`): a request whose prompt is shorter
  lives on one rank, its *home*: its KV on that card alone, its prefill and decode computed
  there only, so the ranks serve different short requests side by side (data parallel)
  while long prompts shard over all of them. The home is the least loaded rank (load: the
  rank's short requests, each a decode token per step plus `prefix_cost` x its KV), or the
  rank holding its prompt's cached prefix (a chat's next turn) when that one has at most
  one request's load more. Sharding a short prompt only makes every card compute every one
  of its tokens; it is sharded all the same when no rank has room for all of its KV but
  the ranks together have.
- While any request decodes, every step is a *mixed* step: one forward carries every
  decoding sequence's next token plus prefill work cut to the step's token budget
  (`max_num_batched_tokens`, per rank: the tokens each card computes). The budget counts a
  new prompt token as its own layers plus its attention over the tokens before it
  (`prefix_cost` per earlier token, from the model's shape), so a chunk deep in a long
  prompt is shorter and every step costs about the same: streams keep flowing at a bounded
  gap during any prefill.
- Prefill turns: a step carries at most one sharded chunk and, on each rank, at most one
  chunk of a short prompt homed there. The prompt with the fewest tokens left goes first
  (a short prompt does not wait for a long prefill), but one passed over `MAX_PASSED_OVER`
  turns in a row goes next, so none starves: short prompts take a rank's budget before the
  sharded chunk, except after it has yielded `MAX_PASSED_OVER` steps in a row. A prompt
  whose next block another prefilling request is about to store waits for it rather than
  computing it again.
- A request that wants its prompt logprobs is sharded and prefills in steps of its own
  (they return every position's logits), alternating with the other steps.
- Host tier (`info.host_slots`): a sharded prompt whose cached prefix goes on in host
  memory past the device's blocks gets those blocks copied back into fresh pages at
  admission (the copies run before its prefill, `StepPlan.copies`), if their pages fit;
  else they are computed again. A preempted sequence's full blocks go to the host tier
  like any evicted cached block, and come back from there when it resumes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..distributed import padding
from ..errors import QueueFull, RequestTooLong
from ..kv.block_manager import BlockManager, block_keys, chunk_blocks, plan_pages
from ..plan import ClusterInfo, DecodePlan, PrefillPlan, StepPlan, TableOp
from .sequence import Sequence, Status

if TYPE_CHECKING:
    from ..config import EngineConfig

Ops = dict[tuple[int, int], TableOp]  # a step's table updates by (rank, row)

MAX_PASSED_OVER = 4  # prefill turns a prompt may lose in a row to shorter ones
MAX_OVERTAKEN = 8  # admissions ahead of a request waiting for memory, then it goes next
# host tier write-ahead a step, per rank: this much, and this much more per token the rank
# computes (about what a PCIe 5 link moves while an 8B-class model computes a token)
AHEAD_BYTES = 256 * 2**20
AHEAD_BYTES_PER_TOKEN = 2**20


class Scheduler:
    """Rank 0's plans over `config.sequence_parallel_size` ranks whose pools and context
    `info` describes; `choose_strategy(new tokens, cached tokens)` names a sharded chunk's
    attention strategy."""

    def __init__(self, config: EngineConfig, info: ClusterInfo,
                 choose_strategy: Callable[[int, int], str]) -> None:
        self.world = world = config.sequence_parallel_size
        self.block_size = block_size = info.block_size
        self.blocks = BlockManager(world, info.num_pages, block_size,
                                   config.enable_prefix_caching, info.host_slots)
        self.page_bytes = info.page_bytes if info.host_slots else 0  # 0: no write-ahead
        self.host_hit_tokens = 0  # prompt tokens whose KV came back from the host tier
        self.max_model_len = info.max_model_len
        # whole blocks in every zigzag piece, and no padding inside a long prompt
        self.step_tokens = 2 * world * block_size
        self.prefill_chunk = self._aligned(config.prefill_chunk)
        # the token budget of a mixed step (None: whole chunks, as with nothing decoding)
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.prefix_cost = info.prefix_cost  # a key a new token attends, in its layers' units
        # prompts shorter than this live on one rank (0: every prompt is sharded)
        self.shard_min_tokens = config.shard_min_tokens if world > 1 else 0
        self.max_num_seqs = config.max_num_seqs
        self.max_waiting = config.max_waiting
        self.choose_strategy = choose_strategy
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []
        self.free_rows = list(range(self.max_num_seqs - 1, -1, -1))
        self.scratch_row = self.max_num_seqs  # for prompt_logits
        self._last_kind = "other"  # or "scored": a prompt_logprobs request's own step
        self._sharded_waits = 0  # steps in a row the sharded chunk yielded to short prompts
        # pages kept free for running decodes when admitting (vLLM's watermark, 1%)
        self.watermark = max(1, info.num_pages // 100)
        self._admissions = 0  # admission counter: Sequence.admitted
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------
    def _pages(self, cached_ranks: list[int], prompt_len: int, total: int) -> list[int]:
        """New pages per rank a sequence takes after its cached blocks to hold `total` KV
        positions: its prefill of `prompt_len` tokens, then decode blocks."""
        held = [0] * self.world
        for r in cached_ranks:
            held[r] += 1
        return plan_pages(held, len(cached_ranks) * self.block_size, prompt_len, total,
                          self.prefill_chunk, self.world, self.block_size)

    def _replan(self, seq: Sequence, first: int) -> bool:
        """Re-reserve `seq`'s pages for a next chunk of `first` tokens (then whole chunks);
        False, with the reservation unchanged, if that does not fit."""
        need = plan_pages([len(t) for t in seq.table], seq.prefilled, seq.prefill_len,
                          seq.prefill_len, self.prefill_chunk, self.world, self.block_size,
                          first)
        if need == seq.reserved:
            return True
        self.blocks.unreserve(seq.reserved)
        if not self.blocks.can_reserve(need, []):
            self.blocks.reserve(seq.reserved)
            return False
        self.blocks.reserve(need)
        seq.reserved = need
        return True

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse, before any work, a request that could never run."""
        if prompt_len < 1:
            raise RequestTooLong("the prompt is empty; it needs at least one token")
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise RequestTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens, but the "
                f"request needs {total} ({prompt_len} in the prompt + {max_tokens} max_tokens)"
            )
        # over its life: the last generated token is never fed back, its KV never stored
        need = self._pages([], prompt_len, total - 1)
        if max(need) > self.blocks.num_pages:
            b = self.block_size
            capacity = self.blocks.num_pages * b * self.world
            per_rank = ""
            if self.world > 1:
                per_rank = f" ({self.blocks.num_pages * b} on each of {self.world} ranks)"
            raise RequestTooLong(
                f"the KV cache holds {capacity} tokens{per_rank}, but the request needs "
                f"{total} ({prompt_len} in the prompt + {max_tokens} max_tokens; "
                f"{max(need) * b} on one rank)"
            )

    def add(self, seq: Sequence) -> None:
        self.check(seq.prompt_len, seq.params.max_tokens)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the queue is full ({self.max_waiting} requests waiting)")
        # a request that wants every prompt position's logprobs computes every position
        if self.blocks.enable_caching and seq.params.prompt_logprobs is None:
            # at least the last prompt token is computed: its logits give the first token
            seq.keys = block_keys(seq.prompt_ids, self.block_size,
                                  (seq.prompt_len - 1) // self.block_size)
        seq.kv_len = [0] * self.world
        seq.table = [[] for _ in range(self.world)]
        self.waiting.append(seq)

    def _is_short(self, seq: Sequence) -> bool:
        """Whether `seq` runs on one rank: a prompt under shard_min_tokens, all of whose KV
        over its life fits one rank's pool (prompt logprobs come from the sharded
        prefill)."""
        life = -(-(seq.prompt_len + seq.params.max_tokens - 1) // self.block_size)
        return (seq.prompt_len < self.shard_min_tokens and seq.params.prompt_logprobs is None
                and life <= self.blocks.num_pages)

    def _usable(self, seq: Sequence, hits: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The cached blocks `seq` can attend: all (a sharded prefix may lie anywhere), or for
        a short request the leading ones on its home rank."""
        if seq.home < 0:
            return hits
        n = next((i for i, (r, _) in enumerate(hits) if r != seq.home), len(hits))
        return hits[:n]

    def _need(self, seq: Sequence, hits: list[tuple[int, int]]) -> list[int]:
        """New pages per rank `seq`'s prefill takes after its cached blocks `hits`."""
        if seq.home < 0:
            return self._pages([r for r, _ in hits], seq.prefill_len, seq.prefill_len)
        need = [0] * self.world
        need[seq.home] = -(-seq.prefill_len // self.block_size) - len(hits)
        return need

    def _margin(self) -> int:
        """Pages an admission leaves free on each rank it uses: none on an idle engine (a
        request as large as the pool still runs), else the watermark."""
        return self.watermark if self.prefilling or self.decoding else 0

    def loads(self) -> list[float]:
        """Each rank's short requests: a decode token per step each, plus the attention over
        their KV (prefix_cost per key), in tokens of work per step."""
        load = [0.0] * self.world
        for s in (*self.prefilling, *self.decoding):
            if s.home >= 0:
                load[s.home] += 1 + self.prefix_cost * s.num_tokens
        return load

    def _place(self, seq: Sequence, hits: list[tuple[int, int]],
               host: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
        """Choose a short request's home (see the module's policy) among the ranks where its
        pages fit; returns the cached blocks it uses there, None if no rank has room. The
        rank that holds its first cached block (on the card, else in the host tier, `host`
        after `hits`) goes first unless it is busier than the others."""
        load = self.loads()
        # ties (an idle engine): the rank caching the least, so documents spread over the
        # ranks' pools instead of evicting each other on one
        cached = self.blocks.pages_cached()
        order = sorted(range(self.world), key=lambda r: (load[r], cached[r], r))
        first = hits[0][0] if hits else host[0][0] if host else None
        if first is not None and load[first] <= load[order[0]] + 1:
            order.remove(first)
            order.insert(0, first)
        for r in order:
            seq.home = r
            mine = self._usable(seq, hits)
            if self.blocks.can_reserve(self._need(seq, mine), mine, self._margin()):
                return mine
        seq.home = -1
        return None

    def _admit(self) -> None:
        """Admit waiting requests in order while their prompts fit (see the policy)."""
        passed: list[Sequence] = []  # waiting for memory, passed by the ones after them
        for seq in list(self.waiting):
            if len(self.prefilling) + len(self.decoding) >= self.max_num_seqs:
                return
            if not self._try_admit(seq):
                if seq.preemptions or seq.overtaken >= MAX_OVERTAKEN:
                    return  # nothing goes before it
                passed.append(seq)
                continue
            for p in passed:
                p.overtaken += 1

    def _try_admit(self, seq: Sequence) -> bool:
        hits = self.blocks.lookup(seq.keys)
        host = self.blocks.lookup_host(seq.keys[len(hits) :])
        placed = self._place(seq, hits, host) if self._is_short(seq) else None
        if placed is not None:  # a short request: what follows its blocks on its home rank
            # comes back from the host tier there (the same pages: a block restored takes
            # the page it would otherwise compute into)
            if len(placed) != len(hits):  # its cached run ends sooner on its home
                host = self.blocks.lookup_host(seq.keys[len(placed) :])
            hits, host = placed, self._usable(seq, host)
        elif host and self._fits_with(seq, hits, host):
            pass  # (the host's blocks come back too)
        elif not self.blocks.can_reserve(self._need(seq, hits), hits, self._margin()):
            return False  # (a short one that no rank has room for is sharded if that fits)
        else:
            host = []
        need = self._need(seq, hits + host)  # new pages after the device's and host's blocks
        self.waiting.remove(seq)
        for r, page in hits:
            self.blocks.pin(r, page)
        if host:
            self.blocks.reserve([sum(1 for r, _ in host if r == rank)
                                 for rank in range(self.world)])
            hits = hits + self.blocks.restore(host, seq.keys[len(hits) :])
            self.host_hit_tokens += len(host) * self.block_size
        self.blocks.reserve(need)
        seq.reserved = need
        self._set_cached(seq, hits)
        seq.row = self.free_rows.pop()
        seq.status = Status.PREFILLING
        seq.admitted, self._admissions = self._admissions, self._admissions + 1
        self.prefilling.append(seq)
        return True

    def _fits_with(self, seq: Sequence, hits: list[tuple[int, int]],
                   host: list[tuple[int, int]]) -> bool:
        """Whether a sharded `seq` fits with its host-tier blocks `host` restored after its
        device blocks `hits`: a page for each of those too."""
        need = self._need(seq, hits + host)
        for r, _ in host:
            need[r] += 1
        return self.blocks.can_reserve(need, hits, self._margin())

    def _set_cached(self, seq: Sequence, hits: list[tuple[int, int]]) -> None:
        seq.blocks = list(hits)
        seq.table = [[] for _ in range(self.world)]
        for r, page in hits:
            seq.table[r].append(page)
        seq.kv_len = [len(t) * self.block_size for t in seq.table]
        seq.prefilled = len(hits) * self.block_size
        if not seq.preemptions:  # what the request's output reports: its first admission's
            seq.num_cached = seq.prefilled
        seq.registered = len(hits)

    def _relookup(self, seq: Sequence) -> None:
        """Just before a sequence's prefill starts: blocks cached since its admission (by a
        request on the same document that prefilled first) are used instead of computed."""
        hits = self._usable(seq, self.blocks.lookup(seq.keys))
        if len(hits) <= len(seq.blocks):
            return
        extra = hits[len(seq.blocks) :]  # the first ones are seq's, pinned: still cached
        self.blocks.unreserve(seq.reserved)
        need = self._need(seq, hits)
        if not self.blocks.can_reserve(need, extra):
            self.blocks.reserve(seq.reserved)
            return
        for r, page in extra:
            self.blocks.pin(r, page)
        self.blocks.reserve(need)
        seq.reserved = need
        self._set_cached(seq, hits)

    def _take(self, seq: Sequence, rank: int, ops: Ops, reserved: bool = True) -> None:
        """A new block of `seq` on `rank`: a page from its reservation (else one no one has
        reserved), and the table op that tells the rank (one op per rank and row: several
        sequences of one decode step can open blocks on the same rank)."""
        page = self.blocks.take(rank, reserved)
        if reserved:
            seq.reserved[rank] -= 1
        op = ops.get((rank, seq.row))
        if op is None:
            op = ops[rank, seq.row] = TableOp(rank, seq.row, len(seq.table[rank]), [])
        op.pages.append(page)
        seq.table[rank].append(page)
        seq.blocks.append((rank, page))

    # ---- steps -----------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step, or None when there is nothing to do."""
        plan = self._schedule()
        if plan is not None:  # the host tier's copies, before the pages are written
            if self.page_bytes:
                self.blocks.write_ahead(self._ahead_budget(plan))
            self.blocks.hand_over(plan)
        return plan

    def _ahead_budget(self, plan: StepPlan) -> int:
        """Pages per rank this step may copy to the host ahead of their eviction: about as
        many bytes as the link moves while the step computes, by its tokens (a long
        prompt's chunk, a sequence's decode token), so a follow-up's restores never queue
        behind a backlog of them."""
        per_rank = -(-plan.num_tokens // self.world)
        return (AHEAD_BYTES + AHEAD_BYTES_PER_TOKEN * per_rank) // self.page_bytes

    def _schedule(self) -> StepPlan | None:
        ops: Ops = {}
        if not self._grow(ops):  # pages for the decodes first; no admission if that preempted
            self._admit()
        sharded = [s for s in self.prefilling if s.home < 0]
        short = [s for s in self.prefilling if s.home >= 0]
        seq = self._next_prefill(sharded) if sharded else None
        if seq is not None and seq.params.prompt_logprobs is not None:
            if (not self.decoding and not short) or self._last_kind != "scored":
                self._last_kind = "scored"  # a scored prompt: steps of its own
                plan = self._prefill_plan(seq, ops, self.prefill_chunk)
                return StepPlan("prefill", prefill=plan, tables=list(ops.values()))
            seq = None  # this step is the others'
        self._last_kind = "other"
        # the tokens each rank computes so far: every decode token (the budget is per rank)
        used = [0] * self.world
        for s in self.decoding:
            for r in (range(self.world) if s.home < 0 else (s.home,)):
                used[r] += 1
        budget = self.max_num_batched_tokens if self.decoding else None
        first = seq is not None and (not short or self._sharded_waits >= MAX_PASSED_OVER)
        prefill = self._sharded_chunk(seq, ops, budget, used, True) if first else None
        local = self._short_chunks(short, ops, budget, used)
        if seq is not None and not first:
            prefill = self._sharded_chunk(seq, ops, budget, used, False)
        if seq is not None:
            self._sharded_waits = self._sharded_waits + 1 if local and not first else 0
        decode = self._decode_plan(self.decoding, ops) if self.decoding else None
        if prefill is None and not local:
            if decode is None:
                return None
            return StepPlan("decode", decode=decode, tables=list(ops.values()))
        kind = "prefill" if decode is None else "mixed"
        return StepPlan(kind, prefill=prefill, local=local, decode=decode,
                        tables=list(ops.values()))

    def _next_prefill(self, candidates: list[Sequence]) -> Sequence | None:
        """Which of `candidates` (prefilling) the step prefills: see the module's policy;
        None if all of them wait for KV another prefill is storing."""
        if len(candidates) == 1 and candidates[0].started:
            return candidates[0]
        ready = candidates
        if not all(s.started for s in ready):  # then which wait for another's KV
            coming = {k for s in self.prefilling if s.started for k in s.keys[s.registered :]}
            ready = [s for s in ready if s.started or not self._waits_for(s, coming)]
        if not ready:
            return None
        # a preempted sequence first (its stream is paused), then one passed over too often
        starved = [s for s in ready if s.preemptions] or \
            [s for s in ready if s.passed_over >= MAX_PASSED_OVER]
        pick = starved[0] if starved else min(ready, key=lambda s: s.prefill_len - s.prefilled)
        for s in candidates:
            s.passed_over = 0 if s is pick else s.passed_over + 1
        return pick

    def _waits_for(self, seq: Sequence, coming: set[bytes]) -> bool:
        """Whether the next block `seq` would compute is one another request is storing."""
        if not coming:
            return False
        hits = len(self.blocks.lookup(seq.keys))
        return hits < len(seq.keys) and seq.keys[hits] in coming

    def _sharded_chunk(self, seq: Sequence, ops: Ops, budget: int | None, used: list[int],
                       first: bool) -> PrefillPlan | None:
        """A chunk of the sharded prompt `seq`: a whole prefill_chunk with nothing decoding,
        else what the busiest rank's budget leaves (None if not even the smallest chunk
        fits, unless it goes first); counts its tokens into `used`."""
        chunk = self.prefill_chunk
        if budget is not None:
            left = budget - max(used)
            if left < self.step_tokens // self.world and not first:
                return None  # not even the smallest chunk fits
            chunk = min(self.prefill_chunk, self._aligned(self._budget_tokens(seq, left,
                                                                              self.world)))
        plan = self._prefill_plan(seq, ops, chunk)
        for r in range(self.world):
            used[r] += padding.local_len(len(plan.tokens), self.world, r, self.block_size)
        return plan

    def _short_chunks(self, short: list[Sequence], ops: Ops, budget: int | None,
                      used: list[int]) -> list[PrefillPlan]:
        """On each rank, a chunk of one short prompt homed there, within the rank's budget."""
        plans = []
        for r in range(self.world):
            mine = [s for s in short if s.home == r]
            seq = self._next_prefill(mine) if mine else None
            if seq is None:
                continue
            chunk = self.prefill_chunk
            if budget is not None:
                left = budget - used[r]
                if left <= 0:
                    continue
                b = self.block_size  # whole blocks
                chunk = min(self.prefill_chunk, max(b, self._budget_tokens(seq, left, 1) // b * b))
            plan = self._prefill_plan(seq, ops, chunk)
            used[r] += len(plan.tokens)
            plans.append(plan)
        return plans

    def _budget_tokens(self, seq: Sequence, left: int, world: int) -> int:
        """The prefill tokens of `seq` that fill `left` tokens of one rank's budget, in a
        chunk over `world` ranks (all for a sharded prompt, 1 for a short one): each new
        token counts 1 + prefix_cost x (keys before it) on the rank that computes it, and
        each rank computes x = chunk / world of them. The callers cut it to whole blocks."""
        x = float(max(left, 0))
        if self.prefix_cost > 0:  # x + cost·(a·x + world·x²/2) = left
            lin = 1 + self.prefix_cost * seq.prefilled
            x = (2 * x) / (lin + (lin * lin + 2 * self.prefix_cost * world * x) ** 0.5)
        return int(world * x)

    def _aligned(self, n: int) -> int:
        """The largest chunk of at most n tokens (at least one block per zigzag piece) that
        is a whole number of blocks in every piece and that padded_len leaves unpadded."""
        step = self.step_tokens
        chunk = max(step, n // step * step)
        while padding.padded_len(chunk, self.world, self.block_size) != chunk:
            chunk -= step
        return chunk

    def _prefill_plan(self, seq: Sequence, ops: Ops, chunk: int) -> PrefillPlan:
        if not seq.started:
            self._relookup(seq)
            seq.started = True
            if not seq.preemptions:  # the request's prompt, looked up once
                self.blocks.queries += seq.prompt_len
                self.blocks.hits += seq.num_cached
            # the rank's table for this row starts over: the cached blocks, then new ones
            for r in range(self.world):
                ops[r, seq.row] = TableOp(r, seq.row, 0, list(seq.table[r]))
        a = seq.prefilled
        if seq.home < 0 and chunk != self.prefill_chunk and a + chunk < seq.prefill_len \
                and not self._replan(seq, chunk):
            chunk = self.prefill_chunk  # the planned chunk: its pages are reserved
        b = min(seq.prefill_len, a + chunk)
        prefix_len = list(seq.kv_len)
        if seq.home < 0:
            for _, rank in chunk_blocks(a, b - a, self.world, self.block_size):
                self._take(seq, rank, ops)
        else:  # every block on its home (a is a whole number of blocks)
            for _ in range(a // self.block_size, -(-b // self.block_size)):
                self._take(seq, seq.home, ops)
        return PrefillPlan(
            seq_id=seq.seq_id,
            row=seq.row,
            tokens=seq.prefill_ids(a, b),
            start=a,
            prefix_len=prefix_len,
            sample=b == seq.prefill_len,
            strategy=self.choose_strategy(b - a, a) if seq.home < 0 else "local",
            home=seq.home,
        )

    def _grow(self, ops: Ops) -> bool:
        """A page for each decoding sequence whose next token opens a block, the earliest
        admitted first; where no rank it may use has one, preempt (see the policy). Returns
        whether any sequence was preempted."""
        preempted = False
        for s in sorted(self.decoding, key=lambda s: s.admitted):
            if s.status is not Status.DECODING or (s.num_tokens - 1) // self.block_size \
                    < len(s.blocks):
                continue  # preempted just now, or its token goes into an open block
            ranks = range(self.world) if s.home < 0 else (s.home,)
            while True:
                free = self.blocks.available()
                room = [r for r in ranks if free[r] > 0]
                if room:  # the rank holding the fewest of its blocks (ties: the lowest)
                    self._take(s, min(room, key=lambda r: (len(s.table[r]), r)), ops, False)
                    break
                victim = max((v for v in (*self.prefilling, *self.decoding)
                              if any(v.table[r] or v.reserved[r] for r in ranks)),
                             key=lambda v: v.admitted)
                self._preempt(victim, ops)
                preempted = True
                if victim is s:
                    break
        return preempted

    def _preempt(self, seq: Sequence, ops: Ops) -> None:
        """Free a running sequence's KV and queue it first, to be recomputed: its prompt and
        the tokens it has, from which its next token is sampled."""
        self._release(seq)
        for key in [k for k in ops if k[1] == seq.row]:
            del ops[key]  # its table updates of this step: the row is free now
        seq.status = Status.WAITING
        seq.prefill_len = seq.num_tokens
        if self.blocks.enable_caching:  # the blocks it may find again (not the last token)
            seq.keys = block_keys(seq.prompt_ids + seq.output_ids, self.block_size,
                                  (seq.prefill_len - 1) // self.block_size)
        seq.blocks, seq.table, seq.kv_len = [], [[] for _ in range(self.world)], [0] * self.world
        seq.prefilled = seq.fed = seq.registered = 0
        seq.home, seq.started, seq.passed_over = -1, False, 0
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        """Take a running sequence out of the running lists and give back its pages (latest
        position first: see kv.block_manager), its reservation and its row."""
        (self.prefilling if seq.status is Status.PREFILLING else self.decoding).remove(seq)
        self.blocks.release(seq.blocks)
        self.blocks.unreserve(seq.reserved)
        seq.reserved = [0] * self.world
        self.free_rows.append(seq.row)
        seq.row = -1

    def _decode_plan(self, seqs: list[Sequence], ops: Ops) -> DecodePlan:
        owners = []
        for s in seqs:
            pos = s.num_tokens - 1  # the token fed now (its block was taken by _grow)
            owners.append(s.blocks[pos // self.block_size][0])
        return DecodePlan(
            seq_ids=[s.seq_id for s in seqs],
            rows=[s.row for s in seqs],
            tokens=[s.output_ids[-1] for s in seqs],
            positions=[s.num_tokens - 1 for s in seqs],
            kv_len=[list(s.kv_len) for s in seqs],
            owner=owners,
            home=[s.home for s in seqs] if self.shard_min_tokens else [],
        )

    def update(self, plan: StepPlan, sampled: list[int]) -> list[Sequence]:
        """Record a finished step: KV now cached, tokens sampled (in StepPlan.sampled's
        order: the first token of each prompt the step ended, then the decode tokens).
        Returns the sequences that got a new token (the caller checks stop conditions and
        calls `finish`)."""
        by_id = {s.seq_id: s for s in self.prefilling + self.decoding}
        touched = []
        for p in [plan.prefill, *plan.local]:
            if p is None:
                continue
            seq = by_id.get(p.seq_id)
            if p.sample:
                token, sampled = sampled[0], sampled[1:]
            if seq is None:  # aborted while the step ran
                continue
            n = len(p.tokens)
            if p.home >= 0:
                seq.kv_len[p.home] += n
            else:
                for r in range(self.world):
                    seq.kv_len[r] += padding.local_len(n, self.world, r, self.block_size)
            seq.prefilled += n
            self._register(seq, seq.prefilled)
            if p.sample:
                self.prefilling.remove(seq)
                seq.status = Status.DECODING
                seq.fed = seq.prefilled - seq.prompt_len  # generated tokens recomputed
                self.decoding.append(seq)
                seq.output_ids.append(token)
                touched.append(seq)
        if plan.decode is not None:
            for seq_id, owner, token in zip(plan.decode.seq_ids, plan.decode.owner, sampled):
                seq = by_id.get(seq_id)
                if seq is None or seq.status is not Status.DECODING:
                    continue
                seq.kv_len[owner] += 1
                seq.fed += 1
                self._register(seq, seq.prompt_len + seq.fed)
                seq.output_ids.append(token)
                touched.append(seq)
        return touched

    def _register(self, seq: Sequence, stored: int) -> None:
        """Put the blocks of `seq` that are now full (`stored` positions have KV) into the
        prefix cache."""
        if not self.blocks.enable_caching:
            return
        full = stored // self.block_size
        if full <= seq.registered:
            return
        b = self.block_size
        tokens = seq.prompt_ids + seq.output_ids
        if len(seq.keys) < full:
            parent = seq.keys[-1] if seq.keys else b""
            start = len(seq.keys) * b
            seq.keys += block_keys(tokens[start : full * b], b, parent=parent)
        for j in range(seq.registered, full):
            rank, page = seq.blocks[j]
            self.blocks.register(seq.keys[j], rank, page)
        seq.registered = full

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length or abort) and free its KV: its pages go back, and
        those that hold cached blocks stay cached until their room is needed."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def find(self, request_id: str) -> Sequence | None:
        for s in (*self.waiting, *self.prefilling, *self.decoding):
            if s.request_id == request_id:
                return s
        return None

    @contextmanager
    def scratch_tables(self, n: int) -> Iterator[list[TableOp]]:
        """Pages for a one-off prefill of `n` tokens that keeps no KV (prompt_logits), in
        the scratch row's table ops; they go back when the block ends. RequestTooLong if
        the pool cannot hold them now."""
        blocks = self.blocks
        ranks = [r for _, r in chunk_blocks(0, n, self.world, self.block_size)]
        need = [ranks.count(r) for r in range(self.world)]
        if not blocks.can_reserve(need, []):
            raise RequestTooLong(f"the KV cache cannot hold {n} tokens right now")
        blocks.reserve(need)
        taken = [(r, blocks.take(r)) for r in ranks]
        try:
            yield [TableOp(r, self.scratch_row, 0, [p for rr, p in taken if rr == r])
                   for r in range(self.world)]
        finally:
            for r, page in taken:
                blocks.unpin(r, page)

    def reset_prefix_cache(self) -> int:
        """Drop every cached block that no running request uses; returns how many."""
        return self.blocks.reset()

    # ---- numbers for metrics -----------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_used(self) -> list[int]:
        """Token slots per rank in pages that running requests hold or have reserved (the
        rest of an admitted prompt's pages); idle cached pages, which the next request may
        take, are not counted."""
        return [(n + r) * self.block_size
                for n, r in zip(self.blocks.pages_in_use(), self.blocks.reserved())]

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)
