"""`tr-bench serve`: a data set of prompts sent to a server at a request rate, as
`vllm bench serve` does, and the run's throughput and latencies.

Requests arrive as a Poisson process of --request-rate per second (a gamma process with
--burstiness other than 1), or all at once with the default `inf`; --max-concurrency caps
those in flight (the rest wait their turn). One request is sent alone first, so that a wrong
URL, model or flag fails at once with the server's message instead of N times. The
clock runs from the first request of the run to the last one's end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import httpx
from tqdm import tqdm

from .client import ENDPOINTS, RequestResult, RequestSpec, send
from .datasets import Sample, load_tokenizer, random_samples, sharegpt_samples
from .metrics import summarize, table

DATASETS = ("random", "sharegpt")
HTTP_TIMEOUT_S = 6 * 3600  # a long prompt under load may take a while; never cut a request


@dataclass(frozen=True)
class ServeBenchConfig:
    """One run of `tr-bench serve` (the flags' names and meanings; see add_arguments)."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    endpoint: str = "/v1/completions"
    tokenizer: str | None = None
    dataset_name: str = "random"
    dataset_path: str | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    sharegpt_output_len: int | None = None
    num_prompts: int = 1000
    max_concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    temperature: float | None = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    api_key: str | None = None
    metric_percentiles: tuple[float, ...] = (99.0,)
    save_result: bool = False
    result_dir: str | None = None
    result_filename: str | None = None
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}")
        if self.dataset_name not in DATASETS:
            raise ValueError(f"--dataset-name must be one of {', '.join(DATASETS)}")
        if self.dataset_name == "sharegpt" and not self.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE")
        for name in ("num_prompts", "random_input_len", "random_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be positive (inf: all at once); "
                             f"got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be positive; got {self.burstiness}")
        if not all(0 < p < 100 for p in self.metric_percentiles):
            raise ValueError("--metric-percentiles must lie in (0, 100)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server, without /v1 (default: http://127.0.0.1:8000)")
    g.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    g.add_argument("--model", help="the model name to send (default: the first one "
                   "GET /v1/models lists)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    g = p.add_argument_group("data set")
    g.add_argument("--dataset-name", choices=DATASETS, default="random",
                   help="random: random token ids of --random-input-len; sharegpt: the "
                   "first two turns of each conversation of --dataset-path (a JSON list or "
                   "JSON Lines)")
    g.add_argument("--dataset-path", metavar="FILE")
    g.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="counts and draws prompt tokens (default: --model if it is a "
                   "local folder, else the embedded model's)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len * (1 - r), len * (1 + r)] (default: 0)")
    g.add_argument("--random-prefix-len", type=int, default=0,
                   help="random tokens every prompt starts with (default: 0)")
    g.add_argument("--sharegpt-output-len", type=int,
                   help="max_tokens of every sharegpt request (default: the reply's length)")
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 is Poisson, lower is burstier")
    g.add_argument("--max-concurrency", type=int,
                   help="most requests in flight at once (default: no cap)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="(default: 0, greedy)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate max_tokens whatever the model says (vLLM's extension)")
    g = p.add_argument_group("output")
    g.add_argument("--metric-percentiles", default="99",
                   help="comma-separated percentiles to report (default: 99)")
    g.add_argument("--save-result", action="store_true", help="write the results as JSON")
    g.add_argument("--result-dir", help="folder of the JSON file (default: .)")
    g.add_argument("--result-filename",
                   help="its name (default: ENDPOINT-RATEqps-concurrencyC-MODEL-DATE.json)")
    g.add_argument("--result-file", metavar="PATH",
                   help="write the JSON to PATH (implies --save-result)")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    fields = vars(args).copy()
    fields.pop("command", None)
    result_file = fields.pop("result_file", None)
    if result_file:
        fields["save_result"] = True
        fields["result_dir"], fields["result_filename"] = os.path.split(result_file)
    fields["metric_percentiles"] = _percentiles(fields["metric_percentiles"])
    return ServeBenchConfig(**fields)


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--metric-percentiles: not a comma-separated list of numbers: "
                         f"{text!r}") from None


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"tr-bench serve: {e}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run(config))
    except BenchError as e:
        print(f"tr-bench serve: {e}", file=sys.stderr)
        return 1
    return 0 if summary["completed"] else 1


class BenchError(Exception):
    """The run cannot go on: the server is unreachable or refused the first request."""


async def run(config: ServeBenchConfig, out=None) -> dict:
    """Run the benchmark; print the table (to `out`, default stdout), write the JSON when
    asked, and return the summary."""
    out = out or sys.stdout
    limits = httpx.Limits(max_connections=config.max_concurrency or config.num_prompts,
                          max_keepalive_connections=config.max_concurrency or
                          config.num_prompts)
    timeout = httpx.Timeout(HTTP_TIMEOUT_S, connect=60.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        model = config.model or await first_model(http, config.base_url, config.api_key)
        spec = RequestSpec(base_url=config.base_url, model=model, endpoint=config.endpoint,
                           temperature=config.temperature, top_p=config.top_p,
                           top_k=config.top_k, ignore_eos=config.ignore_eos,
                           api_key=config.api_key)
        samples = make_samples(config, model)
        print("Starting initial single prompt test run...", file=out, flush=True)
        first = await send(http, spec, samples[0])
        if not first.success:
            raise BenchError(f"the test request failed: {first.error}")
        rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
        print(f"Traffic request rate: {rate}, burstiness: {config.burstiness:g}, "
              f"max concurrency: {config.max_concurrency or 'none'}", file=out, flush=True)
        results, duration = await _drive(http, spec, samples, config)
    summary = summarize(results, duration, config.metric_percentiles)
    print(table(summary, config.metric_percentiles), file=out, flush=True)
    if summary["errors"]:
        print(f"first error: {summary['errors'][0]}", file=out)
    if config.save_result:
        path = _write(config, model, summary)
        print(f"results written to {path}", file=out)
    return summary


def make_samples(config: ServeBenchConfig, model: str) -> list[Sample]:
    name = config.tokenizer or (model if os.path.isdir(model) else None)
    tokenizer = load_tokenizer(name)
    if config.dataset_name == "sharegpt":
        return sharegpt_samples(config.dataset_path, tokenizer, config.num_prompts,
                                output_len=config.sharegpt_output_len, seed=config.seed)
    # completions take token ids, so their lengths are exact; chat takes text
    return random_samples(tokenizer, config.num_prompts, config.random_input_len,
                          config.random_output_len, range_ratio=config.random_range_ratio,
                          prefix_len=config.random_prefix_len, seed=config.seed,
                          as_text=config.endpoint == "/v1/chat/completions")


async def first_model(http: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = await http.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise BenchError(f"cannot list the models of {base_url} ({e}); pass --model") from None


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds before each of `n` requests: gamma-distributed with mean 1 / rate (shape
    `burstiness`; 1 is exponential, a Poisson process), all 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


async def _drive(http: httpx.AsyncClient, spec: RequestSpec, samples: list[Sample],
                 config: ServeBenchConfig) -> tuple[list[RequestResult], float]:
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    # a bar on a terminal only: in a log file it is noise
    progress = tqdm(total=len(samples), disable=config.disable_tqdm or not sys.stderr.isatty())

    async def one(sample: Sample) -> RequestResult:
        try:
            if gate is None:
                return await send(http, spec, sample)
            async with gate:
                return await send(http, spec, sample)
        finally:
            progress.update()

    tasks = []
    start = time.perf_counter()
    for gap, sample in zip(arrival_gaps(len(samples), config.request_rate, config.burstiness,
                                        config.seed), samples):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.ensure_future(one(sample)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return list(results), duration


def _write(config: ServeBenchConfig, model: str, summary: dict) -> str:
    now = datetime.now()
    record = {
        "date": now.strftime("%Y%m%d-%H%M%S"),
        "endpoint": config.endpoint,
        "base_url": config.base_url,
        "model_id": model,
        "tokenizer_id": config.tokenizer,
        "num_prompts": config.num_prompts,
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in dataclasses.asdict(config).items() if k != "api_key"},
        **summary,
    }
    if record["config"]["request_rate"] == math.inf:
        record["config"]["request_rate"] = "inf"
    name = config.result_filename
    if not name:
        rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
        kind = "chat" if config.endpoint.endswith("chat/completions") else "completions"
        short = os.path.basename(model.rstrip("/")) or "model"
        name = (f"{kind}-{rate}qps-concurrency{config.max_concurrency or 'none'}-{short}-"
                f"{record['date']}.json")
    path = os.path.join(config.result_dir or ".", name)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return path
