"""Sequence-parallel attention on GPUs: correctness first, then a timing table.

    torchrun --nproc-per-node 2 benchmarks/attention.py --out docs/PERFORMANCE.md

Correctness: every strategy against float32 attention of the whole sequence on one GPU
(bf16 inputs), including padded lengths and a partial prefill after a cached prefix.
Timing (bf16, causal, D 128): one GPU's best kernel (cuDNN or flash) on the whole sequence;
tokenring (with the fused Triton merge and with the portable one); ring (pass-KV); and
PyTorch's own context_parallel (cuDNN, both rotate methods, the faster reported). Each time
is the median of CUDA-event timings, the slowest rank's. "hidden" is the share of
tokenring's communication time that overlaps compute: (t_comm + t_compute - t_total) /
t_comm, from runs with the compute or the communication replaced by no-ops.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.distributed as dist
from common import (
    barrier,
    copy_gbps,
    link_gbps,
    machine,
    matmul_tflops,
    setup,
    time_ms,
    today,
    write_section,
)
from tr_engine.backends import Communicator, Handle, get_backend
from tr_engine.backends.base import Backend
from tr_engine.backends.cuda import _cudnn, _flash

from tr_engine.attention import ring_attention, tokenring_attention
from tr_engine.distributed import zigzag

D = 128
DT = torch.bfloat16


def rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=DT)


def check_correctness(rank: int, world: int) -> list[str]:
    lines = []
    torch.manual_seed(1234)  # the same full tensors on every rank
    for (hq, hkv), total, cached in [((32, 8), 4096, 0), ((32, 32), 4096 + 6, 0),
                                     ((12, 4), 3000, 0), ((32, 8), 2048, 8192)]:
        q, k, v = rand(total, hq, D), rand(total, hkv, D), rand(total, hkv, D)
        kc, vc = rand(cached, hkv, D), rand(cached, hkv, D)
        # float32 reference of the whole sequence on this GPU (bottom-right causal)
        k_all, v_all = torch.cat([kc, k]).float(), torch.cat([vc, v]).float()
        ref = _reference(q.float(), k_all, v_all, cached)
        qs, ks, vs = (zigzag.shard(x, world, rank) for x in (q, k, v))
        n_valid = zigzag.local_len(total, world, rank)
        bounds = [cached * r // world for r in range(world + 1)]
        prefix = {}
        if cached:
            a, b = bounds[rank], bounds[rank + 1]
            prefix = {"k_prefix": kc[a:b], "v_prefix": vc[a:b]}
        for name, fn in (("tokenring", tokenring_attention), ("ring", ring_attention)):
            out, _ = fn(qs, ks, vs, **prefix)
            ref_s = zigzag.shard(ref, world, rank)
            err = (out[:n_valid].float() - ref_s[:n_valid]).abs()
            t = torch.tensor([err.max().item(), err.mean().item()], device="cuda")
            if world > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ok = t[0].item() < 2e-2
            lines.append(f"| {name} | {hq}/{hkv} | {total} | {cached} | {t[0].item():.2e} | "
                         f"{t[1].item():.2e} | {'ok' if ok else 'FAIL'} |")
            if not ok:
                raise SystemExit(f"{name} wrong: max error {t[0].item()}")
    return lines


def _reference(q, k, v, cached):
    out = torch.empty_like(q)
    for a in range(0, q.shape[0], 1024):  # bottom-right causal, in slices to bound memory
        b = min(q.shape[0], a + 1024)
        out[a:b] = _causal_rows(q[a:b], k[: cached + b], v[: cached + b], cached + a)
    return out


def _causal_rows(q, k, v, first_pos):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * D**-0.5
    qpos = torch.arange(q.shape[0], device=q.device)[:, None] + first_pos
    kpos = torch.arange(k.shape[0], device=q.device)[None, :]
    s.masked_fill_(kpos > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def bench_cp(q, k, v, world, hq, hkv, reps):
    """PyTorch's context_parallel on [1, H, S, D] buffers; the faster rotate method."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError:
        set_rotate_method = None
    mesh = init_device_mesh("cuda", (world,))
    best, note = None, ""
    for method in ("alltoall", "allgather"):
        if set_rotate_method is not None:
            set_rotate_method(method)
        for gqa in (True, False):
            if not gqa and hq == hkv:
                continue
            try:
                g = hq // hkv
                qb = q.transpose(0, 1).unsqueeze(0).contiguous()
                kb = (k if gqa else k.repeat_interleave(g, 1)).transpose(0, 1).unsqueeze(0)
                vb = (v if gqa else v.repeat_interleave(g, 1)).transpose(0, 1).unsqueeze(0)
                kb, vb = kb.contiguous(), vb.contiguous()
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), context_parallel(
                        mesh, buffers=[qb, kb, vb], buffer_seq_dims=[2, 2, 2]):
                    def sdpa(qb=qb, kb=kb, vb=vb, gqa=gqa):
                        return F.scaled_dot_product_attention(
                            qb, kb, vb, is_causal=True, enable_gqa=gqa and hq != hkv)

                    ms = time_ms(sdpa, reps=reps)
                if best is None or ms < best:
                    best = ms
                    note = f"cuDNN, {method}" + ("" if gqa or hq == hkv else ", K/V repeated")
                break  # GQA worked natively
            except Exception as e:  # record why and try the next form
                note = note or f"failed: {type(e).__name__}: {str(e)[:80]}"
                barrier()
    return best, note


def bench_one(s, hq, hkv, rank, world, reps):
    torch.manual_seed(s + hq)
    q, k, v = rand(s, hq, D), rand(s, hkv, D), rand(s, hkv, D)
    flops = 4.0 * s * s / 2 * hq * D  # causal
    row = {"S": s, "heads": f"{hq}/{hkv}"}
    # one GPU: the whole sequence, the better of cuDNN and flash
    if rank == 0:
        single = {}
        for name, kern in (("cuDNN", _cudnn), ("flash", _flash)):
            with contextlib.suppress(RuntimeError):  # a kernel that refuses the shape
                single[name] = time_ms(lambda kern=kern: kern(q, k, v, True, D**-0.5),
                                       reps=reps, sync_ranks=False)
        row["single_kernel"], row["single"] = min(single.items(), key=lambda kv: kv[1])
    barrier()
    qs, ks, vs = (zigzag.shard(x, world, rank) for x in (q, k, v))
    backend = get_backend("cuda")

    def tokenring():
        return tokenring_attention(qs, ks, vs)

    row["tokenring"] = time_ms(tokenring, reps=reps)
    with patched(backend, "merge_", lambda *a: Backend.merge_(backend, *a)):
        row["tokenring_portable_merge"] = time_ms(tokenring, reps=reps)
    row["ring"] = time_ms(lambda: ring_attention(qs, ks, vs), reps=reps)
    if world > 1:
        with patched(Communicator, "exchange", lambda self, sends=(), recvs=(): Handle()):
            row["compute_only"] = time_ms(tokenring, reps=reps)

        def no_attention(q_, k_, v_, causal, scale=None):
            return torch.empty_like(q_), torch.empty(q_.shape[:2], device="cuda")

        with patched(backend, "attention", no_attention), \
                patched(backend, "merge_", lambda *a: None):
            row["comm_only"] = time_ms(tokenring, reps=reps)
        row["cp"], row["cp_note"] = bench_cp(q, k, v, world, hq, hkv, reps)
    row["flops"] = flops
    return row


def fmt(rows, world):
    out = ["| S | heads q/kv | 1 GPU best (ms) | tokenring (ms) | TFLOP/s per GPU | speedup | "
           "hidden comm (comm alone / compute alone, ms) | tokenring, portable merge (ms) | "
           "ring pass-KV (ms) | torch context_parallel (ms) | tokenring vs CP |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tr = r["tokenring"]
        tflops = r["flops"] / world / tr / 1e9
        hidden = "-"
        if "comm_only" in r and r["comm_only"] > 0:
            h = (r["comm_only"] + r["compute_only"] - tr) / r["comm_only"]
            hidden = (f"{max(0.0, min(1.0, h)):.0%} ({r['comm_only']:.1f} / "
                      f"{r['compute_only']:.1f})")
        cp = f"{r['cp']:.1f} ({r['cp_note']})" if r.get("cp") else r.get("cp_note", "-")
        vs_cp = f"{r['cp'] / tr:.2f}x" if r.get("cp") else "-"
        out.append(f"| {r['S'] // 1024}K | {r['heads']} | {r['single']:.1f} ({r['single_kernel']})"
                   f" | {tr:.1f} | {tflops:.0f} | {r['single'] / tr:.2f}x | {hidden} | "
                   f"{r['tokenring_portable_merge']:.1f} | {r['ring']:.1f} | {cp} | {vs_cp} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="16384,32768,65536,131072,262144")
    ap.add_argument("--heads", default="32/8,32/32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="markdown file to write the results into")
    args = ap.parse_args()
    rank, world, _ = setup()
    tf, bw = matmul_tflops(), copy_gbps()
    link = link_gbps(world, rank)
    checks = check_correctness(rank, world)
    rows = []
    for heads in args.heads.split(","):
        hq, hkv = map(int, heads.split("/"))
        for s in map(int, args.seqs.split(",")):
            reps = args.reps if s < 131072 else max(3, args.reps - 2)
            rows.append(bench_one(s, hq, hkv, rank, world, reps))
            torch.cuda.empty_cache()
            if rank == 0:
                print("\n".join(fmt(rows[-1:], world)[2:]), flush=True)
    if rank != 0:
        return
    body = [f"## Attention (prefill), {world} GPU(s) — {today()}", "",
            f"Machine: {machine()}.",
            f"Ceilings measured in the same run: bf16 matmul {tf:.0f} TFLOP/s, device copy "
            f"{bw:.0f} GB/s (read + write), link {link:.0f} GB/s one way with both directions "
            "busy.", "",
            f"Command: `torchrun --nproc-per-node {world} benchmarks/attention.py`", "",
            "Correctness (bf16 inputs, against float32 attention of the whole sequence):", "",
            "| strategy | heads q/kv | new tokens | cached tokens | max abs err | mean abs err | |",
            "|---|---|---|---|---|---|---|", *checks, "",
            "Causal, D 128, bf16. TFLOP/s per GPU counts the causal half of S² only.", "",
            *fmt(rows, world)]
    text = "\n".join(body)
    print(text)
    if args.out:
        write_section(args.out, f"attention-{world}gpu", text)


if __name__ == "__main__":
    main()
