"""The sampler alone on the GPU: milliseconds a call (host to host, as the engine waits for
it) at batch 1, 16, 64 and 256 over the 8B shape's vocabulary, greedy against sampled
(temperature 0.8, top_p 0.95), with top_k 50, and with repetition_penalty 1.1; each
implementation the sampler has (the fused kernel, the tensor-operations path); and the GPU
kernels of a batch-64 sampled, penalized call under the profiler.

    python benchmarks/sampler.py --out docs/PERFORMANCE.md

Logits are bf16 normal with standard deviation --spread (2: a flat, random-weights-like
row whose top_p set is most of the vocabulary; 8: a peaked one). Each row's penalty state
holds 1,000 prompt tokens and the tokens it drew. Before timing, the implementations are
checked against each other on the same noise: the same token on every row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import kernel_totals, machine, today, write_section

VOCAB = 128256
MODES = {
    "greedy": dict(temperature=0.0),
    "t0.8 p0.95": dict(temperature=0.8, top_p=0.95),
    "t0.8 k50": dict(temperature=0.8, top_k=50),
    "t0.8 p0.95 rep1.1": dict(temperature=0.8, top_p=0.95, repetition_penalty=1.1),
}


def batch_of(n: int, params: dict, prompt: int = 1000):
    from tr_engine.engine.sequence import Sequence
    from tr_engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(n)
    return [Sequence(i, f"r{i}", torch.randint(0, VOCAB, (prompt,), generator=g).tolist(),
                     SamplingParams(max_tokens=10**6, ignore_eos=True, **params))
            for i in range(n)]


def samplers(device) -> dict:
    from tr_engine.engine.sampler import Sampler

    out = {"tensor ops": Sampler(device, seed=0, fused=False)}
    fused = Sampler(device, seed=0)
    if fused.fused:
        out["fused kernel"] = fused
    return out


def call_ms(sampler, logits, seqs, reps: int = 30) -> float:
    times = []
    for i in range(reps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        tokens, _, errors = sampler(logits, seqs)
        assert not errors, errors
        if i >= 3:
            times.append((time.perf_counter() - t) * 1e3)
        for s, tok in zip(seqs, tokens):
            s.output_ids.append(tok)
    return statistics.median(times)


def agree(device, logits, params) -> float:
    """The share of rows where both implementations draw the same token, same noise."""
    got = []
    for fused in (False, True):
        from tr_engine.engine.sampler import Sampler

        s = Sampler(device, seed=7, fused=fused)
        seqs = batch_of(logits.shape[0], params)
        got.append(s(logits, seqs)[0])
    return sum(a == b for a, b in zip(*got)) / len(got[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--spread", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    impls = samplers(device)
    lines = [f"## Sampler alone — {today()}", "", f"Machine: {machine()}. Command: "
             f"`python benchmarks/sampler.py --spread {args.spread}`; vocabulary {VOCAB}, "
             "ms a call host to host (median of 30).", ""]
    if len(impls) > 1:
        for mode, params in MODES.items():
            logits = (torch.randn(64, VOCAB, device=device, generator=g)
                      * args.spread).bfloat16()
            lines.append(f"Same token, same noise, fused kernel and tensor ops, batch 64, "
                         f"{mode}: {agree(device, logits, params):.1%} of rows.")
        lines.append("")
    lines += ["| batch | mode | " + " | ".join(impls) + " |",
              "|---|---|" + "---|" * len(impls)]
    for n in map(int, args.batches.split(",")):
        logits = (torch.randn(n, VOCAB, device=device, generator=g) * args.spread).bfloat16()
        for mode, params in MODES.items():
            cells = [f"{call_ms(s, logits, batch_of(n, params)):.3f}" for s in impls.values()]
            lines.append(f"| {n} | {mode} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    from torch.profiler import ProfilerActivity, profile

    for name, s in impls.items():
        logits = (torch.randn(64, VOCAB, device=device, generator=g) * args.spread).bfloat16()
        seqs = batch_of(64, MODES["t0.8 p0.95 rep1.1"])
        call_ms(s, logits, seqs, reps=3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                for seq, tok in zip(seqs, s(logits, seqs)[0]):
                    seq.output_ids.append(tok)  # as the engine does: no penalty row rebuilt
            torch.cuda.synchronize()
        totals = kernel_totals(prof, 5)
        total = sum(t for t, _ in totals.values())
        lines += ["", f"GPU kernels of one batch-64 t0.8 p0.95 rep1.1 call, {name}: "
                  f"{total:.3f} ms of kernel time", "", "| kernel | calls | ms |", "|---|---|---|"]
        for k, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:12]:
            lines.append(f"| `{k[:60]}` | {c:.0f} | {t:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(args.out, "sampler", text)


if __name__ == "__main__":
    main()
