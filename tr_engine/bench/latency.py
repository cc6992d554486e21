"""`tr-bench latency`: one request of --input-len prompt tokens and --output-len generated
tokens (ignore_eos, greedy), sent alone and timed, --num-iters times after
--num-iters-warmup untimed ones: end-to-end latency, TTFT and TPOT of each, their mean and
percentiles."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import httpx
import numpy as np

from .client import ENDPOINTS, RequestSpec, send
from .datasets import load_tokenizer, random_samples
from .serve import HTTP_TIMEOUT_S, BenchError, first_model

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server, without /v1 (default: http://127.0.0.1:8000)")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    p.add_argument("--model", help="(default: the first one GET /v1/models lists)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="draws the prompt's tokens (default: --model if it is a local "
                   "folder, else the embedded model's)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", metavar="PATH", help="write the latencies as JSON")


def main(args: argparse.Namespace) -> int:
    for name in ("input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            print(f"tr-bench latency: --{name.replace('_', '-')} must be at least 1",
                  file=sys.stderr)
            return 2
    if args.num_iters_warmup < 0:
        print("tr-bench latency: --num-iters-warmup must be >= 0", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(args))
    except BenchError as e:
        print(f"tr-bench latency: {e}", file=sys.stderr)
        return 1
    return 0


async def run(args: argparse.Namespace, out=None) -> dict:
    out = out or sys.stdout
    async with httpx.AsyncClient(timeout=httpx.Timeout(HTTP_TIMEOUT_S, connect=60.0)) as http:
        model = args.model or await first_model(http, args.base_url, args.api_key)
        spec = RequestSpec(base_url=args.base_url, model=model, endpoint=args.endpoint,
                           temperature=0.0, ignore_eos=True, api_key=args.api_key)
        tokenizer = load_tokenizer(args.tokenizer or (model if os.path.isdir(model) else None))
        total = args.num_iters_warmup + args.num_iters
        # a fresh prompt each time, so that no run reuses another's prefix cache
        samples = random_samples(tokenizer, total, args.input_len, args.output_len,
                                 seed=args.seed, as_text=args.endpoint.endswith("chat/completions"))
        results = []
        for i, sample in enumerate(samples):
            r = await send(http, spec, sample)
            if not r.success:
                raise BenchError(f"request {i + 1} failed: {r.error}")
            if i >= args.num_iters_warmup:
                results.append(r)
                print(f"iteration {len(results)}: {r.latency:.4f} s, TTFT "
                      f"{r.ttft * 1000:.2f} ms, {r.output_tokens} tokens", file=out)
    latencies = np.array([r.latency for r in results])
    record = {
        "input_len": args.input_len,
        "output_len": args.output_len,
        "avg_latency": float(latencies.mean()),
        "latencies": latencies.tolist(),
        "percentiles": {str(p): float(np.percentile(latencies, p)) for p in PERCENTILES},
        "avg_ttft": float(np.mean([r.ttft for r in results])),
        "avg_tpot": float(np.mean([r.tpot or 0.0 for r in results])),
        "output_tokens": [r.output_tokens for r in results],
    }
    print(f"Avg latency: {record['avg_latency']:.4f} seconds", file=out)
    for p, v in record["percentiles"].items():
        print(f"{p}% percentile latency: {v:.4f} seconds", file=out)
    print(f"Avg TTFT: {record['avg_ttft'] * 1000:.2f} ms", file=out)
    print(f"Avg TPOT: {record['avg_tpot'] * 1000:.2f} ms", file=out)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return record
