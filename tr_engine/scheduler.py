"""The scheduler: which work runs next. Pure Python; it emits plain StepPlans.

Policy:
- Admission is first come, first served: the head of the queue is admitted when its KV slab
  (prompt plus max_tokens, see kv_accounting) fits on every rank and fewer than max_num_seqs
  are running; nobody overtakes it.
- A prompt is prefilled in chunks of at most `prefill_chunk` tokens, one sequence per step.
  While other requests are decoding, prefill chunks and decode steps alternate, so streams
  keep flowing during a long prefill (continuous batching: requests join and leave the
  decode batch between steps).
- Every decoding sequence takes part in every decode step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .errors import QueueFull, RequestTooLong
from .kv_accounting import KVAccounting, decode_owner, prompt_share, reservation
from .plan import DecodePlan, PrefillPlan, StepPlan
from .sequence import Sequence, Status


class Scheduler:
    def __init__(
        self,
        world: int,
        kv_capacity: int,
        max_model_len: int,
        prefill_chunk: int,
        max_num_seqs: int,
        max_waiting: int,
        choose_strategy: Callable[[int, int], str],
    ) -> None:
        self.world = world
        self.kv = KVAccounting(world, kv_capacity)
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.choose_strategy = choose_strategy  # (new tokens, cached tokens) -> strategy
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []
        self._last_kind = "decode"

    # ---- admission -------------------------------------------------------------------
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
        need = reservation(prompt_len, max_tokens, self.world, self.prefill_chunk)
        if not self.kv.fits_alone(need):
            capacity = self.kv.capacity * self.world
            per_rank = ""
            if self.world > 1:
                per_rank = f" ({self.kv.capacity} on each of {self.world} ranks)"
            raise RequestTooLong(
                f"the KV cache holds {capacity} tokens{per_rank}, but the request needs "
                f"{total} ({prompt_len} in the prompt + {max_tokens} max_tokens; {max(need)} "
                f"on one rank)"
            )

    def add(self, seq: Sequence) -> None:
        self.check(seq.prompt_len, seq.params.max_tokens)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the queue is full ({self.max_waiting} requests waiting)")
        seq.kv_need = reservation(
            seq.prompt_len, seq.params.max_tokens, self.world, self.prefill_chunk
        )
        seq.kv_len = [0] * self.world
        self.waiting.append(seq)

    def _admit(self) -> None:
        while self.waiting and len(self.prefilling) + len(self.decoding) < self.max_num_seqs:
            seq = self.waiting[0]
            starts = self.kv.reserve(seq.kv_need)
            if starts is None:
                return
            self.waiting.popleft()
            seq.kv_start = starts
            seq.status = Status.PREFILLING
            self.prefilling.append(seq)

    # ---- steps -----------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step, or None when there is nothing to do."""
        self._admit()
        prefill_turn = self.prefilling and (not self.decoding or self._last_kind == "decode")
        if prefill_turn:
            self._last_kind = "prefill"
            return StepPlan("prefill", prefill=self._prefill_plan(self.prefilling[0]))
        if self.decoding:
            self._last_kind = "decode"
            return StepPlan("decode", decode=self._decode_plan(self.decoding))
        return None

    def _prefill_plan(self, seq: Sequence) -> PrefillPlan:
        a = seq.prefilled
        b = min(seq.prompt_len, a + self.prefill_chunk)
        return PrefillPlan(
            seq_id=seq.seq_id,
            tokens=seq.prompt_ids[a:b],
            start=a,
            kv_start=list(seq.kv_start),
            kv_len=list(seq.kv_len),
            sample=b == seq.prompt_len,
            strategy=self.choose_strategy(b - a, a),
        )

    def _decode_plan(self, seqs: list[Sequence]) -> DecodePlan:
        return DecodePlan(
            seq_ids=[s.seq_id for s in seqs],
            tokens=[s.output_ids[-1] for s in seqs],
            positions=[s.num_tokens - 1 for s in seqs],
            kv_start=[list(s.kv_start) for s in seqs],
            kv_len=[list(s.kv_len) for s in seqs],
            owner=[decode_owner(s.prompt_len, s.fed, self.world) for s in seqs],
        )

    def update(self, plan: StepPlan, sampled: list[int]) -> list[Sequence]:
        """Record a finished step: KV now cached, tokens sampled. Returns the sequences that
        got a new token (the caller checks stop conditions and calls `finish`)."""
        by_id = {s.seq_id: s for s in self.prefilling + self.decoding}
        if plan.kind == "prefill":
            p = plan.prefill
            seq = by_id.get(p.seq_id)
            if seq is None:  # aborted while the step ran
                return []
            share = prompt_share(len(p.tokens), self.world, len(p.tokens))
            seq.kv_len = [a + b for a, b in zip(seq.kv_len, share)]
            seq.prefilled += len(p.tokens)
            if not p.sample:
                return []
            self.prefilling.remove(seq)
            seq.status = Status.DECODING
            self.decoding.append(seq)
            seq.output_ids.append(sampled[0])
            return [seq]
        touched = []
        for seq_id, owner, token in zip(plan.decode.seq_ids, plan.decode.owner, sampled):
            seq = by_id.get(seq_id)
            if seq is None or seq.status is not Status.DECODING:
                continue
            seq.kv_len[owner] += 1
            seq.fed += 1
            seq.output_ids.append(token)
            touched.append(seq)
        return touched

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length or abort) and free its KV."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            (self.prefilling if seq.status is Status.PREFILLING else self.decoding).remove(seq)
            self.kv.release(seq.kv_start, seq.kv_need)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def find(self, request_id: str) -> Sequence | None:
        for s in (*self.waiting, *self.prefilling, *self.decoding):
            if s.request_id == request_id:
                return s
        return None

    # ---- numbers for metrics -----------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_used(self) -> list[int]:
        """Tokens cached per rank (filled slots, not reservations)."""
        used = [0] * self.world
        for s in (*self.prefilling, *self.decoding):
            for r, n in enumerate(s.kv_len):
                used[r] += n
        return used

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)
