"""Short-prompt TTFT for prompt lengths a server has never seen, against the same lengths
again, through a real tr-serve and the openai client.

    python benchmarks/cold_shapes.py --world 1 --out docs/PERFORMANCE.md
    python benchmarks/cold_shapes.py --world 1 --pythonpath /old/site --label before

Llama-3.1-8B shape, random bf16 weights (the checkpoint of benchmarks/prefill.py). After
two warm-up requests (lengths outside the set), 12 prompts of random lengths between 300
and 3,000 tokens are sent one at a time as new lengths, then the same 12 again. Each is a
completion of byte token ids with max_tokens 1, so a request's time is its TTFT, and the
prefix cache is off (a repeated prompt must prefill again). Also: the server's start-up time
(process start to the first 200 from /health) and the GPU memory in use after the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine, today, tr_serve, write_section
from prefill import write_checkpoint


def gpu_memory_gib() -> list[float]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                          "nounits"], capture_output=True, text=True, check=True).stdout
    return [int(x) / 1024 for x in out.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--ckpt", default="/tmp/llama31-8b-random")
    ap.add_argument("--pythonpath", default=None, help="run the server from this code")
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from openai import OpenAI

    write_checkpoint(Path(args.ckpt), 8192)
    flags = ["--model", args.ckpt, "--device", "cuda", "--world-size", str(args.world),
             "--dtype", "bfloat16", "--max-model-len", "8192", "--max-num-seqs", "8"]
    if not args.pythonpath:  # code from before the prefix cache has no such flag
        flags.append("--no-enable-prefix-caching")
    with tr_serve(flags, 8214, args.pythonpath) as (url, up):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=300)
        model = client.models.list().data[0].id
        g = torch.Generator().manual_seed(11)

        def ask(n: int) -> float:
            ids = torch.randint(0, 256, (n,), generator=g).tolist()
            t = time.perf_counter()
            client.completions.create(model=model, prompt=ids, max_tokens=1)
            return time.perf_counter() - t

        for n in (257, 3001):  # warm-up, outside the measured lengths
            ask(n)
        lengths = sorted(set(torch.randint(300, 3001, (40,), generator=g).tolist()))
        lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=g)[:12].tolist()]
        new = [ask(n) for n in lengths]
        again = [ask(n) for n in lengths]
        memory = gpu_memory_gib()
    row = {"label": args.label, "world": args.world, "startup_s": up, "memory_gib": memory,
           "lengths": lengths, "new": new, "again": again}
    print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row))
    ms = [x * 1e3 for x in new]
    ms2 = [x * 1e3 for x in again]
    text = "\n".join([
        f"### {args.label}: {args.world} GPU{'s' if args.world > 1 else ''} — {today()}", "",
        f"Machine: {machine()}.", "",
        "Command: `python benchmarks/cold_shapes.py " + " ".join(sys.argv[1:]) + "`", "",
        "| TTFT, new lengths (median / max) | TTFT, same lengths again (median / max) | "
        "new / again (medians) | start-up | GPU memory after |", "|---|---|---|---|---|",
        f"| {statistics.median(ms):.0f} ms / {max(ms):.0f} ms | "
        f"{statistics.median(ms2):.0f} ms / {max(ms2):.0f} ms | "
        f"{statistics.median(ms) / statistics.median(ms2):.2f} | {up:.1f} s | "
        f"{', '.join(f'{m:.1f}' for m in memory)} GiB |", "",
        f"Lengths, in the order sent: {', '.join(map(str, lengths))}."])
    print(text)
    if args.out:
        write_section(args.out, f"cold-shapes-{args.label}-{args.world}", text)


if __name__ == "__main__":
    main()
