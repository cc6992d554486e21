"""`tr-bench`: load generators and timers for any OpenAI-compatible server.

`tr-bench serve` sends a data set of prompts at a request rate (Poisson arrivals, or all at
once) under a concurrency cap and reports throughput and per-token latencies, as
`vllm bench serve` does; `tr-bench latency` times one request of given lengths, repeated.
Nothing here imports the engine: the server is reached over HTTP only.
"""

from __future__ import annotations
