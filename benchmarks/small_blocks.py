"""Attention of a chunk of up to 8192 queries over its cached prefix and its own keys, on one
GPU, by the route the CUDA backend gives it.

    python benchmarks/small_blocks.py [--out docs/PERFORMANCE.md]

The blocks of a prefill chunk under a token budget (a mixed step) and of a follow-up on a
cached document: queries `tq` (Llama-3.1-8B heads: 32 query, 8 KV, D 128, bf16) against
`cached` prefix keys without a mask and against their own keys under the causal mask, as
the local strategy runs them (`local_attention`, the merge included). Routes, each a
backend with its shapes built first (`prepare_attention`):
- flash: every block to flash (no prepared shapes);
- pow2 pieces: the prefix to cuDNN in pieces of 16384 keys, the queries padded to a power of
  two; the causal block to flash (the code before this benchmark);
- 4096 pieces: as prepared, with pieces of 4096 keys only;
- prepared: the backend's defaults (pieces of KEY_PIECES keys, the largest first, queries
  padded to QUERY_BUCKETS, the causal block padded to a bucket on cuDNN from CAUSAL_MIN
  queries).
Every route is checked against float32 attention of the same inputs first. Times are
medians of CUDA-event timings after warm-up; TFLOP/s counts the causal half of the own
block.
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import machine, time_ms, today, write_section
from tr_engine.backends import override_backend
from tr_engine.backends.cuda import CudaBackend

from tr_engine.attention import local_attention

HQ, HKV, D = 32, 8, 128
SHAPES = [(1000, 0), (2304, 0), (4096, 0), (1200, 30000), (2300, 16000), (2300, 60000),
          (4096, 28000), (1024, 131072), (1024, 32768)]


def routes() -> dict[str, CudaBackend]:
    flash = CudaBackend()
    pow2 = CudaBackend()
    pow2.KEY_PIECES, pow2.CAUSAL_MIN = (16384,), 1 << 30
    pow2.QUERY_BUCKETS = tuple(64 << i for i in range(8))
    small = CudaBackend()
    small.KEY_PIECES = (4096,)
    prepared = CudaBackend()
    for b in (pow2, small, prepared):
        b.prepare_attention(HQ, HKV, D, torch.bfloat16, torch.device("cuda"))
    return {"flash": flash, "pow2 pieces": pow2, "4096 pieces": small, "prepared": prepared}


def run(backend: CudaBackend, q, k, v, cached: int):
    with override_backend("cuda", backend):  # what backend_for hands the strategy
        return local_attention(q, k[cached:], v[cached:], causal=True, scale=D**-0.5,
                               k_prefix=k[:cached], v_prefix=v[:cached])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    backends = routes()
    g = torch.Generator(device="cuda").manual_seed(0)
    lines = [f"## Chunk attention by route, 1 GPU — {today()}", "", f"{machine()}.", "",
             "Command: `python benchmarks/small_blocks.py`", "",
             "| queries | cached keys | " + " | ".join(f"{n} (ms)" for n in backends)
             + " | prepared TFLOP/s | prepared / best other |",
             "|---|---|" + "---|" * (len(backends) + 2)]
    for tq, cached in SHAPES:
        q = torch.randn(tq, HQ, D, device="cuda", generator=g).bfloat16()
        k = torch.randn(cached + tq, HKV, D, device="cuda", generator=g).bfloat16()
        v = torch.randn(cached + tq, HKV, D, device="cuda", generator=g).bfloat16()
        ref = _reference(q, k, v, cached)
        times = {}
        for name, b in backends.items():
            out, _ = run(b, q, k, v, cached)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (name, tq, cached, err)
            times[name] = time_ms(functools.partial(run, b, q, k, v, cached), warmup=3,
                                  reps=15, sync_ranks=False)
        flops = 4 * tq * HQ * D * (cached + tq / 2)
        others = min(t for n, t in times.items() if n != "prepared")
        lines.append(f"| {tq} | {cached} | " + " | ".join(f"{t:.3f}" for t in times.values())
                     + f" | {flops / times['prepared'] / 1e9:.0f} | "
                     f"{times['prepared'] / others:.2f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(args.out, "small-blocks-1gpu", text)


def _reference(q, k, v, cached: int) -> torch.Tensor:
    """float32 attention, bottom-right causal, a few query rows at a time."""
    qf, kf, vf = q.float(), k.float().repeat_interleave(HQ // HKV, 1), \
        v.float().repeat_interleave(HQ // HKV, 1)
    out = torch.empty_like(qf)
    for a in range(0, q.shape[0], 256):
        s = torch.einsum("qhd,khd->hqk", qf[a : a + 256], kf) * D**-0.5
        pos = torch.arange(a, min(a + 256, q.shape[0]), device="cuda")[:, None] + cached
        s = s.masked_fill(torch.arange(k.shape[0], device="cuda")[None, :] > pos, float("-inf"))
        out[a : a + 256] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vf)
    return out


if __name__ == "__main__":
    main()
