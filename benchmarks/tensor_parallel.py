"""Tensor parallelism on GPUs: a long prompt's TTFT with its MFU, decode at that context
against the bandwidth bound, and short streams together, for each (world, T) mesh.

    python benchmarks/tensor_parallel.py --shape 8b --runs 2:1,2:2 --out docs/PERFORMANCE.md
    python benchmarks/tensor_parallel.py --shape 70b --runs 2:2 --seq 131072 --out ...

Weights are random (`load_format dummy`: only config.json and a tokenizer are written, the
weights are made on the GPUs), so 70B shapes need no checkpoint on disk. `W:T` runs the
engine on W GPUs with tensor_parallel_size T (sequence sharded over W / T groups).

`--share T` runs instead, on one GPU, the model one rank of a T-way split holds (its
heads, MLP columns and vocabulary rows) with no tensor parallelism: a rank's own compute
and weight reads, without the two all-reduces per layer the split adds. It is labelled as
such in the table; it is not a tensor-parallel run.

MFU counts 2·params·tokens of the linear layers plus causal attention 2·S²·Hq·D per layer,
per GPU, against the bf16 matmul rate measured in the same run. The decode bound is a
rank's weights (the embedding table apart) plus its KV shard read once per token at the
measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    copy_gbps,
    drain,
    llama31_config,
    machine,
    matmul_tflops,
    today,
    write_section,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SHAPES = {  # layers, hidden, query heads, KV heads, head dim, MLP, vocabulary
    "8b": (32, 4096, 32, 8, 128, 14336, 128256),
    "70b": (80, 8192, 64, 8, 128, 28672, 128256),
}


def write_config(path: Path, shape: str, share: int, max_len: int) -> dict:
    """config.json (and a byte tokenizer) of `shape`, or of one rank's share of a
    `share`-way split of it."""
    from checkpoints import make_tokenizer

    layers, h, hq, hkv, d, mlp, vocab = SHAPES[shape]
    if share > 1:
        hq, hkv, mlp = hq // share, max(1, hkv // share), mlp // share
        vocab = -(-vocab // share)
    config = llama31_config(layers, h, hq, hkv, d, mlp, vocab, max_len)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    make_tokenizer().save_pretrained(path)
    return config


def counts(config: dict, tp: int) -> tuple[float, float, float]:
    """(linear parameters, bytes of the weights a decode step reads — all but the token
    embedding, of which it reads a row a token —, KV bytes per token) of one rank at
    `tp`."""
    layers, h, d = config["num_hidden_layers"], config["hidden_size"], config["head_dim"]
    hq = config["num_attention_heads"] // tp
    hkv = max(1, config["num_key_value_heads"] // tp)
    mlp = config["intermediate_size"] // tp
    vocab = -(-config["vocab_size"] // tp)
    linear = layers * (2 * h * hq * d + 2 * h * hkv * d + 3 * h * mlp)
    weights = 2 * (linear + vocab * h + (2 * layers + 1) * h)
    return linear, weights, 2 * layers * hkv * d * 2


def bench(path: Path, config: dict, world: int, tp: int, args) -> dict:
    from tr_engine.config import EngineConfig
    from tr_engine.engine.llm_engine import LLMEngine
    from tr_engine.sampling_params import SamplingParams

    s, steps = args.seq, args.decode_steps
    row = {"world": world, "tp": tp, "S": s, "share": args.share}
    engine_config = EngineConfig(
        model=str(path), load_format="dummy", device="cuda", world_size=world,
        tensor_parallel_size=tp, dtype="bfloat16", max_model_len=s + steps + 8,
        prefill_chunk=min(args.prefill_chunk, s), max_num_seqs=max(16, args.streams),
        max_num_batched_tokens=None, enable_prefix_caching=False, shard_min_tokens=0)
    t = time.perf_counter()
    try:
        engine = LLMEngine(engine_config)
    except (RuntimeError, ValueError, torch.OutOfMemoryError) as e:
        return {**row, "error": f"{type(e).__name__}: {e}"}
    row["start_s"] = time.perf_counter() - t
    g = torch.Generator().manual_seed(1)
    vocab = 256  # the tokenizer's byte ids: any id in range would do

    def run(prompts: list[list[int]], max_tokens: int) -> tuple[float, list[float]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        for i, ids in enumerate(prompts):
            engine.add_request(f"r{time.perf_counter()}-{i}", ids, params)
        return drain(engine, t0)[:2]

    long_ids = torch.randint(0, vocab, (s,), generator=g).tolist()
    run([long_ids[: min(s, 8192)]], 2)  # warm-up of the kernels' shapes
    torch.cuda.reset_peak_memory_stats()
    ttft, decode = run([long_ids], steps + 1)
    linear, weights, kv = counts(config, tp if not args.share else 1)
    sp = world // tp
    hq = config["num_attention_heads"] // (tp if not args.share else 1)
    flops = (2.0 * linear * s / sp
             + 2.0 * s * s * hq * config["head_dim"] * config["num_hidden_layers"] / sp)
    bound = (weights + -(-s // sp) * kv) / (COPY_GBPS * 1e9)
    row.update(ttft=ttft, mfu=flops / ttft / (MATMUL_TFLOPS * 1e12),
               decode=statistics.median(decode), bound=bound,
               peak_gib=torch.cuda.max_memory_reserved() / 2**30,
               strategy=engine._choose_strategy(s, 0))
    if args.streams:
        prompts = [torch.randint(0, vocab, (1000,), generator=g).tolist()
                   for _ in range(args.streams)]
        t0 = time.perf_counter()
        _, step_times = run(prompts, args.stream_tokens)
        wall = time.perf_counter() - t0
        row.update(streams=args.streams, stream_tok_s=args.streams * args.stream_tokens / wall,
                   stream_step_ms=statistics.median(step_times) * 1e3)
    print(json.dumps(row), flush=True)
    engine.shutdown()
    engine = None
    gc.collect()
    torch.cuda.empty_cache()
    return row


MATMUL_TFLOPS = COPY_GBPS = 0.0


def main() -> None:
    global MATMUL_TFLOPS, COPY_GBPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--runs", default="2:1,2:2", help="W:T meshes, comma-separated")
    ap.add_argument("--share", type=int, default=0,
                    help="one GPU runs one rank's share of a T-way split (see above)")
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--prefill-chunk", type=int, default=32768)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--streams", type=int, default=16, help="0: no short-stream run")
    ap.add_argument("--stream-tokens", type=int, default=256)
    ap.add_argument("--dir", default="/tmp/tp-bench")
    ap.add_argument("--section", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.cuda.set_device(0)
    MATMUL_TFLOPS, COPY_GBPS = matmul_tflops(), copy_gbps()
    print(f"matmul {MATMUL_TFLOPS:.0f} TFLOP/s, copy {COPY_GBPS:.0f} GB/s", flush=True)
    path = Path(args.dir) / f"{args.shape}-share{args.share}"
    config = write_config(path, args.shape, args.share, args.seq + 4096)
    runs = [(1, 1)] if args.share else [tuple(map(int, r.split(":")))
                                         for r in args.runs.split(",")]
    rows = [bench(path, config, w, t, args) for w, t in runs]
    text = report(rows, args)
    print(text)
    if args.out:
        section = args.section or f"tp-{args.shape}" + (f"-share{args.share}" if args.share
                                                        else "")
        write_section(args.out, section, text)


def report(rows: list[dict], args) -> str:
    what = (f"one rank's share of a {args.share}-way split, alone on one GPU (no "
            "all-reduce: not a tensor-parallel run)" if args.share else "the whole model")
    lines = [f"## Tensor parallelism, {args.shape} shape — {today()}", "",
             f"Machine: {machine()}. Ceilings in the same run: bf16 matmul "
             f"{MATMUL_TFLOPS:.0f} TFLOP/s, device copy {COPY_GBPS:.0f} GB/s.", "",
             "Command: `python benchmarks/tensor_parallel.py " + " ".join(sys.argv[1:]) + "`",
             "", f"Llama-3.1-{args.shape.upper()} shape, {what}; random bf16 weights "
             f"(load_format dummy); a {args.seq // 1024}K-token prompt alone, in chunks of "
             f"{args.prefill_chunk}, then {args.decode_steps} decode steps; then "
             f"{args.streams} streams of 1000-token prompts and {args.stream_tokens} tokens "
             "each, together (engine API).", "",
             "| GPUs | T | TTFT (s) | MFU | decode (ms/token) | bound (ms) | decode / bound "
             "| streams (tok/s) | stream step (ms) | peak GiB | start (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['world']} | {r['tp']} | refused: {r['error'][:200]} "
                         "| | | | | | | | |")
            continue
        streams = (f"{r['stream_tok_s']:.0f} | {r['stream_step_ms']:.1f}" if "streams" in r
                   else " | ")
        lines.append(f"| {r['world']} | {r['tp']} | {r['ttft']:.2f} | {r['mfu']:.0%} | "
                     f"{r['decode'] * 1e3:.2f} | {r['bound'] * 1e3:.2f} | "
                     f"{r['decode'] / r['bound']:.2f}x | {streams} | {r['peak_gib']:.1f} | "
                     f"{r['start_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    main()
