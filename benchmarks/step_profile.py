"""Where a decode step's time goes, at batch 1, 16 and 64: the engine's phases timed one by
one on the host.

    python benchmarks/step_profile.py --batches 1,16,64 --out docs/PERFORMANCE.md

Llama-3.1-8B shape, random weights (load_format dummy), one GPU or --world GPUs with
--tp. Requests of 1000-token prompts decode together; once every prompt is prefilled, each
of --steps decode steps is cut into: schedule (the scheduler's plan), run (the plan sent to
the other ranks, the forward — a graph replay — and the logits; synchronised at its end),
sample (synchronised too), update (the scheduler's bookkeeping) and outputs (stop checks,
detokenizing, RequestOutputs), host work alone. Each batch runs greedy, then sampled
(--temperature, --top-p, --top-k), then sampled with --repetition-penalty: the sampler's share
of the step is its cost against greedy's. The
bound is the weights (the embedding table apart) plus the batch's KV read once at the
measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import Calling, copy_gbps, kernel_totals, machine, today, write_section
from tensor_parallel import counts, write_config

PHASES = ("schedule", "run", "sample", "update", "outputs")


def samplings(args) -> list[tuple[str, dict]]:
    """(label, SamplingParams fields) of each way a batch is profiled."""
    sampled = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    return [("greedy", {"temperature": 0.0}), ("sampled", sampled),
            ("+ repetition", {**sampled, "repetition_penalty": args.repetition_penalty})]


def profile(engine, batch: int, steps: int, prompt: int, logprobs: int | None = None,
            sampling: dict | None = None) -> dict[str, float]:
    from tr_engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + 1500, ignore_eos=True, logprobs=logprobs,
                            **(sampling or {"temperature": 0.0}))
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", torch.randint(0, 256, (prompt,), generator=g)
                           .tolist(), params)
    while any(s.prefilled < len(s.prompt_ids) for s in engine._seqs.values()):
        engine.step()  # the prefills
    spent = {p: [] for p in PHASES}
    sched, run, sampler, update = (engine.scheduler.schedule, engine.cluster.run,
                                   engine.sampler.__call__, engine.scheduler.update)
    on_token = engine._on_token
    clock = {"t": 0.0}

    def timed(name, fn, gpu=False):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if gpu:
                torch.cuda.synchronize()
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    engine.scheduler.schedule = timed("schedule", sched)
    engine.cluster.run = timed("run", run, gpu=True)
    engine.sampler = Calling(sampler.__self__, timed("sample", sampler, gpu=True))
    engine.scheduler.update = timed("update", update)
    engine._on_token = timed("outputs", on_token)
    walls = []
    try:
        for _ in range(steps):
            for p in PHASES:
                clock[p] = 0.0
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = engine.step()
            wall = time.perf_counter() - t
            failed = [o.error for o in outs if o.error is not None]
            assert not failed, failed
            if len(outs) != batch:  # a step that was not the whole batch's decode
                continue
            walls.append(wall)
            for p in PHASES:
                spent[p].append(clock[p])
    finally:
        del engine.scheduler.schedule, engine.cluster.run, engine.scheduler.update
        del engine._on_token
        engine.sampler = sampler.__self__
    for r in list(engine._seqs.values()):
        engine.abort(r.request_id)
    while engine.has_work():
        engine.step()
    row = {p: statistics.median(v) * 1e3 for p, v in spent.items()}
    row["step"] = statistics.median(walls) * 1e3
    return row


def kernel_table(engine, prompt: int, batch: int = 1, reps: int = 10) -> list[str]:
    """The GPU kernels of decode steps of `batch` requests of `prompt` tokens (the graph
    replayed as in serving) under the profiler, by total time per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from tr_engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(5)
    names = [f"kernels-{i}" for i in range(batch)]
    for name in names:
        engine.add_request(name, torch.randint(0, 256, (prompt,), generator=g).tolist(),
                           SamplingParams(max_tokens=reps + 1500, temperature=0,
                                          ignore_eos=True))
    while any(s.prefilled < prompt for s in engine._seqs.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            engine.step()
        torch.cuda.synchronize()
    for name in names:
        engine.abort(name)
    while engine.has_work():
        engine.step()
    totals = kernel_totals(prof, reps)
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    total = sum(t for t, _ in totals.values())
    out = [f"GPU kernels of a batch-{batch} decode step ({prompt}-token contexts, graph "
           f"replayed, profiler), {total:.2f} ms of kernel time a step:", "",
           "| kernel | calls a step | ms a step | share |", "|---|---|---|---|"]
    for name, (t, n) in rows[:14]:
        out.append(f"| `{name[:70]}` | {n:.0f} | {t:.3f} | {t / total:.0%} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/profile-bench")
    ap.add_argument("--logprobs", type=int, default=None,
                    help="the requests ask for this many top logprobs (as the serving "
                    "benchmark's streams do, with 0)")
    ap.add_argument("--kernel-batches", default="1", help="batches of the kernel tables")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--section", default="step-profile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.cuda.set_device(0)
    gbps = copy_gbps()
    from tr_engine.config import EngineConfig
    from tr_engine.engine.llm_engine import LLMEngine

    path = Path(args.dir) / "8b"
    config = write_config(path, "8b", 1, 8192)
    batches = [int(b) for b in args.batches.split(",")]
    kernel_batches = [int(b) for b in args.kernel_batches.split(",") if b]
    engine = LLMEngine(EngineConfig(
        model=str(path), load_format="dummy", device="cuda", world_size=args.world,
        tensor_parallel_size=args.tp, dtype="bfloat16", max_model_len=4096,
        max_num_seqs=max(batches + kernel_batches), enable_prefix_caching=False))
    _, weights, kv = counts(config, args.tp)
    lines = [f"## Decode step profile — {today()}", "",
             f"Machine: {machine()}. Device copy {gbps:.0f} GB/s in the same run.", "",
             "Command: `python benchmarks/step_profile.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Llama-3.1-8B shape, random bf16 weights, {args.world} GPU(s), tensor "
             f"parallel {args.tp}; {args.prompt}-token prompts, median of {args.steps} decode "
             "steps, ms (the phases that launch GPU work synchronised at their end).", "",
             "Sampled: " + ", ".join(f"{k} {v:g}" for k, v in samplings(args)[1][1].items())
             + f"; + repetition: that and repetition_penalty {args.repetition_penalty:g}.", "",
             "| batch | sampling | step | schedule | run (forward, logits) | sample | sample "
             "share | step / greedy | update | outputs | bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in batches:
        bound = (weights + b * (args.prompt + args.steps) * kv / (args.world // args.tp)) \
            / (gbps * 1e9) * 1e3
        greedy = None
        for label, sampling in samplings(args):
            row = profile(engine, b, args.steps, args.prompt, args.logprobs, sampling)
            greedy = greedy or row
            phases = [f"{row[p]:.2f}" for p in PHASES]
            lines.append(f"| {b} | {label} | {row['step']:.2f} | " + " | ".join(phases[:3])
                         + f" | {row['sample'] / row['step']:.1%} | "
                         f"{row['step'] / greedy['step']:.2f}x | " + " | ".join(phases[3:])
                         + f" | {bound:.2f} |")
            print(lines[-1], flush=True)
    for b in kernel_batches:
        lines += ["", *kernel_table(engine, args.prompt, b)]
    engine.shutdown()
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(args.out, args.section, text)


if __name__ == "__main__":
    main()
