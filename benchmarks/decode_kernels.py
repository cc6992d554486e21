"""Decode attention on one GPU: one query row per sequence against a long paged KV cache.

    python benchmarks/decode_kernels.py [--out docs/PERFORMANCE.md]

The engine's decode kernel (backends/cuda_decode.py, Triton, split-K, block tables and
lengths read on the device so it can be recorded in a graph; pages of 16 tokens, each
sequence's pages scattered over the pool at random) against float64 first, then timed
against the stock cuDNN and flash kernels called on a contiguous slab of as many keys
(which need the length on the host). 32 query / 8 KV heads, D 128, bf16; GB/s counts K
and V read once.
Every time is GPU time: 16 calls recorded in a CUDA graph, replayed, divided by 16 (as
decode runs it; launched from Python, two small kernels would be timed by the host). A
sweep over tile shapes (keys per block, warps, stages) and key ranges per SM picks the
defaults.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from common import copy_gbps, machine, time_ms, today, write_section
from tr_engine.backends import cuda_decode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import attention64  # noqa: E402
from tr_engine.backends.cuda import _cudnn, _flash

D, HQ, HKV = 128, 32, 8
PAGE = 16
SMS = 0


def paged_tables(lens: list[int], pages: int, seed: int = 0):
    """Block tables giving each sequence its own pages, drawn at random from the pool."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(pages, generator=g)
    need = [-(-n // PAGE) for n in lens]
    tables = torch.zeros((len(lens), max(need) + 1), dtype=torch.int32)
    at = 0
    for b, m in enumerate(need):
        tables[b, :m] = order[at : at + m]
        at += m
    return tables.cuda(), torch.arange(len(lens), device="cuda")


def slabs(batch: int, n: int):
    """A paged cache holding `batch` sequences of n keys (and spare room), q for each, and
    contiguous slab starts for the stock kernels."""
    cap = batch * (n + 1024)
    k = torch.randn(cap, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(cap, HKV, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    tables, rows = paged_tables([n] * batch, cap // PAGE)
    lens = torch.full((batch,), n, device="cuda")
    starts = [b * (n + 1024) for b in range(batch)]
    return q, k, v, (tables, rows, lens), starts


def worst_error(out, lse, q, k, v, tables, sizes) -> float:
    """The largest |out - float64 reference| over the batch's rows (sequence b: sizes[b] keys
    in the pages of tables[b]); asserts the LSE within 1e-3 and empty rows as out 0, lse -inf."""
    worst = 0.0
    for b, n in enumerate(sizes):
        if n == 0:
            assert (out[b] == 0).all() and torch.isneginf(lse[b]).all()
            continue
        idx = torch.arange(n, device="cuda")
        slots = tables[b].long()[idx // PAGE] * PAGE + idx % PAGE
        ref, ref_lse = attention64(q[b : b + 1], k[slots], v[slots], causal=False,
                                   scale=D**-0.5)
        worst = max(worst, (out[b].double() - ref[0]).abs().max().item())
        assert (lse[b].double() - ref_lse[0]).abs().max() < 1e-3
    return worst


def check() -> list[str]:
    lines = []
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        g = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(20000, HKV, D, device="cuda", generator=g).to(dtype)
        v = torch.randn(20000, HKV, D, device="cuda", generator=g).to(dtype)
        q = torch.randn(4, HQ, D, device="cuda", generator=g).to(dtype)
        sizes = [5000, 0, 1, 14000]
        tables, rows = paged_tables(sizes, 20000 // PAGE, seed=1)
        lens = torch.tensor(sizes, device="cuda")
        splits = cuda_decode.decode_splits(4, HKV, SMS)
        out, lse = cuda_decode.decode_attention(q, k, v, tables, rows, lens, PAGE, D**-0.5,
                                                splits)
        worst = worst_error(out, lse, q, k, v, tables, sizes)
        assert worst < tol, f"{dtype}: {worst:.2e}"
        lines.append(f"{str(dtype)[6:]}: max abs error against float64 {worst:.1e} "
                     f"(sequences of 5000, 0, 1, 14000 keys in scattered pages)")
    return lines


def graph_ms(fn, calls: int = 16) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, warmup=2, reps=10, sync_ranks=False) / calls


def gbps(batch: int, n: int, ms: float) -> float:
    return 2 * batch * n * HKV * D * 2 / ms / 1e6


def _swept(batch: int, waves_list, run, label: str, note=lambda ms: ""):
    """Every tile (keys per block, warps, stages) at each programs-per-SM in waves_list:
    run(tiles, splits) is the launch timed. Returns (best tiles + waves, its ms, lines)."""
    best, lines = None, []
    for waves in waves_list:
        splits = cuda_decode.decode_splits(batch, HKV, SMS, waves)
        for tiles in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
            try:
                ms = graph_ms(lambda t=tiles, s=splits: run(t, s))
            except Exception as e:  # e.g. out of shared memory for this tile
                lines.append(f"  {label}tiles {tiles} waves {waves}: refused "
                             f"({type(e).__name__})")
                continue
            lines.append(f"  {label}tiles {tiles} waves {waves}: {ms * 1e3:7.1f} us{note(ms)}")
            if best is None or ms < best[1]:
                best = ((*tiles, waves), ms)
    return best[0], best[1], lines


def sweep(batch: int, n: int) -> tuple[tuple[int, ...], list[str]]:
    q, k, v, paged, _ = slabs(batch, n)
    tiles, _, lines = _swept(
        batch, (2, 4, 8), lambda t, s: cuda_decode.decode_attention(
            q, k, v, *paged, PAGE, D**-0.5, s, tiles=t), "",
        lambda ms: f" {gbps(batch, n, ms):6.0f} GB/s")
    return tiles, lines


def compare(batch: int, n: int, variants: dict[str, tuple[int, ...]]) -> list[str]:
    q, k, v, paged, s0 = slabs(batch, n)
    rows = []
    for label, tiles in variants.items():
        splits = cuda_decode.decode_splits(batch, HKV, SMS, tiles[3])
        rows.append((f"ours, {label}", graph_ms(lambda t=tiles, s=splits: (
            cuda_decode.decode_attention(q, k, v, *paged, PAGE, D**-0.5, s, tiles=t[:3])))))
    for name, fn in (("cudnn", _cudnn), ("flash", _flash)):
        def run(fn=fn):
            for b in range(batch):
                fn(q[b : b + 1], k[s0[b] : s0[b] + n], v[s0[b] : s0[b] + n], False, D**-0.5)
        try:
            rows.append((f"{name} per sequence", graph_ms(run)))
        except RuntimeError as e:
            rows.append((f"{name}: refused {str(e)[:40]}", float("nan")))
    return [f"| {batch} | {n // 1024}K | {name} | {ms * 1e3:.1f} | {gbps(batch, n, ms):.0f} |"
            for name, ms in rows]


def _bf16_and_fp8_ms(batch: int, n: int, fmt) -> tuple[float, float]:
    """The kernel's time on bf16 pages, then on the same pages quantized."""
    from tr_engine.kv.quant import quantize

    q, k, v, paged, _ = slabs(batch, n)
    splits = cuda_decode.decode_splits(batch, HKV, SMS)
    bf16 = graph_ms(lambda: cuda_decode.decode_attention(q, k, v, *paged, PAGE, D**-0.5,
                                                         splits))
    (k8, ks), (v8, vs) = quantize(k, fmt), quantize(v, fmt)
    splits = cuda_decode.decode_splits(batch, HKV, SMS, quant=True)
    ms = graph_ms(lambda: cuda_decode.decode_attention(
        q, k8, v8, *paged, PAGE, D**-0.5, splits, k_scale=ks, v_scale=vs))
    return bf16, ms


def fp8_sweep(fmt, shapes=((1, 409600), (32, 4096))) -> list[str]:
    """The tiles (keys per block, warps, stages, programs per SM) on fp8 pages, swept."""
    lines = []
    for batch, n in shapes:
        lines += _fp8_sweep_shape(fmt, batch, n)
        print(lines[-1], flush=True)
    return lines


def _fp8_sweep_shape(fmt, batch: int, n: int) -> list[str]:
    from tr_engine.kv.quant import quantize

    q, k, v, paged, _ = slabs(batch, n)
    (k8, ks), (v8, vs) = quantize(k, fmt), quantize(v, fmt)
    del k, v
    tiles, ms, lines = _swept(
        batch, (4, 8, 16), lambda t, s: cuda_decode.decode_attention(
            q, k8, v8, *paged, PAGE, D**-0.5, s, tiles=t, k_scale=ks, v_scale=vs),
        f"fp8 batch {batch} {n // 1024}K ")
    best = (tiles, ms)
    splits = cuda_decode.decode_splits(batch, HKV, SMS, best[0][3])
    widened = {}
    for fp16 in (False, True):
        cuda_decode.WIDEN_FP16 = fp16
        widened[fp16] = graph_ms(lambda: cuda_decode.decode_attention(
            q, k8, v8, *paged, PAGE, D**-0.5, splits, tiles=best[0][:3], k_scale=ks,
            v_scale=vs))
    cuda_decode.WIDEN_FP16 = False
    lines.append(f"fp8 batch {batch}, {n // 1024}K keys: best {best[0]} {best[1] * 1e3:.1f} us; "
                 f"widened to q's dtype {widened[False] * 1e3:.1f} us, to float16 "
                 f"{widened[True] * 1e3:.1f} us")
    return lines


def fp8(copy: float, sweep: bool = False) -> str:
    """The kernel on fp8 (e4m3) pages with per-slot, per-head scales against bf16 pages:
    checked against float64 over the pages times their scales, then timed; GB/s and the
    bound count the bytes read (8-bit K/V plus float32 scales, or bf16 K/V)."""
    from tr_engine.kv.quant import dequantize, kv_format, quantize

    fmt = kv_format("fp8")
    g = torch.Generator(device="cuda").manual_seed(0)
    k8, ks = quantize(torch.randn(20000, HKV, D, device="cuda", generator=g) * 3, fmt)
    v8, vs = quantize(torch.randn(20000, HKV, D, device="cuda", generator=g), fmt)
    q = torch.randn(4, HQ, D, device="cuda", generator=g).bfloat16()
    sizes = [5000, 0, 1, 14000]
    tables, rows = paged_tables(sizes, 20000 // PAGE, seed=1)
    lens = torch.tensor(sizes, device="cuda")
    k64, v64 = dequantize(k8, ks, torch.float64), dequantize(v8, vs, torch.float64)
    errors, chosen = {}, cuda_decode.WIDEN_FP16
    for fp16 in (False, True):
        cuda_decode.WIDEN_FP16 = fp16
        out, lse = cuda_decode.decode_attention(q, k8, v8, tables, rows, lens, PAGE,
                                                D**-0.5, cuda_decode.decode_splits(4, HKV, SMS),
                                                k_scale=ks, v_scale=vs)
        errors[fp16] = worst_error(out, lse, q, k64, v64, tables, sizes)
    cuda_decode.WIDEN_FP16 = chosen
    worst = errors[chosen]
    print(f"fp8 pages, max abs error: widened to bf16 {errors[False]:.2e}, to float16 "
          f"{errors[True]:.2e}", flush=True)
    assert worst < 2e-2, f"fp8 pages: {worst:.2e}"
    lines = [f"## Decode attention kernel on fp8 pages — {today()}", "",
             f"Machine: {machine()}; device copy {copy:.0f} GB/s (read + write). Command: "
             "`python benchmarks/decode_kernels.py --fp8`.", "",
             f"Correctness: fp8 e4m3 pages with their scales, bf16 queries: max abs error "
             f"{worst:.1e} against float64 over the pages times their scales.", "",
             "32 query / 8 KV heads, D 128, one query row; pages of 16 scattered at random; "
             "bound = bytes read / (copy rate / 2).", "",
             "| batch | keys per sequence | pages | us | GB/s read | bound (us) | vs bf16 |",
             "|---|---|---|---|---|---|---|"]
    for batch, n in ((1, 65536), (1, 131072), (1, 409600), (8, 8192), (32, 4096)):
        bf16, ms = _bf16_and_fp8_ms(batch, n, fmt)
        for name, t, per in (("bf16", bf16, 2 * HKV * D * 2), ("fp8", ms, 2 * HKV * (D + 4))):
            read = batch * n * per
            bound = read / (copy / 2 * 1e9) * 1e6
            lines.append(f"| {batch} | {n // 1024}K | {name} | {t * 1e3:.1f} | "
                         f"{read / t / 1e6:.0f} | {bound:.1f} | {bf16 / t:.2f}x |")
            print(lines[-1], flush=True)
    if sweep:
        lines += ["", "Sweep of the tiles on fp8 pages:", "", "```", *fp8_sweep(fmt), "```"]
    return "\n".join(lines)


def main() -> None:
    global SMS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fp8", action="store_true",
                    help="the kernel on fp8 pages against bf16 pages (section decode-kernel-fp8)")
    ap.add_argument("--fp8-sweep", action="store_true", help="with --fp8: sweep its tiles")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    SMS = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_gbps()
    if args.fp8:
        text = fp8(copy, args.fp8_sweep)
        print(text)
        if args.out:
            write_section(args.out, "decode-kernel-fp8", text)
        return
    head = [f"## Decode attention kernel — {today()}", "",
            f"Machine: {machine()}; device copy {copy:.0f} GB/s (read + write).", "",
            "Command: `python benchmarks/decode_kernels.py " + " ".join(sys.argv[1:]) + "`", ""]
    head += ["Correctness: " + "; ".join(check()) + ".", ""]
    print("\n".join(head), flush=True)
    sweeps = []
    chosen = {}
    for batch, n in ((1, 65536), (8, 8192)):
        tiles, lines = sweep(batch, n)
        chosen[(batch, n)] = tiles
        sweeps += [f"batch {batch}, {n // 1024}K keys each: best tiles {tiles}"] + lines
        print("\n".join(sweeps[-len(lines) - 1:]), flush=True)
    table = ["| batch | keys per sequence | kernel | us | GB/s |", "|---|---|---|---|---|"]
    default = (cuda_decode.BLOCK, cuda_decode.WARPS, cuda_decode.STAGES, cuda_decode.WAVES)
    variants = {"defaults": default, "best of the 64K sweep": chosen[(1, 65536)]}
    for batch, n in ((1, 8192), (1, 65536), (1, 262144), (1, 524288), (8, 8192), (32, 4096)):
        rows = compare(batch, n, variants)
        table += rows
        print("\n".join(rows), flush=True)
    text = "\n".join(head + [
        f"Kernel defaults (keys per block, warps, stages, programs per SM): {default}; best "
        f"in the 64K sweep: {chosen[(1, 65536)]}.", ""] + table
        + ["", "Sweep:", "", "```", *sweeps, "```"])
    print(text)
    if args.out:
        write_section(args.out, "decode-kernels", text)


if __name__ == "__main__":
    main()
