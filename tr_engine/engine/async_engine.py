"""The engine as the HTTP server sees it: async generation over a background engine thread.

The engine loop (schedule, run, update) runs on its own thread, because a step blocks on
device work and collectives. Requests reach it through an inbox; each request's outputs
come back on an asyncio queue of the event loop that asked. A watchdog marks the engine
dead if a rank process dies or stops answering (its heartbeat goes quiet), so /health can
say so even while a step hangs. A step whose forward raises fails only its own requests
where the ranks are still in step (LLMEngine.step); what the engine cannot survive (a
collective or a rank failing) fails every open request and /health turns 503.

A decode step's outputs reach the event loop once the next step's device work is queued (on
CUDA and NPU, where queueing returns before the work ends; envs.overlap_outputs): the event
loop's work on them, a chunk per stream, then runs while the device computes, instead of
holding the GIL while this thread prepares the next step. A step of prefill work, a request
or abort arriving, or no next step hands them over at once.

Only the engine thread talks to the other ranks. Shutdown sets a flag; the engine thread
sends the stop plan between two steps (a long prompt is prefilled in chunks, each a step),
so the stop never meets a collective of the work it stops. If a step does not end in time
(one long chunk, a rank gone quiet), the other ranks' processes are killed instead.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .. import envs
from ..config import EngineConfig
from ..errors import EngineDead, QueueFull, ReaderTooSlow
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine

log = logging.getLogger("tr_engine")
_RANKS_EXIT_S = 5.0  # how long the other ranks get to exit after the stop plan


@dataclass
class EngineStats:
    running: int  # requests being prefilled or decoded
    waiting: int  # requests queued
    kv_used_tokens: list[int]  # per rank
    kv_capacity_tokens: int  # per rank
    prompt_tokens_total: int
    generation_tokens_total: int
    prefill_tokens_per_s: float  # of the most recent prefill step
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, tokens whose KV was reused
    attention_shapes_built: int = 0  # kernel builds for new shapes on rank 0 (cuDNN)
    kernel_builds_late: int = 0  # kernel variants rank 0 built after start-up (Backend)
    num_preemptions: int = 0  # running sequences whose KV was freed for room (recomputed)
    failed_steps: int = 0  # steps whose forward raised and failed their requests alone
    # the host tier: tokens in use per rank, capacity per rank, prompt tokens restored from
    # it, bytes copied to it and back (all ranks), seconds rank 0 spent restoring
    host_used_tokens: list[int] = field(default_factory=list)
    host_capacity_tokens: int = 0
    host_hit_tokens: int = 0
    host_offloaded_bytes: int = 0
    host_restored_bytes: int = 0
    host_restore_s: float = 0.0
    # tokens per step: (bucket upper bounds, counts per bucket and one over them all, sum)
    batched_tokens: tuple = ((), [0], 0.0)


def _put_all(items: list[tuple[_Outputs, object]]) -> None:
    for outputs, item in items:
        outputs.put(item)


class _Outputs:
    """One request's outputs waiting for its reader, on the reader's event loop. At most
    `bound` wait: a reader that far behind has stopped reading (a client that went quiet
    without hanging up), so the request is aborted, freeing its KV, and the reader gets
    what waited, then ReaderTooSlow. The last output or an error always gets in."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, bound: int,
                 abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.bound = bound
        self._abort = abort
        self.overflowed = False

    def put(self, item) -> None:
        if self.overflowed:
            return
        last = isinstance(item, BaseException) or item.finished
        if self.queue.qsize() >= self.bound and not last:
            self.overflowed = True
            self.queue.put_nowait(ReaderTooSlow(
                f"{self.bound} outputs waited unread; the request was aborted"))
            self._abort(self.request_id)
            return
        self.queue.put_nowait(item)


class AsyncEngine:
    """Start with `AsyncEngine.start(config)` (blocking: loads weights on every rank, plans
    memory, logs each phase with its time). Then, from the server's event loop:

    - `engine.tokenizer`: the Hugging Face tokenizer, the calling thread's own copy
      (`engine.tokenizers.get()`: never share one between threads); `engine.model_name`;
      `engine.max_model_len`; `engine.kv_capacity_tokens` (all ranks together);
      `engine.max_open_requests` (max_num_seqs + max_waiting).
    - `engine.encode_chat(messages, **options) -> list[int]`: the chat template applied
      (LLMEngine.encode_chat's options: tools, the generation prompt, ...); raises ValueError
      for messages the template cannot take. `engine.compile_grammar(structured)`: raises
      InvalidParameter for a grammar that cannot compile (thread-safe, cached).
    - `engine.check(prompt_token_ids, params)`: raises RequestTooLong (message names the
      prompt length, max_tokens, and the limit) if it can never fit.
    - `async for out in engine.generate(request_id, prompt_token_ids, params, prompt=None)`:
      yields a RequestOutput each time new tokens arrive (delta_text/delta_token_ids/
      delta_logprobs; the whole text, token ids and logprobs in the last one, which has
      finished=True and finish_reason set, for params.output_kind "final").
      `generate` itself raises RequestTooLong, QueueFull or EngineDead, before anything is
      queued. At most max_num_seqs + max_waiting requests are open at once (running,
      waiting, or on their way to the scheduler): a burst gets exactly as many in as
      requests sent one at a time. A request whose serving raised ends with RequestFailed
      out of its iteration; the others go on. If the consumer stops iterating (client
      gone), the request is aborted and its KV freed; so it is if it falls more than
      envs.max_queued_outputs outputs behind (ReaderTooSlow out of its iteration).
    - `engine.abort(request_id)`; `engine.stats() -> EngineStats`; `engine.healthy` (False
      once the loop or a rank died); `engine.shutdown(step_timeout)` stops every rank.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        # SamplingParams fields a request leaves unset take these (generation_config.json)
        self.sampling_defaults = dict(engine.sampling_defaults)
        self.kv_capacity_tokens = engine.kv_capacity * engine.world
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Outputs] = {}
        self._max_queued = envs.max_queued_outputs()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._closed = False  # the ranks were told to stop, or killed
        self._closing = threading.Event()  # the engine thread is telling the ranks to stop
        # requests taken from the inbox that wait for room in the scheduler's queue, which
        # refuses more than max_waiting and admits to running only when it schedules
        self._pending: deque[tuple] = deque()
        self._live: set[str] = set()  # accepted and not finished: the admission count
        self.max_open_requests = engine.config.max_num_seqs + engine.config.max_waiting
        self._stats = self._snapshot()
        # a decode step's outputs, held until the next step's device work is queued
        self._held: list[tuple[str, object, bool]] = []
        self._overlap = envs.overlap_outputs(engine.sampler.device.type)
        engine.on_scheduled = self._on_scheduled
        engine.on_launched = self._release
        self._ready = threading.Event()  # the loop's thread has built its kernel state
        self._thread = threading.Thread(target=self._run, name="tr-engine-loop", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="tr-engine-watchdog",
                                          daemon=True)
        self._thread.start()
        self._watchdog.start()
        self._ready.wait()

    @property
    def tokenizer(self):
        """The calling thread's own copy of the tokenizer (see tokenizers.py)."""
        return self.engine.tokenizer

    @property
    def tokenizers(self):
        return self.engine.tokenizers

    @classmethod
    def start(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    # ---- the engine thread ---------------------------------------------------------------
    def _prepare(self) -> None:
        """Per-thread kernel state (cuDNN's graphs of the prepared attention shapes) built
        on this thread, which runs every step, before the first request: without it each
        prepared shape is built again on its first request."""
        try:
            self.engine.cluster.prepare_thread()
        except Exception:  # only first requests of a shape pay for it then
            log.exception("building the attention shapes on the engine thread failed")
        finally:
            self._ready.set()

    def _run(self) -> None:
        self._prepare()
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_work():
                    self._release()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outs = self.engine.step()
                self._release()  # a step that queued no device work (nothing planned)
                entries = [(out.request_id, out.error or out, out.finished) for out in outs]
                if self._overlap and self.engine.has_work():
                    self._held = entries
                else:
                    self._deliver_all(entries)
                self._stats = self._snapshot()
            self._release()
        except BaseException as e:  # the engine cannot go on: fail every open request
            self._release()  # what the steps before gave comes first
            if self._stop.is_set():  # the ranks were killed under a step: expected
                log.info("the step in progress ended with the ranks: %s", type(e).__name__)
            else:
                log.exception("engine loop died")
            self._fail(EngineDead(f"the engine stopped: {type(e).__name__}: {e}"))
            return
        # Stopping, between two steps: this thread is the only one in the collectives, so
        # the stop plan cannot meet one. A dead engine's ranks are killed by shutdown().
        if self._dead is not None or self._closed:
            return
        self._fail(EngineDead("the server is shutting down"))
        self._closed = True
        self._closing.set()
        self.engine.shutdown(timeout=_RANKS_EXIT_S)

    def _on_scheduled(self, plan) -> None:
        # the scheduler has just admitted: /metrics shows the step now, not after it ends
        self._stats = self._snapshot()
        if plan.kind != "decode":  # queueing prefill work can take the host a while
            self._release()

    def _release(self) -> None:
        """Hand the held outputs to the event loops."""
        if self._held:
            held, self._held = self._held, []
            self._deliver_all(held)

    def _drain_inbox(self) -> None:
        if not self._inbox.empty():
            self._release()  # a request's outputs before what its abort gives
        while True:
            try:
                kind, args = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._pending.append(args)
            elif kind == "abort":
                self._abort(args)
            elif kind == "reset_prefix_cache":
                loop, future = args
                n = self.engine.reset_prefix_cache()
                loop.call_soon_threadsafe(future.set_result, n)
        scheduler, limit = self.engine.scheduler, self.engine.config.max_waiting
        while self._pending and scheduler.num_waiting < limit:
            request_id, ids, params, prompt = self._pending.popleft()
            try:
                self.engine.add_request(request_id, ids, params, prompt)
            except Exception as e:  # refused: RequestTooLong, InvalidParameter, ...
                self._deliver(request_id, e, done=True)
        self._stats = self._snapshot()

    def _abort(self, request_id: str) -> None:
        for item in self._pending:
            if item[0] == request_id:
                self._pending.remove(item)
                break
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver(request_id, out, done=True)
        with self._lock:
            self._live.discard(request_id)

    def _deliver(self, request_id: str, item, done: bool = False) -> None:
        self._deliver_all([(request_id, item, done)])

    def _deliver_all(self, entries) -> None:
        """(request id, output or error, done) entries, handed to each event loop in one call
        (a step's outputs wake the loop once, not once per request)."""
        by_loop: dict = {}
        with self._lock:
            for request_id, item, done in entries:
                target = self._streams.get(request_id)
                if done:
                    self._live.discard(request_id)
                if target is not None:
                    by_loop.setdefault(target.loop, []).append((target, item))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail(self, error: BaseException) -> None:
        self._dead = error
        with self._lock:
            streams = list(self._streams.values())
        for outputs in streams:
            outputs.loop.call_soon_threadsafe(outputs.put, error)

    def _watch(self) -> None:
        quiet_after = envs.heartbeat_timeout_s()
        while not self._stop.wait(1.0):
            dead = self._dead_ranks()
            quiet = self.engine.cluster.quiet_workers(quiet_after)
            if dead and self._dead is None:
                log.error("rank(s) %s died; the engine is dead", dead)
                self._fail(EngineDead(f"rank(s) {dead} died"))
            elif quiet and self._dead is None:
                log.error("rank(s) %s sent no heartbeat for %.0f s; the engine is dead", quiet,
                          quiet_after)
                self._fail(EngineDead(f"rank(s) {quiet} stopped answering"))
            if self._dead is not None:
                return

    def _dead_ranks(self) -> list[int]:
        return self.engine.cluster.dead_workers()

    def _snapshot(self) -> EngineStats:
        e, s = self.engine, self.engine.scheduler
        page = e.info.page_bytes * e.config.tensor_parallel_size  # a page over its TP group
        return EngineStats(
            running=s.num_running, waiting=s.num_waiting + len(self._pending),
            kv_used_tokens=s.kv_used(),
            kv_capacity_tokens=e.kv_capacity, prompt_tokens_total=e.prompt_tokens_total,
            generation_tokens_total=e.generation_tokens_total,
            prefill_tokens_per_s=e.last_prefill_tokens_per_s,
            prefix_cache_queries=s.blocks.queries, prefix_cache_hits=s.blocks.hits,
            attention_shapes_built=len(getattr(e.cluster.backend, "cudnn_shapes", ())),
            kernel_builds_late=e.cluster.backend.late_builds(),
            num_preemptions=s.num_preemptions, failed_steps=e.failed_steps_total,
            host_used_tokens=[n * s.block_size for n in s.blocks.host_used()],
            host_capacity_tokens=e.info.host_slots * s.block_size,
            host_hit_tokens=s.host_hit_tokens,
            host_offloaded_bytes=s.blocks.pages_offloaded * page,
            host_restored_bytes=s.blocks.pages_restored * page,
            host_restore_s=e.host_restore_s,
            batched_tokens=e.batched_tokens.snapshot(),
        )

    # ---- the server's side ---------------------------------------------------------------
    def encode_chat(self, messages: list[dict], **options) -> list[int]:
        return self.engine.encode_chat(messages, **options)

    def compile_grammar(self, structured) -> None:
        self.engine.compile_grammar(structured)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check(prompt_token_ids, params)

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request; call it on the event loop's thread. Refusals (RequestTooLong,
        InvalidParameter, QueueFull, EngineDead) raise here, before anything is queued;
        the returned iterator yields the outputs."""
        if self._dead is not None:
            raise EngineDead(str(self._dead))
        self.check(prompt_token_ids, params)
        outputs = _Outputs(request_id, asyncio.get_running_loop(), self._max_queued, self.abort)
        config = self.engine.config
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._live) >= self.max_open_requests:
                raise QueueFull(f"the queue is full ({config.max_num_seqs} requests running "
                                f"and {config.max_waiting} waiting)")
            self._live.add(request_id)
            self._streams[request_id] = outputs
        self._inbox.put(("add", (request_id, list(prompt_token_ids), params, prompt)))
        self._wake.set()
        return self._outputs(request_id, outputs.queue)

    async def _outputs(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # refused or failed: nothing to abort
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    async def reset_prefix_cache(self) -> int:
        """Drop every cached KV block no running request uses (between engine steps);
        returns how many blocks went."""
        if self._dead is not None:
            raise self._dead
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("reset_prefix_cache", (loop, future)))
        self._wake.set()
        return await future

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def shutdown(self, step_timeout: float = 3.0) -> bool:
        """Stop the loop, then every rank; safe to call more than once. The engine thread
        tells the ranks to stop once its step ends and gives them a few seconds to exit; a
        step still running after `step_timeout` seconds has the other ranks' processes
        killed instead. Returns True if the loop has ended (False: it is stuck in a step of
        ranks that are gone, and the process must exit without waiting for it)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(step_timeout)
        if self._closing.is_set():
            self._thread.join(_RANKS_EXIT_S + 1)
        elif self._thread.is_alive():
            log.warning("a step is still running after %.0f s; killing the other ranks",
                        step_timeout)
        if self._thread.is_alive() or not self._closed:
            # No collective here: the engine thread may be inside one.
            self._closed = True
            self.engine.cluster.kill()
            self._thread.join(2.0)
        return not self._thread.is_alive()

    def kill(self) -> None:
        """The other ranks' processes killed at once (a forced exit)."""
        self._stop.set()  # the step they die under is expected to fail: no traceback
        self._closed = True
        self.engine.cluster.kill()
