"""Prefix caching on GPUs: a follow-up's time to first token over a cached prefix.

    python benchmarks/prefix.py --world 2 --prefixes 32768,131072,524288,1048576 \
        --out docs/PERFORMANCE.md

Llama-3.1-8B shape, random bf16 weights (the checkpoint of benchmarks/prefill.py). One engine
serves, for each prefix length C: a document of C random tokens (its TTFT is the uncached
cost, the whole prefill), then follow-ups of the document plus --new fresh tokens, whose KV
of the document comes from the prefix cache, once per strategy: auto (the cost model's
choice), tokenring and ring. For prefixes up to --uncached-max the same follow-up prompt is
also served with the cache emptied first (reset_prefix_cache), the uncached TTFT of exactly
that prompt. Then decode: the median step of the last follow-up, against the bound of
weights plus this rank's KV shard read once per token at the measured copy bandwidth.
TTFT is wall time from submitting the request to its first token. With --http, a real
`tr-serve` on the same GPUs is driven by the openai client instead: a document, then
follow-ups of it (completions of token ids, max_tokens 1, so the request's time is its
TTFT), reporting the usage's cached_tokens.

With --host-tier, the host-memory tier (one engine per line, --world GPUs):

    python benchmarks/prefix.py --host-tier --world 1 --docs 8 --doc-len 131072 \
        --pool-docs 3 --out docs/PERFORMANCE.md

First the pinned host->device and device->host copy rates (256 MiB pieces on a side
stream), each alone and both at once on two streams: the ceiling. Then --docs documents of
--doc-len tokens in turn on a KV pool that holds --pool-docs of them, with a host tier sized
for all of them (capped at 80% of the host's memory, --host-gib to set it: a tier that holds
only the documents the cards lost has no free slot to copy the others into ahead of their
eviction), then a follow-up (--new fresh tokens) on the first document:
its TTFT with the document restored from host memory, against the same follow-up with the
caches emptied (the re-prefill) and against the document's bytes over the measured
host->device rate (each rank its share). Then --more-follow-ups follow-ups, each on the
document the cards lost longest ago (the first was the first follow-up after start-up,
these are in the steady state). Then the tier idle against off: fresh
--idle-prompt-token prompts' TTFT and the decode steps after them (medians of three, after
an untimed one of the same length), on an engine with the tier and on one without.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import copy_gbps, drain, machine, today, tr_serve, write_section
from prefill import VOCAB, WEIGHT_BYTES, kv_bytes_per_token, write_checkpoint


def serve(engine, ids: list[int], decode_steps: int = 0, first_token: list | None = None
          ) -> tuple[float, list[float], int]:
    """(TTFT, decode step times, cached tokens) of one request served alone; its first
    token (greedy) appended to `first_token` if given."""
    from tr_engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=decode_steps + 1, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(f"r{t0}", ids, params)
    ttft, steps, first = drain(engine, t0)
    if first_token is not None:
        first_token.extend(first[0].outputs[0].delta_token_ids)
    return ttft, steps, first[0].num_cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--prefixes", default="32768,131072,524288,1048576")
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--uncached-max", type=int, default=131072)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=262144)
    ap.add_argument("--ckpt", default="/tmp/llama31-8b-random")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--section", default="prefix-cache")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--http", action="store_true", help="through a tr-serve, over HTTP")
    ap.add_argument("--host-tier", action="store_true", help="the host-memory tier")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-len", type=int, default=131072)
    ap.add_argument("--pool-docs", type=int, default=3, help="documents the KV pool holds")
    ap.add_argument("--host-gib", type=float, default=None)
    ap.add_argument("--idle-prompt", type=int, default=32768)
    ap.add_argument("--more-follow-ups", type=int, default=6,
                    help="host tier: follow-ups after the first, each on an evicted document")
    args = ap.parse_args()
    if args.http:
        return http(args)
    if args.host_tier:
        return host_tier(args)
    from tr_engine.config import EngineConfig
    from tr_engine.engine.llm_engine import LLMEngine

    torch.cuda.set_device(0)
    copy = copy_gbps()
    prefixes = [int(x) for x in args.prefixes.split(",")]
    longest = max(prefixes) + 4 * args.new + args.decode_steps + 64
    write_checkpoint(Path(args.ckpt), longest)
    world = args.world
    # the document, its follow-ups and their own blocks, with room to spare
    per_rank = -(-(max(prefixes) + 8 * args.new) // world) + 8192
    engine = LLMEngine(EngineConfig(
        model=args.ckpt, device="cuda", world_size=world, dtype="bfloat16",
        max_model_len=longest, prefill_chunk=args.prefill_chunk, max_num_seqs=1,
        kv_cache_tokens=per_rank, kv_cache_dtype=args.kv_cache_dtype))
    auto = engine.scheduler.choose_strategy
    g = torch.Generator().manual_seed(0)

    def fresh(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    serve(engine, fresh(2048))  # warm-up: kernels for the shapes of a short prompt
    rows = []
    for c in prefixes:
        engine.reset_prefix_cache()
        doc = fresh(c)
        cold, _, _ = serve(engine, doc)
        row = {"prefix": c, "doc_ttft": cold}
        for name in ("auto", "tokenring", "ring"):
            engine.scheduler.choose_strategy = auto if name == "auto" else (
                lambda new, cached, s=name: s)
            times = []
            for _ in range(3):
                ttft, _, cached = serve(engine, doc + fresh(args.new))
                assert cached == c, f"{cached} of {c} tokens came from the cache"
                times.append(ttft)
            row[name] = statistics.median(times)
        engine.scheduler.choose_strategy = auto
        row["auto_chose"] = auto(args.new, c)
        follow = doc + fresh(args.new)
        if c <= args.uncached_max:
            engine.reset_prefix_cache()
            row["uncached"], _, cached = serve(engine, follow)
            assert cached == 0
        ttft, steps, _ = serve(engine, follow, args.decode_steps)
        row["decode_ms"] = statistics.median(steps[2:]) * 1e3
        shard = -(-(c + args.new) // world)
        row["bound_ms"] = (WEIGHT_BYTES + shard * kv_bytes_per_token(args.kv_cache_dtype)
                           ) / (copy * 1e9) * 1e3
        rows.append(row)
        print(json.dumps(row), flush=True)
    engine.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    text = report(rows, args, copy)
    print(text)
    if args.out:
        write_section(args.out, args.section, text)


def pinned_gbps() -> tuple[float, float, float]:
    """Pinned host->device and device->host copy rates (GB/s) of one card: 256 MiB pieces
    on a side stream, as the host tier copies; then both directions at once, each on a
    stream of its own (the sum of the two)."""
    n = 256 * 2**20
    host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    dev = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
    sides = [torch.cuda.Stream(), torch.cuda.Stream()]
    h2d = lambda: dev[0].copy_(host[0], non_blocking=True)  # noqa: E731
    d2h = lambda: host[1].copy_(dev[1], non_blocking=True)  # noqa: E731

    def rate(fns, reps: int = 10) -> float:
        for _ in range(2):  # once untimed
            t = time.perf_counter()
            for _ in range(reps):
                for fn, side in zip(fns, sides):
                    with torch.cuda.stream(side):
                        fn()
            torch.cuda.synchronize()
        return len(fns) * reps * n / (time.perf_counter() - t) / 1e9

    return rate([h2d]), rate([d2h]), rate([h2d, d2h])


def host_tier(args) -> None:
    """Documents cycling through a pool that holds --pool-docs of them, back from the host
    tier; then the tier idle against off (see the module's doc)."""
    import gc

    from tr_engine.config import EngineConfig
    from tr_engine.engine.llm_engine import LLMEngine
    from tr_engine.kv.block_manager import block_keys

    torch.cuda.set_device(0)
    h2d, d2h, both = pinned_gbps()
    print(f"pinned copies: host->device {h2d:.1f} GB/s, device->host {d2h:.1f} GB/s, both "
          f"at once {both:.1f} GB/s", flush=True)
    world, doc_len, new = args.world, args.doc_len, args.new
    longest = doc_len + 2 * new + 64
    write_checkpoint(Path(args.ckpt), max(longest, args.idle_prompt + 128))
    doc_bytes = doc_len * kv_bytes_per_token(args.kv_cache_dtype)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gib = args.host_gib or min(1.05 * args.docs * doc_bytes, 0.8 * ram) / 2**30
    per_rank = -(-(args.pool_docs * doc_len + 2 * new) // world) + 4096

    def engine(offload: float):
        return LLMEngine(EngineConfig(
            model=args.ckpt, device="cuda", world_size=world, dtype="bfloat16",
            max_model_len=max(longest, args.idle_prompt + 128),
            prefill_chunk=args.prefill_chunk, max_num_seqs=4, kv_cache_tokens=per_rank,
            kv_offloading_size=offload, kv_cache_dtype=args.kv_cache_dtype))

    g = torch.Generator().manual_seed(0)

    def fresh(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    e = engine(gib)
    serve(e, fresh(2048))  # warm-up
    docs = [fresh(doc_len) for _ in range(args.docs)]
    doc_ttfts = [serve(e, d)[0] for d in docs]
    s = e.scheduler
    keys = block_keys(docs[0], s.block_size, (doc_len - 1) // s.block_size)
    on_device = len(s.blocks.lookup(keys))
    on_host = len(s.blocks.lookup_host(keys[on_device:]))
    restored, spent = s.blocks.pages_restored, e.host_restore_s
    evictions = s.blocks.pages_offloaded - s.blocks.pages_written_ahead
    follow = docs[0] + fresh(new)
    tokens: list[int] = []
    from_host, _, cached = serve(e, follow, first_token=tokens)
    pages = s.blocks.pages_restored - restored
    restore_s = e.host_restore_s - spent
    evicted = s.blocks.pages_offloaded - s.blocks.pages_written_ahead - evictions
    on_card, _, _ = serve(e, docs[0] + fresh(new))  # the document on the cards now
    serve(e, follow, first_token=tokens)  # the same prompt over the KV the restore left
    same = tokens[0] == tokens[1]  # (shorter chunk: bf16 rounding may move a near tie)
    # more follow-ups, each on the document the pool lost longest ago (the others evict it)
    later = []
    for i in range(args.more_follow_ups):
        doc = docs[(i + 1) % len(docs)]
        doc_keys = block_keys(doc, s.block_size, (doc_len - 1) // s.block_size)
        assert len(s.blocks.lookup(doc_keys)) < len(doc_keys)  # evicted, at least in part
        spent = e.host_restore_s
        ttft, _, got = serve(e, doc + fresh(new))
        later.append((ttft, e.host_restore_s - spent, got))
    e.reset_prefix_cache()
    uncached, _, cached_after = serve(e, follow)
    assert cached_after == 0
    transfer = doc_bytes / world / (h2d * 1e9)
    row = {"h2d_gbps": h2d, "d2h_gbps": d2h, "both_gbps": both, "host_gib": gib,
           "doc_ttft": doc_ttfts, "evicted_pages": evicted, "same_first_token": same,
           "written_ahead": s.blocks.pages_written_ahead,
           "on_device_blocks": on_device, "on_host_blocks": on_host,
           "from_host": from_host, "cached": cached, "pages_restored": pages,
           "restore_s": restore_s, "on_card": on_card, "uncached": uncached,
           "transfer_s": transfer, "later": later}
    print(json.dumps(row), flush=True)  # before the second engine, which may not start
    # the tier idle against off: a fresh prompt, then decode steps
    e.reset_prefix_cache()
    idle = {}
    for name in ("on", "off"):
        if name == "off":
            e.shutdown()
            del e, s  # every reference to the first engine: its KV pool must go first
            gc.collect()
            torch.cuda.empty_cache()
            e = engine(0.0)
            serve(e, fresh(2048))
        # an untimed prompt of the same length first: a shape either engine meets for the
        # first time (a cuDNN graph the other already built in this process) is not timed
        serve(e, fresh(args.idle_prompt), 2)
        runs = [serve(e, fresh(args.idle_prompt), args.decode_steps) for _ in range(3)]
        idle[name] = (statistics.median(r[0] for r in runs),
                      statistics.median(t for r in runs for t in r[1][2:]) * 1e3)
    e.shutdown()
    row["idle"] = idle
    print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row))
    lines = [f"## Host-memory tier: documents back from host memory — {today()}", "",
             f"Machine: {machine()}; pinned copies {h2d:.1f} GB/s host->device, {d2h:.1f} "
             f"GB/s device->host, {both:.1f} GB/s both at once (256 MiB pieces on side "
             "streams).", "",
             "Command: `python benchmarks/prefix.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Llama-3.1-8B shape, random bf16 weights, {world} GPU(s), through the engine. "
             f"{args.docs} documents of {doc_len // 1024}K tokens in turn on a KV pool that "
             f"holds {args.pool_docs} ({per_rank} tokens per rank), a host tier of "
             f"{gib:.1f} GiB; then a follow-up ({new} new tokens) on the first document.", "",
             "| follow-up from host (s) | cached tokens | restore, rank 0 (s) | follow-up "
             "cached on the cards (s) | re-prefill (s) | document over the link (s) | from "
             "host / re-prefill |",
             "|---|---|---|---|---|---|---|",
             f"| {from_host:.3f} | {cached} | {restore_s:.3f} | {on_card:.3f} | "
             f"{uncached:.2f} | {transfer:.3f} | {from_host / uncached:.3f} |", "",
             *later_lines(later, doc_len),
             "The restore overlaps the follow-up's prefill layer by layer, so from host can "
             "come near the larger of the link time and the cached follow-up rather than "
             "their sum; its restore time is the copy stream's.", "",
             f"Documents' own TTFTs (s): {', '.join(f'{t:.2f}' for t in doc_ttfts)}. Before "
             f"the follow-up, {on_device} of the first document's blocks were on the cards "
             f"and {on_host} in host memory; {row['written_ahead']} pages had gone "
             f"to the host ahead of their eviction, and the follow-up's step copied {evicted} "
             "pages out as it evicted them. The same prompt again over the pages the "
             "restore left (its own blocks cached too) gives "
             f"{'the same' if same else 'another'} first token.", "",
             f"The tier idle against off: fresh {args.idle_prompt // 1024}K prompts, each "
             f"then {args.decode_steps} decode steps (medians of three, after an untimed "
             "one of that length).", "",
             "| tier | TTFT (s) | decode step (ms) |", "|---|---|---|",
             *(f"| {k} | {v[0]:.3f} | {v[1]:.2f} |" for k, v in idle.items())]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(args.out, "host-tier", text)


def later_lines(later: list[tuple[float, float, int]], doc_len: int) -> list[str]:
    """The follow-ups after the first, each on the document evicted longest ago."""
    if not later:
        return []
    ttfts = [t for t, _, _ in later]
    return [f"{len(later)} more follow-ups, each on the document the cards lost longest ago "
            "(the documents in turn): TTFT median "
            f"{statistics.median(ttfts):.3f} s (min {min(ttfts):.3f}, max {max(ttfts):.3f}), "
            f"restore median {statistics.median(r for _, r, _ in later):.3f} s, cached "
            f"tokens {', '.join(str(c) for _, _, c in later)} of {doc_len}; each TTFT (s): "
            f"{', '.join(f'{t:.3f}' for t in ttfts)}.", ""]


def report(rows, args, copy) -> str:
    lines = [f"## Prefix caching: follow-ups on a cached prefix — {today()}", "",
             f"Machine: {machine()}; device copy {copy:.0f} GB/s.", "",
             "Command: `python benchmarks/prefix.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Llama-3.1-8B shape, random bf16 weights, {args.world} GPUs, through the engine, "
             f"KV cache {args.kv_cache_dtype}. "
             f"A follow-up is the cached document plus {args.new} new tokens; its TTFT is the "
             "median of 3. Uncached: the document alone, and (up to "
             f"{args.uncached_max // 1024}K) the same follow-up prompt with the cache emptied.",
             "",
             "| cached prefix | document TTFT, uncached (s) | follow-up uncached (s) | "
             "follow-up, auto (s) | auto chose | tokenring (s) | ring (s) | auto / best | "
             "decode (ms/token) | bound (ms) | decode / bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min(r["tokenring"], r["ring"])
        unc = f"{r['uncached']:.2f}" if "uncached" in r else "—"
        lines.append(
            f"| {r['prefix'] // 1024}K | {r['doc_ttft']:.2f} | {unc} | {r['auto']:.3f} | "
            f"{r['auto_chose']} | {r['tokenring']:.3f} | {r['ring']:.3f} | "
            f"{r['auto'] / best:.2f} | {r['decode_ms']:.2f} | {r['bound_ms']:.2f} | "
            f"{r['decode_ms'] / r['bound_ms']:.2f}x |")
    return "\n".join(lines)


def http(args) -> None:
    """The follow-up through a real tr-serve and the openai client."""
    import httpx
    from openai import OpenAI

    prefixes = [int(x) for x in args.prefixes.split(",")]
    longest = max(prefixes) + 4 * args.new + 64
    write_checkpoint(Path(args.ckpt), longest)
    flags = ["--model", args.ckpt, "--device", "cuda", "--world-size", str(args.world),
             "--dtype", "bfloat16", "--max-model-len", str(longest),
             "--prefill-chunk", str(args.prefill_chunk), "--max-num-seqs", "4",
             "--kv-cache-tokens", str(-(-(max(prefixes) + 8 * args.new) // args.world) + 8192)]
    g = torch.Generator().manual_seed(5)
    lines = []
    with tr_serve(flags, 8213) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=900)
        model = client.models.list().data[0].id

        def ask(ids):
            t = time.perf_counter()
            r = client.completions.create(model=model, prompt=ids, max_tokens=1)
            details = r.usage.prompt_tokens_details
            return time.perf_counter() - t, details.cached_tokens if details else None

        def raw(ids):
            """The same request as ready JSON over plain httpx: the server's share."""
            body = json.dumps({"model": model, "prompt": ids, "max_tokens": 1})
            t = time.perf_counter()
            r = httpx.post(f"{url}/v1/completions", content=body,
                           headers={"content-type": "application/json"}, timeout=900)
            r.raise_for_status()
            return time.perf_counter() - t

        def building(ids):
            """The openai client's own work on the request: sent to a closed port."""
            idle = OpenAI(base_url="http://127.0.0.1:9/v1", api_key="none", max_retries=0)
            t = time.perf_counter()
            with contextlib.suppress(Exception):
                idle.completions.create(model=model, prompt=ids, max_tokens=1)
            return time.perf_counter() - t

        for c in prefixes:
            # byte ids: the server takes ids of the checkpoint's (byte-level) tokenizer
            doc = torch.randint(0, 256, (c,), generator=g).tolist()
            cold, _ = ask(doc)
            follows = [ask(doc + torch.randint(0, 256, (args.new,), generator=g).tolist())
                       for _ in range(3)]
            extra = doc + torch.randint(0, 256, (args.new,), generator=g).tolist()
            line = (f"| {c // 1024}K | {cold:.2f} | "
                    f"{statistics.median(t for t, _ in follows):.3f} | "
                    f"{', '.join(str(n) for _, n in follows)} | {raw(extra):.3f} | "
                    f"{building(extra):.3f} |")
            print(line, flush=True)
            lines.append(line)
    text = "\n".join([
        f"### Through HTTP — {today()}", "",
        f"Machine: {machine()}. A `tr-serve` on {args.world} GPUs driven by the openai client: "
        f"completions of token ids with max_tokens 1; a follow-up is the document plus "
        f"{args.new} new tokens (median of 3).", "",
        "Command: `python benchmarks/prefix.py " + " ".join(sys.argv[1:]) + "`", "",
        "| cached prefix | document, uncached (s) | follow-up, openai client (s) | usage "
        "cached_tokens | follow-up as ready JSON over httpx (s) | the client's own request "
        "building (s) |", "|---|---|---|---|---|---|", *lines])
    print(text)
    if args.out:
        write_section(args.out, "prefix-cache-http", text)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
