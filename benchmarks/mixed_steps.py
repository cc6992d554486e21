"""Mixed steps through the engine: how long running streams wait while a long prompt
prefills, and what that costs the prompt, for each token budget.

    python benchmarks/mixed_steps.py [--layers 8] [--prompt 65536] [--streams 8]
        [--budgets none,8192,4096] [--chunks 32768,8192,4096] [--out docs/PERFORMANCE.md]

One GPU, the engine's own API (no HTTP), Llama-3.1-8B shape with --layers layers and random
bf16 weights (benchmarks/prefill.py writes them). For each budget (none: whole
--prefill-chunk chunks in every step): one engine; a warm-up prompt of --prompt tokens,
then the same length alone (its TTFT), then --streams streams of 100-token prompts decode
and a fresh prompt of --prompt tokens arrives. Every engine.step() is timed on the host (it
ends with the sampler's host sync, so a step's time is its device time plus the host's):
the calm decode step before the prompt, then each step until its first token. A stream's
gap between two tokens is one step. For --chunks, the prompt alone with that prefill_chunk
(no streams), which separates the cost of small chunks from the cost of mixing.

--profile B,C: where the time of mixing goes. The prompt's prefill with the streams under
budget B and alone in chunks of C, each under the torch profiler (CUDA kernels): every
kernel's total time in both, the GPU's busy time against the wall clock, and the host's
time to queue a step's work (the forward's launches, until the sampler waits). With
--trace FILE, one more prompt's prefill with the streams is traced (host ops and kernels,
the engine's phases labelled) to FILE (Chrome trace, gzipped), and the GPU's idle gaps are
put down to what the host was doing meanwhile (`python benchmarks/mixed_steps.py --gaps
FILE` reads a trace again).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from common import Calling, kernel_totals, machine, today, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

STREAM_TOKENS = 3100  # a stream's prompt and output: it outlasts both prefills


def ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 30000, (n,), generator=g).tolist()


def until_first_token(engine, tag: str, prompt: list[int], steps: list[float]) -> float:
    from tr_engine import SamplingParams

    engine.add_request(tag, prompt, SamplingParams(max_tokens=1, temperature=0))
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - t)
        if any(o.request_id == tag for o in outs):
            return time.perf_counter() - t0


@contextlib.contextmanager
def profiled(engine, row: dict, enabled: bool):
    """With `enabled`: the CUDA kernels of the block (row["kernels"], kernel_totals), and
    the host's time in each step's cluster.run, which queues the forward's work and returns
    before the device ends it (row["launch"], seconds per step)."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    launch: list[float] = []
    run = engine.cluster.run

    def timed(plan):
        t = time.perf_counter()
        out = run(plan)
        launch.append(time.perf_counter() - t)
        return out

    engine.cluster.run = timed
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            yield
            torch.cuda.synchronize()
    finally:
        del engine.cluster.run
    row["kernels"], row["launch"] = kernel_totals(prof), launch


# what the trace labels: (object path on the engine or a class, method)
_PHASES = (("scheduler", "schedule"), ("cluster", "run"), ("sampler", "__call__"),
           ("scheduler", "update"), ("", "_on_token"))


@contextlib.contextmanager
def traced(engine, path: str):
    """The block under the torch profiler, host ops and kernels, with the engine's phases
    and each part's attention labelled; the trace goes to `path` (gzipped JSON)."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile, record_function

    from tr_engine.worker import model_runner as runner

    def labelled(name, fn):
        def wrapper(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return wrapper

    patched = []
    for owner, name in _PHASES:
        target = getattr(engine, owner) if owner else engine
        if name == "__call__":  # a call goes to the class's method: wrap the object
            engine.sampler = Calling(target, labelled("sample", target))
            patched.append((engine, "sampler", target))
            continue
        patched.append((target, name, None))
        setattr(target, name, labelled(name, getattr(target, name)))
    for cls in (runner.PrefillContext, runner.DecodeContext):
        patched.append((cls, "attention", cls.attention))
        cls.attention = labelled(f"{cls.__name__}.attention", cls.attention)
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            yield
            torch.cuda.synchronize()
    finally:
        for target, name, old in reversed(patched):
            if old is None:
                delattr(target, name)
            else:
                setattr(target, name, old)
    raw = path + ".json"
    prof.export_chrome_trace(raw)
    with open(raw, "rb") as f, gzip.open(path, "wb") as g:
        shutil.copyfileobj(f, g)
    Path(raw).unlink()


def gap_report(path: str, least_ms: float = 0.1) -> list[str]:
    """The GPU's idle gaps of at least `least_ms` in a trace of `traced`, by the engine phase
    the host was in at the gap's middle, and the host calls that overlapped them most."""
    import gzip
    import json

    with gzip.open(path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    phases = [e for e in events if e.get("cat") == "user_annotation"]
    calls = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]
    gaps, end = [], gpu[0]["ts"] if gpu else 0
    for e in gpu:
        if e["ts"] - end >= least_ms * 1e3:
            gaps.append((end, e["ts"]))
        end = max(end, e["ts"] + e["dur"])
    span = (gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]) / 1e3 if gpu else 0.0
    busy = sum(e["dur"] for e in gpu) / 1e3
    by_phase: dict[str, list[float]] = {}
    by_call: dict[str, float] = {}
    for a, b in gaps:
        mid = (a + b) / 2
        inside = [p for p in phases if p["ts"] <= mid <= p["ts"] + p["dur"]]
        name = " > ".join(p["name"] for p in sorted(inside, key=lambda p: p["ts"])) or "(none)"
        t = by_phase.setdefault(name, [0.0, 0])
        t[0] += (b - a) / 1e3
        t[1] += 1
        for c in calls:
            overlap = min(b, c["ts"] + c["dur"]) - max(a, c["ts"])
            if overlap > 0:
                by_call[c["name"]] = by_call.get(c["name"], 0.0) + overlap / 1e3
    lines = [f"GPU span {span:.1f} ms, kernels {busy:.1f} ms, {len(gaps)} idle gaps of "
             f"{least_ms} ms or more, {sum(b - a for a, b in gaps) / 1e3:.1f} ms in all", "",
             "| host phase at the gap's middle | idle (ms) | gaps |", "|---|---|---|"]
    for name, (t, n) in sorted(by_phase.items(), key=lambda kv: -kv[1][0])[:15]:
        lines.append(f"| {name} | {t:.1f} | {n} |")
    lines += ["", "| host call overlapping the gaps | ms |", "|---|---|"]
    for name, t in sorted(by_call.items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"| `{name[:70]}` | {t:.1f} |")
    return lines


def run(path: str, args, budget: int | None, chunk: int, streams: int,
        profile: bool = False) -> dict:
    from tr_engine import LLM, SamplingParams

    g = torch.Generator().manual_seed(1)
    with LLM(path, device="cuda", world_size=1, max_model_len=args.prompt + 4096,
             max_num_batched_tokens=budget, prefill_chunk=chunk, max_num_seqs=16,
             kv_cache_tokens=3 * args.prompt + streams * STREAM_TOKENS,
             skip_kernel_self_check=True) as llm:
        e = llm.engine
        until_first_token(e, "warm", ids(g, args.prompt), [])
        row = dict(budget=budget, chunk=chunk)
        with profiled(e, row, profile and not streams):
            row["alone"] = until_first_token(e, "alone", ids(g, args.prompt), [])
        if not streams:
            return row
        for i in range(streams):
            e.add_request(f"s{i}", ids(g, 100), SamplingParams(
                max_tokens=STREAM_TOKENS - 100, temperature=0, ignore_eos=True))
        for _ in range(20):
            e.step()
        calm = []
        for _ in range(20):
            t = time.perf_counter()
            e.step()
            calm.append(time.perf_counter() - t)
        steps: list[float] = []
        with profiled(e, row, profile):
            loaded = until_first_token(e, "long", ids(g, args.prompt), steps)
        row.update(loaded=loaded, calm=statistics.median(calm), steps=len(steps),
                   largest=max(steps), median=statistics.median(steps))
        if profile and args.trace:
            with traced(e, args.trace):
                until_first_token(e, "traced", ids(g, args.prompt), [])
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=65536)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--budgets", default="none,8192,4096")
    ap.add_argument("--chunks", default="32768,8192,4096")
    ap.add_argument("--prefill-chunk", type=int, default=32768)
    ap.add_argument("--ckpt", default="/tmp/llama31-8b-random-layers")
    ap.add_argument("--profile", default=None,
                    help="B,C: profile the prefill under budget B with the streams and alone "
                    "in chunks of C (and nothing else)")
    ap.add_argument("--trace", default=None,
                    help="with --profile: trace one more prefill with the streams to this file")
    ap.add_argument("--gaps", default=None, help="report the idle gaps of a trace, and stop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.gaps:
        print("\n".join(gap_report(args.gaps)))
        return
    import prefill

    prefill.LAYERS = args.layers
    path = Path(f"{args.ckpt}{args.layers}")
    prefill.write_checkpoint(path, args.prompt + 4096)
    if args.profile:
        budget, chunk = (int(x) for x in args.profile.split(","))
        print("\n".join(profile_report(run(str(path), args, budget, args.prefill_chunk,
                                            args.streams, profile=True),
                                        run(str(path), args, None, chunk, 0, profile=True))))
        if args.trace:
            print("\n".join(["", *gap_report(args.trace)]))
        return
    budgets = [None if b == "none" else int(b) for b in args.budgets.split(",") if b]
    rows = [run(str(path), args, b, args.prefill_chunk, args.streams) for b in budgets]
    alone = [run(str(path), args, None, int(c), 0) for c in args.chunks.split(",") if c]

    lines = [
        f"## Mixed steps: streams during a long prefill, 1 GPU — {today()}", "",
        f"{machine()}. Llama-3.1-8B shape with {args.layers} layers, random bf16 weights, "
        f"the engine's API. {args.streams} streams (100-token prompts) decode, then a "
        f"{args.prompt}-token prompt arrives; every engine step timed on the host.", "",
        f"Command: `python benchmarks/mixed_steps.py --layers {args.layers} --prompt "
        f"{args.prompt} --streams {args.streams} --budgets {args.budgets} --chunks "
        f"{args.chunks}`", "",
        "| max_num_batched_tokens | prompt TTFT alone (ms) | with the streams (ms) | ratio "
        "| calm step (ms) | steps | median step (ms) | largest step = longest gap (ms) |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['budget'] or 'none'} | {r['alone'] * 1e3:.0f} | {r['loaded'] * 1e3:.0f} | "
            f"{r['loaded'] / r['alone']:.2f}x | {r['calm'] * 1e3:.1f} | {r['steps']} | "
            f"{r['median'] * 1e3:.0f} | {r['largest'] * 1e3:.0f} |")
    lines += ["", "The prompt alone, by prefill chunk (no streams):", "",
              "| prefill_chunk | TTFT (ms) |", "|---|---|"]
    lines += [f"| {r['chunk']} | {r['alone'] * 1e3:.0f} |" for r in alone]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(args.out, "mixed-steps-1gpu", text)


def profile_report(mixed: dict, alone: dict) -> list[str]:
    """The two profiled prefills side by side: totals, then kernels by the time mixing
    adds."""
    lines = ["| prefill | wall (ms) | GPU kernels (ms) | steps | host queueing a step, median "
             "/ largest (ms) |", "|---|---|---|---|---|"]
    for name, r, wall in ((f"budget {mixed['budget']}, {len(mixed['launch'])} steps with the "
                           "streams", mixed, mixed["loaded"]),
                          (f"alone, chunks of {alone['chunk']}", alone, alone["alone"])):
        busy = sum(t for t, _ in r["kernels"].values())
        lines.append(f"| {name} | {wall * 1e3:.0f} | {busy:.0f} | {len(r['launch'])} | "
                     f"{statistics.median(r['launch']) * 1e3:.1f} / "
                     f"{max(r['launch']) * 1e3:.1f} |")
    names = set(mixed["kernels"]) | set(alone["kernels"])
    diff = sorted(names, key=lambda n: -(mixed["kernels"].get(n, [0, 0])[0]
                                         - alone["kernels"].get(n, [0, 0])[0]))
    lines += ["", "| kernel | with streams: ms, calls | alone: ms, calls |", "|---|---|---|"]
    for n in diff[:25]:
        a, b = mixed["kernels"].get(n, [0, 0]), alone["kernels"].get(n, [0, 0])
        lines.append(f"| `{n[:80]}` | {a[0]:.1f}, {a[1]:.0f} | {b[0]:.1f}, {b[1]:.0f} |")
    return lines


if __name__ == "__main__":
    main()
