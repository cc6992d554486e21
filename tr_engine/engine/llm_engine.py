"""The engine loop on rank 0: schedule, run, update — and turn tokens into outputs."""

from __future__ import annotations

import bisect
import gc
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import envs
from ..attention.cost import choose
from ..config import EngineConfig
from ..errors import RequestFailed, RequestTooLong
from ..models.generation_defaults import describe, sampling_defaults
from ..models.loader import load_tokenizer, resolve_model_path
from ..outputs import CompletionOutput, RequestOutput
from ..plan import PrefillPlan, StepPlan
from ..sampling_params import (
    PROMPT_LOGPROBS_MAX_TOKENS,
    InvalidParameter,
    SamplingParams,
    StructuredOutputs,
)
from ..worker.cluster import Cluster
from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarCompiler
from .sampler import Sampler, prompt_logprobs
from .scheduler import Scheduler
from .sequence import Sequence
from .step_trace import StepTrace
from .token_mask import TokenMasks
from .tokenizers import ThreadTokenizers

log = logging.getLogger("tr_engine")


class Counts:
    """A histogram the engine thread fills: counts per upper bound (the last one +inf)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[tuple[float, ...], list[int], float]:
        return self.bounds, list(self.counts), self.sum


BATCHED_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                          16384, 32768, 65536, 131072, 262144)


@dataclass
class _Outgoing:
    """A request's text on its way out: what is held back (it could still begin a stop
    string) and, for output_kind "final", the pieces handed out (joined once, at the end)."""

    held: str = ""
    sent: list[str] | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        t = time.perf_counter()
        model_path = resolve_model_path(config.model)
        # before the ranks start: a bad generation_config.json stops start-up at once
        self.sampling_defaults = sampling_defaults(model_path, config.generation_config)
        self.tokenizers = ThreadTokenizers(load_tokenizer(model_path))
        self.cluster = Cluster(config, model_path)
        self.config = self.cluster.config  # world_size as the cluster found it (torchrun)
        self.info = info = self.cluster.info
        self.model_config = mc = self.cluster.model_config
        self.max_model_len = info.max_model_len
        self.kv_capacity = info.capacity  # per rank
        self.model_name = config.served_model_name or (config.model or "SmolLM2-135M-Instruct")
        self.eos_ids = set(mc.eos_token_ids)
        self.scheduler = Scheduler(self.config, info, self._choose_strategy)
        self.sampler = Sampler(self.cluster.device, config.seed)
        self.grammars = GrammarCompiler(self.tokenizers.own(), mc.vocab_size, self.eos_ids)
        self.masks = TokenMasks(self.grammars, self.tokenizers.own(), mc.vocab_size, self.eos_ids,
                                self.cluster.device, config.max_num_seqs + 1)
        self._ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._text: dict[int, _Outgoing] = {}
        self._prompt_lps: dict[int, list] = {}  # seq_id -> prompt logprobs so far
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_prefill_tokens_per_s = 0.0
        self.failed_steps_total = 0
        self.batched_tokens = Counts(BATCHED_TOKENS_BUCKETS)  # tokens per step
        self.on_scheduled: Callable[[StepPlan], None] | None = None  # once a step is planned
        # once the step's device work is queued, before the host waits for it
        self.on_launched: Callable[[], None] | None = None
        trace = envs.step_trace_path()
        self.trace = StepTrace(trace, self.cluster.backend) if trace else None
        self.sampler.warm_up(mc.vocab_size)
        self.masks.warm_up()
        self.cluster.backend.started()  # kernel variants built from now on are late
        # what start-up made lives as long as the engine (the model, its modules, the
        # libraries' state): out of the cyclic collector's reach, or a full collection walks
        # it during a step (300 ms in one, on one H100 host); given back at shutdown
        gc.collect()
        gc.freeze()
        log.info("engine ready in %.1f s: %s on %d %s rank(s), context %d tokens, KV cache %d "
                 "tokens", time.perf_counter() - t, mc.architecture, self.config.world_size,
                 self.cluster.backend.name, self.max_model_len, self.kv_capacity * self.world)
        log.info("%s", describe(self.sampling_defaults, config.generation_config))

    @property
    def tokenizer(self):
        """The calling thread's own copy of the tokenizer (see tokenizers.py)."""
        return self.tokenizers.get()

    @property
    def world(self) -> int:
        """The sequence-parallel ranks: those the plans and the KV cache are laid out over
        (each a group of tensor_parallel_size ranks)."""
        return self.config.sequence_parallel_size

    def _choose_strategy(self, new: int, cached: int) -> str:
        if self.config.attention_strategy != "auto":
            return self.config.attention_strategy
        i = self.info
        return choose(new=new, cached=cached, world=self.world, hq=i.num_heads,
                      hkv=i.num_kv_heads, d=i.head_dim, elem=i.elem, rates=i.rates)

    # ---- requests ------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    tools: list[dict] | None = None, continue_final_message: bool = False,
                    add_special_tokens: bool = False, documents: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> list[int]:
        """The chat template applied to one conversation (with `tools` and `documents` for
        templates that render them, `template_kwargs` as more template variables), then
        tokenized; ValueError for messages the template cannot take."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, documents=documents, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **(template_kwargs or {}))
        except Exception as e:  # template errors (jinja raise_exception, bad structure)
            raise ValueError(f"the chat template cannot take these messages: {e}") from None
        # what apply_chat_template(tokenize=True) does, with the BOS choice left to the caller
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def compile_grammar(self, structured: StructuredOutputs) -> None:
        """Compile (and cache) a request's grammar; InvalidParameter naming what the grammar
        library could not take. Thread-safe: the server calls it off the event loop before
        it submits the request, so a bad schema is refused before any work."""
        self.grammars.compile(structured)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise before any work if the request can never run."""
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise InvalidParameter("prompt", f"prompt token ids must be integers in [0, {vocab})"
                                              f"; got {bad[:5]}")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise InvalidParameter("stop_token_ids", f"stop_token_ids must be < {vocab}; "
                                                     f"got {bad[:5]}")
        if params.prompt_logprobs is not None and len(prompt_ids) > PROMPT_LOGPROBS_MAX_TOKENS:
            raise InvalidParameter("prompt_logprobs", f"prompt logprobs are given for prompts "
                                   f"of up to {PROMPT_LOGPROBS_MAX_TOKENS} tokens; this one "
                                   f"has {len(prompt_ids)}")
        bad = [t for t in params.allowed_token_ids or () if t >= vocab]
        if bad:
            raise InvalidParameter("allowed_token_ids", f"allowed_token_ids must be < {vocab}; "
                                                        f"got {bad[:5]}")
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise InvalidParameter("logit_bias", f"logit_bias token ids must be < {vocab}; "
                                                 f"got {bad[:5]}")
        self.scheduler.check(len(prompt_ids), params.max_tokens)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> Sequence:
        self.check(prompt_ids, params)
        seq = Sequence(next(self._ids), request_id, list(prompt_ids), params, prompt)
        self.masks.add(seq)  # its grammar, if any (InvalidParameter if it cannot compile)
        try:
            self.scheduler.add(seq)
        except BaseException:
            self.masks.forget(seq.seq_id)
            raise
        self._seqs[seq.seq_id] = seq
        self._detok[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_ids, params.skip_special_tokens)
        self._text[seq.seq_id] = _Outgoing(sent=[] if params.output_kind == "final" else None)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def host_restore_s(self) -> float:
        """Seconds rank 0 spent copying KV back from the host tier."""
        tier = self.cluster.runner.host_tier
        return tier.restore_s if tier is not None else 0.0

    def reset_prefix_cache(self) -> int:
        """Drop every cached KV block that no running request uses; returns how many."""
        return self.scheduler.reset_prefix_cache()

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step. An exception from the forward fails the step's requests (finish_reason
        "error", their KV freed) and the engine goes on, where the ranks are still in step:
        on one rank, or raised on rank 0 past the step's last collective (computing logits:
        an out-of-memory there). Otherwise (a collective failed, a rank raised) it is the
        whole engine's and propagates. One raised while sampling or finishing a single
        request ends that request alone (RequestOutput.error set)."""
        trace = self.trace
        if trace is not None:
            trace.begin()
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        if trace is not None:
            trace.mark("schedule")
        if self.on_scheduled is not None:  # the step may take minutes (a long prefill chunk)
            self.on_scheduled(plan)
        t = time.perf_counter()
        seqs = self._plan_sequences(plan)
        scored = None  # a prompt_logprobs request's chunk: a step of its own
        if plan.kind == "prefill" and not plan.local:
            seq = self._seqs[plan.prefill.seq_id]
            # (a preempted sequence's recompute has its prompt logprobs already)
            scored = seq if seq.params.prompt_logprobs is not None and not seq.output_ids \
                else None
        if scored is not None:
            plan.prefill.all_logits = True  # every position's logits come back, not the last
        try:
            logits = self.cluster.run(plan)
        except Exception as e:
            return self._fail_step(plan, e)
        if self.on_launched is not None:
            self.on_launched()
        if trace is not None:
            trace.mark("forward")
        if scored is not None:
            try:
                logits = self._score_prompt(scored, plan.prefill, logits)
            except Exception as e:  # this request's alone
                return [self.fail(scored, e)]
        masked: dict[int, Exception] = {}
        if logits is not None:
            try:  # the grammar, min_tokens, bad_words rows, in place, in one device op
                self.masks.apply(logits, seqs)
            except Exception as e:  # a matcher failed: those rows' requests alone
                masked = {i: e for i, s in enumerate(seqs) if self.masks.restricts(s)}
        tokens, logprobs, errors = self.sampler(logits, seqs) if logits is not None \
            else ([], [], {})
        errors = {**errors, **masked}
        if trace is not None:
            trace.mark("sample")
        touched = self.scheduler.update(plan, tokens)
        self._account(plan, t)
        by_seq = dict(zip((s.seq_id for s in seqs), logprobs))
        failed = {seqs[i].seq_id: e for i, e in errors.items()}
        outs = []
        for seq in touched:
            error = failed.get(seq.seq_id)
            if error is None:
                try:
                    outs.append(self._on_token(seq, by_seq.get(seq.seq_id)))
                    continue
                except Exception as e:  # this request's stop checks or text
                    error = e
            outs.append(self.fail(seq, error))
        if trace is not None:
            trace.end(plan)
        return outs

    def _score_prompt(self, seq: Sequence, plan: PrefillPlan, logits):
        """Keep the prompt logprobs of a prefill chunk's positions; the last row to sample
        from, if this is the prompt's last chunk."""
        if plan.start == 0:  # (again, if the prompt was preempted during its prefill)
            self._prompt_lps[seq.seq_id] = [None]
        got = self._prompt_lps.setdefault(seq.seq_id, [None])
        nxt = seq.prompt_ids[plan.start + 1 : plan.start + len(plan.tokens) + 1]
        got.extend(prompt_logprobs(logits[: len(nxt)], nxt, seq.params.prompt_logprobs))
        return logits[-1:] if plan.sample else None

    def _fail_step(self, plan: StepPlan, error: Exception) -> list[RequestOutput]:
        """The step's forward raised: fail every request it carried, if the ranks are still
        in step (see `step`), else re-raise."""
        if not self.cluster.failed_alone():
            raise error
        self.failed_steps_total += 1
        ids = [p.seq_id for p in (plan.prefill, *plan.local) if p is not None]
        ids += plan.decode.seq_ids if plan.decode is not None else []
        log.error("a step of %d request(s) failed; the engine goes on", len(ids))
        return [self.fail(self._seqs[i], error) for i in dict.fromkeys(ids) if i in self._seqs]

    def fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """End `seq` because serving it raised: its KV is freed, the others go on."""
        log.error("request %s failed: %s: %s", seq.request_id, type(error).__name__, error,
                  exc_info=error)
        self.scheduler.finish(seq, "error")
        seq.metrics.finished = time.time()
        self._forget(seq)
        completion = CompletionOutput(token_ids=list(seq.output_ids), finish_reason="error",
                                      num_tokens=len(seq.output_ids))
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_ids, [completion], True,
                             seq.metrics, error=RequestFailed(
                                 f"serving this request failed ({type(error).__name__})"))

    def _plan_sequences(self, plan: StepPlan) -> list[Sequence]:
        """The sequences of the step's logits rows, in order (StepPlan.sampled)."""
        now = time.time()
        for p in [plan.prefill, *plan.local]:
            if p is not None:
                seq = self._seqs[p.seq_id]
                seq.metrics.first_scheduled = seq.metrics.first_scheduled or now
        return [self._seqs[i] for i in plan.sampled()]

    def _account(self, plan: StepPlan, t: float) -> None:
        self.batched_tokens.observe(plan.num_tokens)
        n = sum(len(p.tokens) for p in [plan.prefill, *plan.local] if p is not None)
        self.prompt_tokens_total += n
        if n and plan.kind == "prefill":
            self.last_prefill_tokens_per_s = n / max(time.perf_counter() - t, 1e-9)

    def _on_token(self, seq: Sequence, logprob) -> RequestOutput:
        """A new token for `seq`: stop checks, text, and the output to hand back."""
        p, token = seq.params, seq.output_ids[-1]
        now = time.time()
        seq.metrics.first_token = seq.metrics.first_token or now
        seq.metrics.last_token = now
        self.generation_tokens_total += 1
        out = self._text[seq.seq_id]
        if logprob is not None and out.sent is not None:  # kept for the whole view at the end
            seq.logprobs.append(logprob)
        detok = self._detok[seq.seq_id]
        reason = None
        if self.masks.accept(seq, token):  # its grammar has ended (on a stop token)
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        else:
            out.held += detok.add(token)
            # vLLM's min_tokens holds off stop strings too
            if p.stop and len(seq.output_ids) >= p.min_tokens and self._cut_at_stop(seq, out):
                reason = "stop"
        if reason is None and (len(seq.output_ids) >= p.max_tokens
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if reason == "length":
                out.held += detok.flush()
            self.scheduler.finish(seq, reason)
        return self._output(seq, token, logprob)

    def _cut_at_stop(self, seq: Sequence, out: _Outgoing) -> bool:
        """Truncate the text at the first stop string, if one has appeared. Only the text
        not yet handed out can hold one: what went out was checked, and what could begin a
        stop string was held back."""
        p = seq.params
        hits = [(out.held.find(s), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        out.held = out.held[: i + len(s)] if p.include_stop_str_in_output else out.held[:i]
        seq.stop_reason = s
        return True

    def _output(self, seq: Sequence, token: int | None, logprob=None) -> RequestOutput:
        """What this step adds to `seq` (its token, if any, the text it completes and its
        logprob): O(1) in the output's length. The whole text, token ids and logprobs come
        once, with the last output, and only for output_kind "final"."""
        out, p = self._text[seq.seq_id], seq.params
        delta = out.held
        if not seq.finished and p.stop:
            # hold back what could still turn out to be the start of a stop string
            cut = max(0, len(delta) - (max(len(s) for s in p.stop) - 1))
            delta, out.held = delta[:cut], delta[cut:]
        else:
            out.held = ""
        if delta and out.sent is not None:
            out.sent.append(delta)
        completion = CompletionOutput(
            index=0,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            delta_text=delta,
            delta_token_ids=[token] if token is not None else [],
            delta_logprobs=None if p.logprobs is None else [logprob] if logprob is not None
            else [],
            num_tokens=len(seq.output_ids),
        )
        prompt_lps = self._prompt_lps.get(seq.seq_id)
        if seq.finished:
            if out.sent is not None:  # the whole view, built once
                completion.text = "".join(out.sent)
                completion.token_ids = list(seq.output_ids)
                completion.logprobs = list(seq.logprobs) if p.logprobs is not None else None
            seq.metrics.finished = time.time()
            self._forget(seq)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_ids, [completion],
                             seq.finished, seq.metrics, num_cached_tokens=seq.num_cached,
                             prompt_logprobs=prompt_lps)

    def _forget(self, seq: Sequence) -> None:
        self._prompt_lps.pop(seq.seq_id, None)
        self._seqs.pop(seq.seq_id, None)
        self._detok.pop(seq.seq_id, None)
        self._text.pop(seq.seq_id, None)
        self.sampler.forget(seq.seq_id)
        self.masks.forget(seq.seq_id)

    # ---- scoring (evaluation and tests) --------------------------------------------------
    def prompt_logits(self, prompt_ids: list[int]):
        """float32 logits `[T, vocab]` of every prompt position, computed with the sharded
        prefill (one chunk, no KV kept)."""
        if self.scheduler.has_work():
            raise RuntimeError("prompt_logits needs an idle engine")
        n = len(prompt_ids)
        if not 0 < n <= self.max_model_len:
            raise RequestTooLong(f"prompt_logits takes 1 to {self.max_model_len} tokens; got {n}")
        with self.scheduler.scratch_tables(n) as tables:
            plan = PrefillPlan(seq_id=-1, row=self.scheduler.scratch_row,
                               tokens=list(prompt_ids), start=0, prefix_len=[0] * self.world,
                               sample=False, strategy=self._choose_strategy(n, 0),
                               all_logits=True)
            step = StepPlan("prefill", prefill=plan, tables=tables)
            return self.cluster.run(self.scheduler.blocks.hand_over(step))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every rank; those not gone `timeout` seconds after the stop plan are
        killed."""
        self.cluster.shutdown(timeout)
        gc.unfreeze()  # what start-up made can be collected again
        if self.trace is not None:
            self.trace.close()
