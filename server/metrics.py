"""Prometheus metrics, in a registry of their own (`tr_engine:` prefix, vLLM's naming).

Latency histograms are observed per request from RequestOutput.metrics timestamps as outputs
pass through the server. Queue lengths, KV usage and token totals are read from
`engine.stats()` when /metrics is scraped, so they are never stale; once the engine is dead
(`tr_engine:engine_healthy` 0) the gauges of running work read 0.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from tr_engine.outputs import RequestOutput

log = logging.getLogger("tr_engine.server")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                    40.0, 80.0, 160.0, 320.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class EngineCollector:
    """Reads engine.stats() at scrape time."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        healthy = bool(self.engine.healthy)
        yield _gauge("tr_engine:engine_healthy",
                     "1 while the engine serves, 0 once it or a rank died.", int(healthy))
        try:
            stats = self.engine.stats()
        except Exception as exc:  # a dead engine must not break /metrics
            log.warning("engine.stats() failed: %r", exc)
            return
        # A dead engine runs nothing and holds nothing: its last values would mislead.
        live = 1 if healthy else 0
        yield _gauge("tr_engine:num_requests_running",
                     "Requests being prefilled or decoded.", stats.running * live)
        yield _gauge("tr_engine:num_requests_waiting", "Requests queued.",
                     stats.waiting * live)
        used = GaugeMetricFamily("tr_engine:kv_cache_used_tokens",
                                 "Token slots of this rank's KV pages that running requests "
                                 "hold or have reserved for their prompts (idle cached pages "
                                 "count as free).", labels=["rank"])
        usage = GaugeMetricFamily("tr_engine:kv_cache_usage_ratio",
                                  "kv_cache_used_tokens over this rank's capacity (0-1).",
                                  labels=["rank"])
        capacity = max(1, stats.kv_capacity_tokens)
        for rank, tokens in enumerate(stats.kv_used_tokens):
            used.add_metric([str(rank)], tokens * live)
            usage.add_metric([str(rank)], tokens * live / capacity)
        yield used
        yield usage
        yield _gauge("tr_engine:kv_cache_capacity_tokens",
                     "KV cache capacity of each rank, in tokens.", stats.kv_capacity_tokens)
        yield _gauge("tr_engine:prefill_tokens_per_second",
                     "Prefill throughput of the most recent prefill step.",
                     stats.prefill_tokens_per_s)
        yield _counter("tr_engine:prompt_tokens", "Prompt tokens prefilled.",
                       stats.prompt_tokens_total)
        yield _counter("tr_engine:generation_tokens", "Tokens generated.",
                       stats.generation_tokens_total)
        yield _counter("tr_engine:prefix_cache_queries",
                       "Prompt tokens looked up in the prefix cache.",
                       stats.prefix_cache_queries)
        yield _counter("tr_engine:prefix_cache_hits",
                       "Prompt tokens whose KV the prefix cache held.", stats.prefix_cache_hits)
        yield _counter("tr_engine:num_preemptions",
                       "Running requests whose KV was freed to make room, to be recomputed "
                       "from their prompt and the tokens they had.", stats.num_preemptions)
        yield _counter("tr_engine:failed_steps",
                       "Engine steps whose forward raised (an out-of-memory, say): their "
                       "requests failed, the engine went on.", stats.failed_steps)
        host_used = GaugeMetricFamily("tr_engine:kv_host_used_tokens",
                                      "Tokens of evicted KV blocks held in this rank's share "
                                      "of the host tier.", labels=["rank"])
        for rank, tokens in enumerate(stats.host_used_tokens):
            host_used.add_metric([str(rank)], tokens * live)
        yield host_used
        yield _gauge("tr_engine:kv_host_capacity_tokens",
                     "Host tier capacity of each rank, in tokens (0: no tier).",
                     stats.host_capacity_tokens)
        yield _counter("tr_engine:kv_host_hit_tokens",
                       "Prompt tokens whose KV came back from the host tier.",
                       stats.host_hit_tokens)
        yield _counter("tr_engine:kv_host_offloaded_bytes",
                       "Bytes of KV copied from the cards to the host tier (all ranks).",
                       stats.host_offloaded_bytes)
        yield _counter("tr_engine:kv_host_restored_bytes",
                       "Bytes of KV copied from the host tier back to the cards (all ranks).",
                       stats.host_restored_bytes)
        yield _counter("tr_engine:kv_host_restore_seconds",
                       "Time rank 0 spent copying KV back from the host tier.",
                       stats.host_restore_s)
        yield _counter("tr_engine:attention_shapes_built",
                       "Attention kernel builds for shapes met the first time (cuDNN graphs on "
                       "rank 0); a request that meets one waits for the build.",
                       stats.attention_shapes_built)
        yield _counter("tr_engine:kernel_builds_late",
                       "Kernel variants rank 0 built after start-up (cuDNN graphs, Triton "
                       "specialisations): each one a request waited for.",
                       stats.kernel_builds_late)
        bounds, counts, total = stats.batched_tokens
        cumulative, buckets = 0, []
        for bound, n in zip([*(str(float(b)) for b in bounds), "+Inf"], counts):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "tr_engine:num_batched_tokens",
            "Tokens per engine step: its prefill chunk's and its decode tokens.",
            buckets=buckets, sum_value=total)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.ttft = Histogram("tr_engine:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("tr_engine:inter_token_latency_seconds",
                             "Time between two generated tokens of a request.",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("tr_engine:e2e_request_latency_seconds",
                             "Time from arrival to the last token of a finished request.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("tr_engine:request_queue_time_seconds",
                               "Time from arrival to the first scheduling of a request.",
                               buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("tr_engine:request_success",
                                "Requests finished, by finish reason.", ["finished_reason"],
                                registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Follows one request's outputs and observes its latencies once each."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.received = time.time()  # fallback when the engine leaves arrival unset
        self.last_token: float | None = None

    def observe(self, out: RequestOutput) -> None:
        m = out.metrics
        arrival = m.arrival or self.received
        new = len(out.outputs[0].delta_token_ids)
        now = m.last_token or time.time()
        if new:
            if self.last_token is None:
                self.metrics.ttft.observe(max(0.0, (m.first_token or now) - arrival))
                if m.first_scheduled is not None:
                    self.metrics.queue.observe(max(0.0, m.first_scheduled - arrival))
            else:
                gap = max(0.0, now - self.last_token) / new
                for _ in range(new):
                    self.metrics.itl.observe(gap)
            self.last_token = now
        if out.finished:
            end = m.finished or m.last_token or time.time()
            self.metrics.e2e.observe(max(0.0, end - arrival))
            self.metrics.finished.labels(out.outputs[0].finish_reason or "unknown").inc()
