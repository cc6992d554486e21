"""The engine on GPUs: time to first token and decode per token, Llama-3.1-8B shape.

    python benchmarks/prefill.py --worlds 1,2 --seqs 32768,131072 --hf --out docs/PERFORMANCE.md

A checkpoint of Llama-3.1-8B's shape (32 layers, 4096 hidden, 32 query / 8 KV heads, 14336
MLP, 128256 vocabulary, llama3 RoPE) with random bf16 weights is written once to --ckpt (no
download). For each world size, one engine serves prompts of each length: TTFT is the wall
time from submitting the request to its first token (the whole prefill plus sampling);
decode is the median time of the following steps (one token each). MFU counts the linear
layers' 2·params·tokens plus causal attention 2·S²·H·D per layer, per GPU, against the bf16
matmul rate measured in the same run. The decode bound is the weights plus this rank's KV
shard read once per token at the measured copy bandwidth. With --hf, transformers' own
forward (sdpa, logits_to_keep=1) on one GPU runs first on the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
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
    time_ms,
    today,
    write_section,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
LINEAR_PARAMS = LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * HEAD_DIM + 3 * HIDDEN * MLP)
WEIGHT_BYTES = 2 * (LINEAR_PARAMS + 2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN)
KV_BYTES_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2


def kv_bytes_per_token(kv_cache_dtype: str = "auto") -> int:
    """Bytes decode reads per cached token of the 8B shape: bf16, or 8-bit K/V plus their
    float32 scales."""
    if kv_cache_dtype == "auto":
        return KV_BYTES_PER_TOKEN
    return KV_BYTES_PER_TOKEN // 2 + 2 * LAYERS * KV_HEADS * 4


def reuse_checkpoint(path: Path, max_len: int) -> bool:
    """Whether a checkpoint is already at `path`; its context limit is raised to `max_len`
    if it was written for shorter prompts (the weights do not depend on it)."""
    config_file = path / "config.json"
    if not config_file.exists():
        return False
    config = json.loads(config_file.read_text())
    if config["max_position_embeddings"] < max_len:
        config["max_position_embeddings"] = max_len
        config_file.write_text(json.dumps(config, indent=1))
    return True


def write_checkpoint(path: Path, max_len: int) -> None:
    """Write the checkpoint unless one is there; one written for shorter prompts gets its
    context limit raised (the weights do not depend on it)."""
    if reuse_checkpoint(path, max_len):
        return
    config_file = path / "config.json"
    from checkpoints import make_tokenizer
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = llama31_config(LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, max_len)
    config_file.write_text(json.dumps(config, indent=1))
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * std).bfloat16().cpu()

    shard, n = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN),
                "lm_head.weight": rnd(VOCAB, HIDDEN),
                "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}, 0
    index = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shard.update({
            p + "self_attn.q_proj.weight": rnd(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": rnd(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": rnd(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": rnd(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": rnd(MLP, HIDDEN),
            p + "mlp.up_proj.weight": rnd(MLP, HIDDEN),
            p + "mlp.down_proj.weight": rnd(HIDDEN, MLP),
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        })
        if i % 8 == 7 or i == LAYERS - 1:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name))
            index.update({k: name for k in shard})
            shard, n = {}, n + 1
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": WEIGHT_BYTES}, "weight_map": index}))
    make_tokenizer().save_pretrained(path)


def flops(s: int) -> float:
    return 2.0 * LINEAR_PARAMS * s + 2.0 * s * s * HEADS * HEAD_DIM * LAYERS


def bench_hf(path: Path, seqs: list[int]) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    out = {}
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 2048), device="cuda"), logits_to_keep=1)  # warm-up
        for s in seqs:
            ids = torch.randint(0, VOCAB, (1, s), device="cuda")
            times = []
            for _ in range(2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(ids, logits_to_keep=1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            out[s] = min(times)
            print(f"transformers forward, 1 GPU, {s // 1024}K: {out[s]:.2f} s", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bench_engine(path: Path, world: int, seqs: list[int], args) -> list[dict]:
    from tr_engine.config import EngineConfig
    from tr_engine.engine.llm_engine import LLMEngine
    from tr_engine.errors import RequestTooLong
    from tr_engine.sampling_params import SamplingParams

    decode_steps = args.decode_steps
    longest = max(seqs)
    chunk = min(args.prefill_chunk or longest, longest)
    per_rank = (-(-longest // world) + -(-longest // chunk) * 2 * world + decode_steps + 64
                + 4 * 16)  # blocks of 16: an uneven last chunk
    config = EngineConfig(model=str(path), device="cuda", world_size=world, dtype="bfloat16",
                          max_model_len=longest + decode_steps + 8, prefill_chunk=chunk,
                          token_chunk=8192, max_num_seqs=1,
                          kv_cache_tokens=None if args.plan_memory else per_rank,
                          attention_strategy=args.strategy,
                          kv_cache_dtype=args.kv_cache_dtype,
                          enable_prefix_caching=False)  # the warm-up serves the same prompt
    try:
        engine = LLMEngine(config)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        return [{"world": world, "S": s, "error": f"{type(e).__name__}: {e}"} for s in seqs]
    rows = []
    g = torch.Generator().manual_seed(1)
    for s in seqs:
        ids = torch.randint(0, VOCAB, (s,), generator=g).tolist()
        params = SamplingParams(max_tokens=decode_steps + 1, temperature=0, ignore_eos=True)
        if s <= args.warmup_max:
            with contextlib.suppress(RequestTooLong):
                engine.add_request(f"warm{s}", ids, params)
            while engine.has_work():
                engine.step()
        torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            engine.add_request(f"s{s}", ids, params)
        except RequestTooLong as e:
            rows.append({"world": world, "S": s, "error": str(e)})
            continue
        ttft, steps, _ = drain(engine, t0)
        decode = statistics.median(steps)
        replay = replay_ms(engine, s) if world == 1 else None
        bare = bare_step_ms(engine, s)
        shard = -(-s // world)
        bound = (WEIGHT_BYTES + shard * kv_bytes_per_token(args.kv_cache_dtype)) / (
            COPY_GBPS * 1e9)
        row = {"world": world, "S": s, "ttft": ttft, "decode": decode, "bound": bound,
               "peak_gib": torch.cuda.max_memory_reserved() / 2**30,
               "mfu": flops(s) / world / ttft / (MATMUL_TFLOPS * 1e12),
               "strategy": engine._choose_strategy(s, 0), "replay_ms": replay,
               "pool_tokens": engine.kv_capacity * engine.world,
               "kv_cache_dtype": args.kv_cache_dtype,
               "bare_step_ms": bare}
        rows.append(row)
        print(json.dumps(row), flush=True)
    engine.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def replay_ms(engine, s: int) -> float | None:
    """GPU time of one decode step alone (one rank): the batch-of-one graph replayed against
    the pages of block-table row 0, where the request just served left its KV (freed, not
    cleared). The step time above also holds the host's share: scheduling, sampling,
    detokenizing."""
    runner = engine.cluster.runner
    graphs = runner.graphs
    if graphs is None:
        return None
    meta = torch.tensor([[1], [s], [0], [s], [runner.kv.spare], [0]], dtype=torch.long)
    graph = graphs.get(1, runner.world > 1)  # row 0
    return time_ms(lambda: graphs.replay(graph, meta), warmup=2, reps=10, sync_ranks=False)


def bare_step_ms(engine, s: int) -> float:
    """Wall time of a decode step without the scheduler, sampler and detokenizer: the plan
    sent to every rank and every rank's graph replayed (KV of the request just served, in
    row 0 of each rank's block table), until rank 0 holds the logits."""
    from tr_engine.distributed import zigzag
    from tr_engine.plan import DecodePlan, StepPlan

    world = engine.world
    shard = [zigzag.local_len(s, world, r, 16) for r in range(world)]
    plan = StepPlan("decode", decode=DecodePlan(
        seq_ids=[0], rows=[0], tokens=[1], positions=[s], kv_len=[shard],
        owner=[-1]))  # owner -1: nobody keeps it
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.cluster.run(plan)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3


MATMUL_TFLOPS = COPY_GBPS = 0.0


def main() -> None:
    global MATMUL_TFLOPS, COPY_GBPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--seqs", default="32768,131072")
    ap.add_argument("--seqs-1gpu", default=None, help="prompt lengths on one GPU (default --seqs)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--hf", action="store_true", help="also time transformers' forward")
    ap.add_argument("--hf-seqs", default="32768,65536")
    ap.add_argument("--ckpt", default="/tmp/llama31-8b-random")
    ap.add_argument("--section", default="engine")
    ap.add_argument("--strategy", default="tokenring")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="prefill in pieces of this many tokens (default: the longest prompt)")
    ap.add_argument("--warmup-max", type=int, default=131072,
                    help="prompts up to this long are served once untimed first (kernel "
                         "set-up for new shapes stays out of the numbers)")
    ap.add_argument("--plan-memory", action="store_true",
                    help="size the KV pool from free memory (default: exactly what is needed)")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="the engine's kv_cache_dtype (the decode bound counts its bytes)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.cuda.set_device(0)
    MATMUL_TFLOPS, COPY_GBPS = matmul_tflops(), copy_gbps()
    print(f"matmul {MATMUL_TFLOPS:.0f} TFLOP/s, copy {COPY_GBPS:.0f} GB/s", flush=True)
    seqs = [int(x) for x in args.seqs.split(",")]
    seqs1 = [int(x) for x in (args.seqs_1gpu or args.seqs).split(",")]
    path = Path(args.ckpt)
    t = time.perf_counter()
    write_checkpoint(path, max(seqs + seqs1) + 4096)
    print(f"checkpoint ready in {time.perf_counter() - t:.0f} s", flush=True)
    hf = bench_hf(path, [int(x) for x in args.hf_seqs.split(",")]) if args.hf else {}
    rows = []
    for world in map(int, args.worlds.split(",")):
        rows += bench_engine(path, world, seqs1 if world == 1 else seqs, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"hf": hf, "rows": rows}))
    text = report(rows, hf, args)
    print(text)
    if args.out:
        write_section(args.out, args.section, text)


def report(rows, hf, args) -> str:
    lines = [f"## Engine prefill and decode — {today()}", "",
             f"Machine: {machine()}. Ceilings in the same run: bf16 matmul "
             f"{MATMUL_TFLOPS:.0f} TFLOP/s, device copy {COPY_GBPS:.0f} GB/s.", "",
             "Command: `python benchmarks/prefill.py " + " ".join(sys.argv[1:]) + "`", "",
             "Llama-3.1-8B shape, random bf16 weights, one request at a time, prefill in "
             f"{f'chunks of {args.prefill_chunk} tokens' if args.prefill_chunk else 'one chunk'}"
             ", token-wise work "
             f"in slices of 8192 tokens, attention strategy {args.strategy}. Prompts up to "
             f"{args.warmup_max // 1024}K tokens are served once untimed first; "
             f"KV cache {args.kv_cache_dtype}.", "",
             "| GPUs | prompt | TTFT (s) | MFU | decode (ms/token) | decode bound (ms) | "
             "decode / bound | peak memory, rank 0 (GiB) | strategy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = f"{r['S'] // 1024}K"
        if "error" in r:
            lines.append(f"| {r['world']} | {s} | refused: {r['error'][:160]} | | | | | | |")
            continue
        lines.append(f"| {r['world']} | {s} | {r['ttft']:.2f} | {r['mfu']:.0%} | "
                     f"{r['decode'] * 1e3:.1f} | {r['bound'] * 1e3:.1f} | "
                     f"{r['decode'] / r['bound']:.2f}x | {r['peak_gib']:.1f} | {r['strategy']} |")
    by = {(r["world"], r["S"]): r for r in rows if "error" not in r}
    notes = []
    for s in sorted({r["S"] for r in rows}):
        if (1, s) in by and (2, s) in by:
            ratio = by[(1, s)]["ttft"] / by[(2, s)]["ttft"]
            notes.append(f"- {s // 1024}K: 2 GPUs prefill {ratio:.2f}x faster than 1.")
    pools = sorted({(r["world"], r["pool_tokens"]) for r in rows if "pool_tokens" in r})
    for world, pool in pools:
        sized = ", sized from free memory" if args.plan_memory else ""
        notes.append(f"- {world} GPU(s): the KV pool holds {pool} tokens "
                     f"({args.kv_cache_dtype}{sized}).")
    for r in rows:
        if r.get("bare_step_ms"):
            gpus = f"{r['world']} GPU{'s' if r['world'] > 1 else ''}"
            notes.append(f"- {gpus}, {r['S'] // 1024}K: a decode step without "
                         f"scheduling, sampling and detokenizing (plan to every rank, graph "
                         f"replays, logits on rank 0) takes {r['bare_step_ms']:.1f} ms.")
        if r.get("replay_ms"):
            gpu = r["replay_ms"] / 1e3
            notes.append(f"- 1 GPU, {r['S'] // 1024}K: the decode graph alone takes "
                         f"{gpu * 1e3:.1f} ms on the GPU ({gpu / r['bound']:.2f}x the bound); "
                         f"the rest of the {r['decode'] * 1e3:.1f} ms step is the host's.")
    for s, t in hf.items():
        ours = by.get((1, int(s)))
        mine = ""
        if ours:
            mine = f"; the engine on 1 GPU: {ours['ttft']:.2f} s ({t / ours['ttft']:.2f}x faster)"
        notes.append(f"- transformers forward (sdpa, logits_to_keep=1), 1 GPU, {int(s) // 1024}K: "
                     f"{t:.2f} s{mine}.")
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
