"""Serving through a real tr-serve over HTTP: decode stalls while a long prompt prefills, and
the throughput of concurrent streams.

    python benchmarks/serving.py --worlds 1,2 --out docs/PERFORMANCE.md
    python benchmarks/serving.py --tiny --device cpu --worlds 1,2 --long 2000 --streams 3 \
        --stall-prompt 200 --stall-tokens 256 --concurrency 4,8 --prompt 200 --output 32

Llama-3.1-8B shape, random bf16 weights (the checkpoint of benchmarks/prefill.py), or with
--tiny a 2-layer Llama of hidden size 64 written by transformers, for a run on the CPU. One
`tr-serve` per world size in --worlds, one after the other, driven by the openai client
(AsyncOpenAI): completions of random byte token ids (fresh for every request, so the prefix
cache does not hit), streamed, temperature 0, ignore_eos. With --temperature (and --top-p,
--top-k) the throughput scenario also runs each C sampled, and with --repetition-penalty
sampled with that penalty too, on the same server right after greedy: the rows side by side,
each against greedy's tokens/s. Every time is client wall clock
(time.perf_counter), from just before the request is sent.

The server sends no chunk for a token that adds no text (a random model's tokens mostly
decode to none), so every request asks for logprobs 0: then each token is one chunk. Each
stream's chunk count is checked against its usage (stream_options include_usage) and the
logprobs it carried; a row where they differ is marked. --no-logprobs drops that (tokens/s
still comes from the usage; gaps are then between chunks, not tokens).

stalls: --streams streams decode; once each has --calm-tokens tokens, a prompt of --long
tokens arrives (streamed, max_tokens 1). Reported: the calm gap between two tokens of a
stream (median before the long prompt was sent), the largest and P99 gap of the streams that
overlaps the long prompt's prefill (its send to its first token), the streams' tokens inside
that window, and the long prompt's TTFT, against its TTFT alone on the idle server (another
prompt of the same length, after one untimed warm-up prompt of that length). How the server
splits a long prefill decides the stalls: pass its flags with --server-args.

lone: for each length in --lone, one request alone (--lone-output tokens); with
--shard-mins 0,1048576 at --worlds 2 it shows where sharding a prompt starts to pay.

throughput: for each C in --concurrency, C requests of --prompt tokens and --output tokens
sent at once (after an untimed round of the same shape with max_tokens 2). Reported: output
tokens per second (all generated tokens over first send to last token), median, mean and P99
gap between a stream's tokens after its first (a median far below the mean: tokens arrive in
bursts), median and largest TTFT, and the client's CPU use
(a client near 100% of a core is the bottleneck, not the server). With --schema-fractions
0,0.5, each C runs once per fraction: that share of the C streams asks for a JSON schema
(structured_outputs: an object with one string of at least 128 x --output characters, so it
runs to max_tokens like the others), and the table says its tokens/s against the same C
without schemas. --tokenizer PATH puts a real vocabulary's tokenizer in a copy of the
checkpoint (the grammar's mask costs more over a real vocabulary than over byte tokens).
The bound per decode step
is the weights read once at the device-copy bandwidth measured here before the servers
start (or --bound-ms); with KV, also the KV of this rank's share of the mean context.

admission: for each C in --concurrency, C requests of --prompt tokens with max_tokens
--admission-max-tokens (4096, a chat request's default) sent at once, each read for
--output tokens and then closed by the client (a reply of that length). Reported: the most
requests running at once (tr_engine:num_requests_running, polled from /metrics every 50 ms),
output tokens per second, the median TTFT, and the preemptions the run caused. Run it
against the code before (--pythonpath) and after with the same --server-args (a
--kv-cache-tokens that binds) to compare how many fit:

    python benchmarks/serving.py --scenarios admission --concurrency 64,256 \
        --max-num-seqs 256 --server-args "--kv-cache-tokens 160000"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import copy_gbps, machine, today, tr_serve, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Stream:
    """One request as the client saw it."""

    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of each chunk with a choice
    logprob_tokens: int = 0  # tokens the chunks' logprobs named
    usage: int | None = None  # completion_tokens of the final usage chunk
    finish: str | None = None
    schema: bool = False  # asked for the JSON schema
    text: str = ""

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]

    def ttft(self) -> float:
        return self.times[0] - self.sent

    def counted(self, logprobs: bool) -> bool:
        n = len(self.times)
        # a schema's stream must be the schema's text (the mask worked on this device); its
        # first chunk may carry bytes left undecoded at the end of the random prompt
        return (self.usage == n and self.finish == "length"
                and (not logprobs or self.logprob_tokens == n)
                and (not self.schema or '{"text": "' in self.text[:16]))


def write_tiny(path: Path, max_len: int) -> None:
    """A 2-layer Llama (hidden 64, 4 query / 2 KV heads, vocabulary 512) with the tests'
    byte-level tokenizer: ids above 258 decode to no text, as most of the 8B shape's do."""
    from prefill import reuse_checkpoint

    if reuse_checkpoint(path, max_len):
        return
    from checkpoints import make_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=512, max_position_embeddings=max_len, rms_norm_eps=1e-5,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    make_tokenizer().save_pretrained(path)


def with_tokenizer(ckpt: Path, tokenizer: Path) -> Path:
    """A copy of `ckpt` (its weights linked) with the tokenizer of `tokenizer`."""
    from transformers import AutoTokenizer

    out = ckpt.with_name(ckpt.name + "-tok")
    out.mkdir(exist_ok=True)
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            if not (out / f.name).exists():
                (out / f.name).symlink_to(f.resolve())
        elif f.name in ("config.json", "generation_config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


def sizes(path: Path, dtype: str) -> tuple[int, int]:
    """(weight bytes, KV bytes per token) of a Llama-style checkpoint, from its config."""
    c = json.loads((path / "config.json").read_text())
    h, layers, mlp, vocab = (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"],
                             c["vocab_size"])
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or h // heads
    if dtype == "auto":
        dtype = c.get("dtype") or c.get("torch_dtype") or "float32"
    e = BYTES[dtype]
    per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * mlp + 2 * h
    params = layers * per_layer + vocab * h * (1 if c.get("tie_word_embeddings") else 2) + h
    return params * e, 2 * layers * kv * hd * e


def where() -> str:
    if torch.cuda.is_available():
        return machine()
    return (f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "?"
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def ranks(n: int) -> str:
    return f"{n} rank" + ("s" if n > 1 else "")


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


class Client:
    """The openai client on one server, and the random prompts it sends."""

    def __init__(self, url: str, args) -> None:
        from openai import AsyncOpenAI

        self.api = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=3600,
                               max_retries=0)
        self.url, self.args = url, args
        self.rng = random.Random(args.seed)
        self.model = ""

    def fresh(self, n: int) -> list[int]:
        return self.rng.choices(range(256), k=n)  # byte tokens: in every byte-level vocabulary

    async def stream(self, n_prompt: int, max_tokens: int, rec: Stream | None = None,
                     schema: bool = False, sampling: dict | None = None) -> Stream:
        rec = rec or Stream()
        ids = self.fresh(n_prompt)
        extra = {} if self.args.no_logprobs else {"logprobs": 0}
        sampling = dict(sampling or GREEDY)  # top_k and repetition_penalty are vLLM's extras
        body = {"ignore_eos": True, **{k: sampling.pop(k) for k in ("top_k",
                                                                    "repetition_penalty")
                                       if k in sampling}}
        if schema:  # a string that cannot close before max_tokens (tokens of <= 128 chars)
            body["structured_outputs"] = {"json": {
                "type": "object", "required": ["text"],
                "properties": {"text": {"type": "string", "minLength": 128 * max_tokens}}}}
        rec.schema = schema
        rec.sent = time.perf_counter()
        events = await self.api.completions.create(
            model=self.model, prompt=ids, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body=body, **sampling, **extra)
        async for chunk in events:
            t = time.perf_counter()
            if chunk.choices:
                rec.times.append(t)
                c = chunk.choices[0]
                rec.text += c.text
                if c.logprobs is not None and c.logprobs.tokens:
                    rec.logprob_tokens += len(c.logprobs.tokens)
                rec.finish = c.finish_reason or rec.finish
            if chunk.usage is not None:
                rec.usage = chunk.usage.completion_tokens
        return rec


def check(recs: list[Stream], what: str, args) -> bool:
    bad = [r for r in recs if not r.counted(not args.no_logprobs)]
    for r in bad[:5]:
        print(f"WARNING !!! {what}: {len(r.times)} chunks, usage says {r.usage} tokens, "
              f"text {r.text[:24]!r}, "
              f"logprobs named {r.logprob_tokens}, finish {r.finish!r}: a chunk is not one "
              "token, or the request did not run to max_tokens !!!",
              file=sys.stderr, flush=True)
    return not bad


async def stalls(client: Client, args, world: int) -> dict:
    await client.stream(64, 4)
    cold = await client.stream(args.long, 1)  # untimed: this length's shapes, built once
    recs = [Stream() for _ in range(args.streams)]
    tasks = [asyncio.ensure_future(client.stream(args.stall_prompt, args.stall_tokens, r))
             for r in recs]
    while min(len(r.times) for r in recs) < args.calm_tokens:
        done = [t for t in tasks if t.done()]
        if done:
            done[0].result()  # its error, if it had one
            raise RuntimeError("a stream ended before the others had --calm-tokens tokens")
        await asyncio.sleep(0.002)
    long = await asyncio.to_thread(_on_own_loop, client, args.long, 1)
    await asyncio.gather(*tasks)
    idle = await client.stream(args.long, 1)

    send, first = long.sent, long.times[0]
    calm, during, inside = [], [], []
    for r in recs:
        for a, b in zip(r.times, r.times[1:]):
            if b <= send:
                calm.append(b - a)
            if b > send and a < first:
                during.append(b - a)
        inside.append(sum(send < t <= first for t in r.times))
    during = during or [math.nan]  # every stream had ended: flagged below
    row = {
        "world": world, "streams": args.streams, "long": args.long,
        "calm_ms": statistics.median(calm) * 1e3, "max_gap_ms": max(during) * 1e3,
        "p99_gap_ms": pct(during, 99) * 1e3, "tokens_inside": statistics.median(inside),
        "long_ttft": long.ttft(), "idle_ttft": idle.ttft(), "cold_ttft": cold.ttft(),
        "ended_early": sum(r.times[-1] <= first for r in recs),
        "counted": check([*recs, long, idle, cold], f"stalls, {world} rank(s)", args),
    }
    if row["ended_early"]:
        print(f"WARNING !!! {row['ended_early']} stream(s) ended before the long prompt's "
              "first token: raise --stall-tokens !!!", file=sys.stderr, flush=True)
    return row


def _on_own_loop(client: Client, n_prompt: int, max_tokens: int) -> Stream:
    """One request from a client of its own, on this thread's own event loop: building a
    long token-id request is the openai client's work (about a second at 120K tokens), and
    on the streams' loop it would hold their reading, a gap of the client's, not the
    server's."""
    other = Client(client.url, client.args)
    other.model, other.rng = client.model, random.Random(client.args.seed + 1)

    async def go() -> Stream:
        try:
            return await other.stream(n_prompt, max_tokens)
        finally:
            await other.api.close()

    return asyncio.run(go())


GREEDY = {"temperature": 0.0}


def samplings(args) -> list[tuple[str, dict]]:
    """(label, request fields) of each way the throughput scenario samples: greedy, then
    sampled (--temperature, --top-p, --top-k), then that with --repetition-penalty."""
    out = [("greedy", GREEDY)]
    sampled = {}
    if args.temperature is not None:
        sampled["temperature"] = args.temperature
        if args.top_p is not None:
            sampled["top_p"] = args.top_p
        if args.top_k is not None:
            sampled["top_k"] = args.top_k
        out.append(("sampled", sampled))
    if args.repetition_penalty is not None:
        out.append(("sampled + repetition" if sampled else "greedy + repetition",
                    {**(sampled or GREEDY), "repetition_penalty": args.repetition_penalty}))
    return out


def describe(sampling: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sampling.items())


async def throughput(client: Client, args, world: int, c: int, fraction: float = 0.0,
                     label: str = "greedy", sampling: dict = GREEDY) -> dict:
    k = round(fraction * c)  # streams with a JSON schema
    await asyncio.gather(*(client.stream(args.prompt, 2, schema=i < k, sampling=sampling)
                           for i in range(c)))
    recs = [Stream() for _ in range(c)]
    cpu = time.process_time()
    await asyncio.gather(*(client.stream(args.prompt, args.output, r, schema=i < k,
                                         sampling=sampling)
                           for i, r in enumerate(recs)))
    cpu = time.process_time() - cpu
    wall = max(r.times[-1] for r in recs) - min(r.sent for r in recs)
    tokens = sum(r.usage if r.usage is not None else len(r.times) for r in recs)
    gaps = [g for r in recs for g in r.gaps()]
    ttfts = [r.ttft() for r in recs]
    return {
        "world": world, "concurrency": c, "prompt": args.prompt, "output": args.output,
        "schema_streams": k, "sampling": label, "params": describe(sampling),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "itl_ms": statistics.median(gaps) * 1e3, "mean_itl_ms": statistics.fmean(gaps) * 1e3,
        "p99_itl_ms": pct(gaps, 99) * 1e3,
        "ttft_s": statistics.median(ttfts), "max_ttft_s": max(ttfts),
        "client_cpu": cpu / wall,
        "counted": check(recs, f"throughput, {world} rank(s), {c} streams", args),
    }


async def admission(client: Client, args, world: int, c: int, url: str) -> dict:
    """C requests asking for max_tokens --admission-max-tokens, each closed by the client
    after --output tokens: how many the server runs at once (see the module's doc)."""
    import httpx

    async def metric(h, name: str) -> float:
        for line in (await h.get(f"{url}/metrics")).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0  # (a server without the metric: none)

    async def one(rec: Stream) -> None:
        ids = client.fresh(args.prompt)
        rec.sent = time.perf_counter()
        events = await client.api.completions.create(
            model=client.model, prompt=ids, max_tokens=args.admission_max_tokens,
            temperature=0.0, stream=True, logprobs=0, extra_body={"ignore_eos": True})
        async for chunk in events:
            if chunk.choices:
                rec.times.append(time.perf_counter())
                if len(rec.times) >= args.output:
                    break
        await events.close()  # the client is done: the server aborts the request

    peak, done = [0.0], asyncio.Event()
    async with httpx.AsyncClient(timeout=60) as h:
        async def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], await metric(h, "tr_engine:num_requests_running"))
                await asyncio.sleep(0.05)

        preempted = await metric(h, "tr_engine:num_preemptions_total")
        recs = [Stream() for _ in range(c)]
        poller = asyncio.ensure_future(poll())
        await asyncio.gather(*(one(r) for r in recs))
        done.set()
        await poller
        preempted = await metric(h, "tr_engine:num_preemptions_total") - preempted
    wall = max(r.times[-1] for r in recs) - min(r.sent for r in recs)
    tokens = sum(len(r.times) for r in recs)
    return {"world": world, "concurrency": c, "prompt": args.prompt, "output": args.output,
            "max_tokens": args.admission_max_tokens, "peak_running": peak[0],
            "tokens_per_s": tokens / wall, "wall_s": wall,
            "ttft_s": statistics.median(r.ttft() for r in recs), "preemptions": preempted}


async def lone(client: Client, args, world: int, n: int) -> dict:
    """One request alone: a prompt of n tokens, --lone-output tokens; where sharding a
    prompt starts to pay (compare servers with --shard-mins 0 and a large value)."""
    await client.stream(n, 2)  # untimed: this length's shapes
    rec = await client.stream(n, args.lone_output, Stream())
    return {"world": world, "prompt": n, "output": args.lone_output, "ttft_s": rec.ttft(),
            "itl_ms": statistics.median(rec.gaps()) * 1e3,
            "total_s": rec.times[-1] - rec.sent,
            "counted": check([rec], f"lone, {world} rank(s), {n} tokens", args)}


async def drive(url: str, args, world: int, shard_min: int | None) -> list[dict]:
    client = Client(url, args)
    rows = []
    async with client.api:
        client.model = (await client.api.models.list()).data[0].id
        if "stalls" in args.scenarios:
            rows.append({"scenario": "stalls", **await stalls(client, args, world)})
            print(json.dumps(rows[-1]), flush=True)
        if "throughput" in args.scenarios:
            for c in args.concurrency:
                for f in args.schema_fractions:
                    for label, sampling in samplings(args):
                        rows.append({"scenario": "throughput", **await throughput(
                            client, args, world, c, f, label, sampling)})
                        print(json.dumps(rows[-1]), flush=True)
        if "admission" in args.scenarios:
            for c in args.concurrency:
                rows.append({"scenario": "admission",
                             **await admission(client, args, world, c, url)})
                print(json.dumps(rows[-1]), flush=True)
        if "lone" in args.scenarios:
            for n in args.lone:
                rows.append({"scenario": "lone", **await lone(client, args, world, n)})
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["shard_min"] = shard_min
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--worlds", default="1", help="world sizes, one server each: 1,2")
    ap.add_argument("--scenarios", default="stalls,throughput")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama, for the CPU")
    ap.add_argument("--ckpt", default=None,
                    help="default /tmp/llama31-8b-random, with --tiny /tmp/llama-tiny-random")
    ap.add_argument("--dtype", default=None, help="default bfloat16, with --tiny auto")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: room for the longest request here")
    ap.add_argument("--max-num-seqs", type=int, default=64 + 8)
    ap.add_argument("--server-args", default="",
                    help="more tr-serve flags, one string: --server-args='--enforce-eager'")
    ap.add_argument("--port", type=int, default=8216)
    ap.add_argument("--pythonpath", default=None, help="run the servers from this code")
    ap.add_argument("--streams", type=int, default=8, help="stalls: decoding streams")
    ap.add_argument("--long", type=int, default=120_000, help="stalls: the long prompt")
    ap.add_argument("--stall-prompt", type=int, default=1000, help="stalls: streams' prompt")
    ap.add_argument("--stall-tokens", type=int, default=2048, help="stalls: streams' output")
    ap.add_argument("--calm-tokens", type=int, default=64,
                    help="stalls: tokens each stream has before the long prompt is sent")
    ap.add_argument("--concurrency", default="16,64", help="throughput: requests at once")
    ap.add_argument("--prompt", type=int, default=1000, help="throughput: prompt tokens")
    ap.add_argument("--output", type=int, default=256, help="throughput: output tokens")
    ap.add_argument("--temperature", type=float, default=None,
                    help="throughput: also sample at this temperature (beside greedy)")
    ap.add_argument("--top-p", type=float, default=None, help="with --temperature")
    ap.add_argument("--top-k", type=int, default=None, help="with --temperature")
    ap.add_argument("--repetition-penalty", type=float, default=None,
                    help="throughput: also with this repetition penalty (beside the others)")
    ap.add_argument("--lone", default="1024,4096,8192,16384,32768",
                    help="lone: prompt lengths, one request at a time")
    ap.add_argument("--lone-output", type=int, default=256, help="lone: output tokens")
    ap.add_argument("--admission-max-tokens", type=int, default=4096,
                    help="admission: the max_tokens each request asks for")
    ap.add_argument("--shard-mins", default=None,
                    help="one server per world and per --shard-min-tokens value: 0,1048576")
    ap.add_argument("--bound-ms", type=float, default=None,
                    help="the weights' read time per step, instead of measuring the copy rate")
    ap.add_argument("--no-logprobs", action="store_true",
                    help="ask no logprobs (chunks are then not one token each)")
    ap.add_argument("--schema-fractions", default="0",
                    help="throughput: shares of the streams with a JSON schema, e.g. 0,0.5")
    ap.add_argument("--tokenizer", default=None,
                    help="a folder whose tokenizer replaces the checkpoint's (in a copy), e.g. "
                    "the embedded model's: a real vocabulary for the grammar masks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.worlds = [int(x) for x in args.worlds.split(",")]
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.scenarios = args.scenarios.split(",")
    args.lone = [int(x) for x in args.lone.split(",")]
    args.schema_fractions = [float(x) for x in args.schema_fractions.split(",")]
    args.shard_mins = [None] if args.shard_mins is None else \
        [int(x) for x in args.shard_mins.split(",")]
    ckpt = Path(args.ckpt or ("/tmp/llama-tiny-random" if args.tiny
                              else "/tmp/llama31-8b-random"))
    dtype = args.dtype or ("auto" if args.tiny else "bfloat16")
    need = max(args.long + 1, args.stall_prompt + args.stall_tokens, args.prompt + args.output,
               args.prompt + args.admission_max_tokens if "admission" in args.scenarios else 0,
               64 + 4, *(n + args.lone_output for n in args.lone))
    max_len = args.max_model_len or -(-need // 1024) * 1024
    if args.tiny:
        write_tiny(ckpt, max_len)
    else:
        from prefill import write_checkpoint

        write_checkpoint(ckpt, max_len)
    if args.tokenizer:
        ckpt = with_tokenizer(ckpt, Path(args.tokenizer))
    weights, kv_per_token = sizes(ckpt, dtype)
    copy = None
    bound_ms = args.bound_ms
    if bound_ms is None and args.device == "cuda":
        copy = copy_gbps()
        torch.cuda.empty_cache()  # its 4 GiB go back before the servers plan their memory
        bound_ms = weights / (copy * 1e9) * 1e3
    flags = ["--model", str(ckpt), "--device", args.device, "--dtype", dtype,
             "--max-model-len", str(max_len), "--max-num-seqs", str(args.max_num_seqs),
             *shlex.split(args.server_args)]
    rows = []
    runs = [(w, m) for w in args.worlds for m in args.shard_mins]
    for i, (world, shard_min) in enumerate(runs):
        more = [] if shard_min is None else ["--shard-min-tokens", str(shard_min)]
        with tr_serve([*flags, "--world-size", str(world), *more], args.port + i,
                      args.pythonpath) as (url, _):
            rows += asyncio.run(drive(url, args, world, shard_min))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    text = report(rows, args, ckpt, dtype, weights, kv_per_token, bound_ms, copy)
    print(text)
    if args.out:
        write_section(args.out, "serving", text)


def report(rows, args, ckpt, dtype, weights, kv_per_token, bound_ms, copy) -> str:
    shape = "a tiny random Llama (2 layers, hidden 64)" if args.tiny else \
        "Llama-3.1-8B shape, random weights"
    ceiling = f"; device copy {copy:.0f} GB/s" if copy else ""
    lines = [f"## Serving over HTTP: decode under a long prefill, concurrent streams — "
             f"{today()}", "",
             f"Code: {commit()}. Machine: {where()}{ceiling}.", "",
             "Command: `python benchmarks/serving.py " + " ".join(sys.argv[1:]) + "`", "",
             f"{shape}, {dtype}, on `--device {args.device}`, checkpoint `{ckpt}`; one "
             "`tr-serve` per world size driven by the openai client (AsyncOpenAI, streamed "
             "completions of fresh random token ids, temperature 0 unless a row's sampling "
             "says otherwise, ignore_eos"
             + ("" if args.no_logprobs else ", logprobs 0 so that each token is one chunk")
             + "). Times are client wall clock from just before a request is sent."
             + (f" Server flags added: `{args.server_args}`." if args.server_args else "")]
    first = args.worlds[0]
    stall = [r for r in rows if r["scenario"] == "stalls"]
    if stall:
        ref = next(r for r in stall if r["world"] == first)
        lines += ["", "### Decode stalls while a long prompt prefills", "",
                  f"{args.streams} streams ({args.stall_prompt}-token prompts, max_tokens "
                  f"{args.stall_tokens}) decode; once each has {args.calm_tokens} tokens, a "
                  f"{args.long:,}-token prompt arrives (max_tokens 1). Gaps are between two "
                  "tokens of one stream: calm is the median before the long prompt was sent; "
                  "the largest and P99 are over the gaps that overlap its prefill (its send "
                  "to its first token). Idle: another prompt of that length on the idle "
                  "server, after an untimed one.", "",
                  "| ranks | calm gap (ms) | largest gap in prefill (ms) | P99 gap in prefill "
                  "(ms) | stream tokens in prefill | long TTFT, streams running (s) | long "
                  f"TTFT, idle (s) | running / idle | idle TTFT, {ranks(first)} / this | "
                  "chunks = tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in stall:
            ok = "yes" if r["counted"] else "**NO**"
            if r["ended_early"]:
                ok += f" ({r['ended_early']} stream(s) ended early)"
            lines.append(
                f"| {r['world']} | {r['calm_ms']:.1f} | {r['max_gap_ms']:.1f} | "
                f"{r['p99_gap_ms']:.1f} | {r['tokens_inside']:g} | {r['long_ttft']:.2f} | "
                f"{r['idle_ttft']:.2f} | {r['long_ttft'] / r['idle_ttft']:.2f}x | "
                f"{ref['idle_ttft'] / r['idle_ttft']:.2f}x | {ok} |")
    thr = [r for r in rows if r["scenario"] == "throughput"]
    if thr:
        lines += ["", "### Throughput of concurrent streams", "",
                  f"C requests of {args.prompt} prompt tokens and {args.output} output tokens "
                  "sent at once, after an untimed round of the same shape. Tokens/s: all "
                  "output tokens over first send to last token. ITL: gaps between a stream's "
                  "tokens after its first. Client CPU: the benchmark process's CPU time over "
                  "the run's wall time (near 100% the client limits the numbers)."]
        if bound_ms is not None:
            how = (f"the weights ({gb(weights)}) read once at {copy:.0f} GB/s" if copy
                   else f"given as --bound-ms for {gb(weights)} of weights")
            lines += ["", f"Bound per decode step: {bound_ms:.2f} ms, {how}; with KV, plus "
                      f"this rank's share of the KV of C mean contexts ({args.prompt} + "
                      f"{args.output}/2 tokens, {kv_per_token / 1024:g} KiB a token)."]
        head = (f"| ranks | C | schema streams | sampling | tokens/s | tokens/s, this / "
                f"{ranks(first)} | tokens/s, this / no schema | tokens/s, this / greedy | "
                "median ITL (ms) | mean ITL (ms) | P99 ITL (ms) | median TTFT (s) | largest "
                "TTFT (s) | client CPU | chunks = tokens |")
        sep = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        if bound_ms is not None:
            head += " bound (ms) | bound with KV (ms) | mean ITL / bound with KV |"
            sep += "---|---|---|"
        lines += ["", head, sep]
        for r in thr:
            same = [x for x in thr if x["concurrency"] == r["concurrency"]]
            ref = next((x for x in same if x["world"] == first and x["schema_streams"]
                        == r["schema_streams"] and x["sampling"] == r["sampling"]), r)
            plain = next((x for x in same if x["world"] == r["world"] and x["schema_streams"]
                          == 0 and x["sampling"] == r["sampling"]), r)
            greedy = next((x for x in same if x["world"] == r["world"] and x["schema_streams"]
                           == r["schema_streams"] and x["sampling"] == "greedy"), r)
            what = r["sampling"] if r["sampling"] == "greedy" else \
                f"{r['sampling']} ({r['params']})"
            line = (f"| {r['world']} | {r['concurrency']} | {r['schema_streams']} | {what} | "
                    f"{r['tokens_per_s']:.0f} | "
                    f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | "
                    f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | "
                    f"{r['tokens_per_s'] / greedy['tokens_per_s']:.2f}x | {r['itl_ms']:.1f} | "
                    f"{r['mean_itl_ms']:.1f} | "
                    f"{r['p99_itl_ms']:.1f} | {r['ttft_s']:.3f} | {r['max_ttft_s']:.3f} | "
                    f"{r['client_cpu']:.0%} | {'yes' if r['counted'] else '**NO**'} |")
            if bound_ms is not None:
                context = r["concurrency"] * (args.prompt + args.output / 2) / r["world"]
                with_kv = bound_ms * (1 + context * kv_per_token / weights)
                line += (f" {bound_ms:.2f} | {with_kv:.2f} | "
                         f"{r['mean_itl_ms'] / with_kv:.2f}x |")
            lines.append(line)
    adm = [r for r in rows if r["scenario"] == "admission"]
    if adm:
        lines += ["", "### How many requests fit at once", "",
                  f"C requests of {args.prompt} prompt tokens asking for max_tokens "
                  f"{args.admission_max_tokens}, each closed by the client after "
                  f"{args.output} tokens. Running at once: the most "
                  "`tr_engine:num_requests_running` read from /metrics (every 50 ms).", "",
                  "| ranks | C | most running at once | tokens/s | median TTFT (s) | "
                  "preemptions |", "|---|---|---|---|---|---|"]
        for r in adm:
            lines.append(f"| {r['world']} | {r['concurrency']} | {r['peak_running']:.0f} | "
                         f"{r['tokens_per_s']:.0f} | {r['ttft_s']:.2f} | "
                         f"{r['preemptions']:.0f} |")
    alone = [r for r in rows if r["scenario"] == "lone"]
    if alone:
        lines += ["", "### One request alone: where sharding a prompt pays", "",
                  f"One request at a time, {args.lone_output} output tokens, after an untimed "
                  "one of the same length. shard-min: the server's --shard-min-tokens (a "
                  "prompt under it runs on one rank).", "",
                  "| ranks | shard-min | prompt | TTFT (s) | median ITL (ms) | total (s) | "
                  "chunks = tokens |", "|---|---|---|---|---|---|---|"]
        for r in alone:
            lines.append(f"| {r['world']} | {r['shard_min']} | {r['prompt']} | "
                         f"{r['ttft_s']:.3f} | {r['itl_ms']:.2f} | {r['total_s']:.2f} | "
                         f"{'yes' if r['counted'] else '**NO**'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
