"""Decode attention kernels on one GPU: one query row against a long KV shard.

    python benchmarks/decode_kernels.py

A single query row gives a flash kernel only (heads) blocks of work, far too few to fill
the GPU, so the shard is also tried split into S pieces run as a batch of S (split-K,
"flash decoding" with stock kernels) and merged by LSE. Reports GB/s of K+V read.
"""

from __future__ import annotations

import torch
from common import copy_gbps, machine, time_ms
from tr_engine.backends.cuda import _cudnn, _flash

from tr_engine.attention import merge_all

D, HQ, HKV = 128, 32, 8


def split_k(kernel, q, k, v, pieces):
    n = k.shape[0] // pieces
    qb = q.reshape(1, HQ, 1, D).expand(pieces, HQ, 1, D).contiguous()
    kb = k[: n * pieces].view(pieces, n, HKV, D).transpose(1, 2)
    vb = v[: n * pieces].view(pieces, n, HKV, D).transpose(1, 2)
    if kernel == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(qb, kb, vb, 0.0, False, False,
                                                                 scale=D**-0.5)
        out, lse = res[0][:, :, 0], res[1][:, :, 0]
    else:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0,
                                                                 False, False, scale=D**-0.5)
        out, lse = res[0][:, :, 0], res[1].reshape(pieces, HQ)
    return merge_all(out, lse)


def main() -> None:
    print(machine())
    print(f"device copy {copy_gbps():.0f} GB/s (read + write)")
    for n in (65536, 262144, 524288):
        probe(n)


def probe(n: int) -> None:
    q = torch.randn(1, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
    gb = 2 * k.numel() * k.element_size() / 1e9
    ref, _ = _flash(q, k, v, False, D**-0.5)
    for name, fn in [("cudnn", lambda: _cudnn(q, k, v, False, D**-0.5)),
                     ("flash", lambda: _flash(q, k, v, False, D**-0.5))] + [
            (f"{kern} split {p}", lambda kern=kern, p=p: split_k(kern, q, k, v, p))
            for kern in ("flash", "cudnn") for p in (8, 32, 128)]:
        try:
            out = fn()[0]
            err = (out.float().reshape(ref.shape) - ref.float()).abs().max().item()
            ms = time_ms(fn, warmup=3, reps=20, sync_ranks=False)
            print(f"n={n:>7} {name:>18}: {ms * 1e3:8.1f} us  {gb / ms * 1e3:7.0f} GB/s"
                  f"  max err vs flash {err:.1e}")
        except RuntimeError as e:
            print(f"n={n:>7} {name:>18}: refused ({str(e)[:60]})")


if __name__ == "__main__":
    main()
