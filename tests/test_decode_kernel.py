"""The CUDA decode attention kernels (Triton) against float64 attention: compiled on a GPU,
in Triton's interpreter on the CPU elsewhere; and the portable decode attention every
backend inherits.

The kernels read block tables, rows and key counts from tensors, so the cases mix empty
sequences, one-key sequences, pages scattered over the cache, pages smaller and larger than
a tile of keys, and more key ranges than keys. Quantized caches: fp8 pages with a float32
scale per slot and KV head, read as stored by the kernel (and dequantized by the portable
version).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import record_error
from reference import attention64
from tr_engine.backends import get_backend

pytest.importorskip("triton", reason="the CUDA kernels are checked where Triton is installed")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest
    from tr_engine.backends import cuda_decode

    return cuda_decode


def on_device(*xs):
    return [x.to(DEVICE) for x in xs]


PAGE = 16
LENS = [1, 0, 300, 1, 150]  # keys per sequence; the cache holds 25 pages of 16 (400 slots)


def paged(seed: int, page: int = PAGE):
    """Block tables for LENS over a cache of 400 slots: each sequence's pages drawn at
    random (so tiles cross pages that are far apart), in rows of a larger table."""
    g = torch.Generator().manual_seed(seed)
    tables = torch.zeros((7, 400 // page), dtype=torch.int32)
    rows = torch.tensor([5, 0, 2, 6, 3])
    for row in rows.tolist():
        tables[row] = torch.randperm(400 // page, generator=g).to(torch.int32)
    return tables, rows, torch.tensor(LENS)


def slots_of(tables, rows, lens, page):
    for row, n in zip(rows.tolist(), lens.tolist()):
        idx = torch.arange(n)
        yield tables[row].long()[idx // page] * page + idx % page


def reference(q, k_cache, v_cache, tables, rows, lens, scale, page=PAGE):
    outs, lses = [], []
    for b, slots in enumerate(slots_of(tables, rows, lens, page)):
        out, lse = attention64(q[b : b + 1], k_cache[slots], v_cache[slots], causal=False,
                               scale=scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 1, 64), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_kernel_matches_float64(kernels, dtype, hq, hkv, d, splits):
    g = torch.Generator().manual_seed(hq * 100 + d + splits)
    k_cache = torch.randn(400, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(400, hkv, d, generator=g).to(dtype)
    q = torch.randn(5, hq, d, generator=g).to(dtype)
    tables, rows, lens = paged(splits)
    out, lse = kernels.decode_attention(*on_device(q, k_cache, v_cache, tables, rows, lens),
                                        PAGE, d**-0.5, splits)
    out, lse = out.cpu(), lse.cpu()
    ref_out, ref_lse = reference(q, k_cache, v_cache, tables, rows, lens, d**-0.5)
    err = (out.double() - ref_out).abs()
    record_error(f"decode kernel {dtype}".replace("torch.", ""), err.max().item(),
                 err.mean().item())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert err.max() < (2e-6 if dtype == torch.float32 else 2e-3)
    empty = lens == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    assert (lse[~empty].double() - ref_lse[~empty]).abs().max() < 1e-5


@pytest.mark.parametrize("page", [1, 8, 64])
def test_decode_kernel_page_sizes(kernels, page):
    """Pages smaller and larger than the kernel's tile of keys."""
    g = torch.Generator().manual_seed(page)
    k_cache = torch.randn(400, 2, 64, generator=g)
    v_cache = torch.randn(400, 2, 64, generator=g)
    q = torch.randn(5, 4, 64, generator=g)
    tables, rows, lens = paged(page, page)
    out, _ = kernels.decode_attention(*on_device(q, k_cache, v_cache, tables, rows, lens),
                                      page, 0.125, 3)
    ref_out, _ = reference(q, k_cache, v_cache, tables, rows, lens, 0.125, page)
    assert (out.cpu().double() - ref_out).abs().max() < 2e-6


def test_decode_kernel_writes_into_a_packed_buffer(kernels):
    """Out and lse can land in one [B, H, D + 1] float32 buffer (what decode all-gathers)."""
    g = torch.Generator().manual_seed(7)
    k_cache = torch.randn(400, 2, 64, generator=g)
    v_cache = torch.randn(400, 2, 64, generator=g)
    q = torch.randn(5, 8, 64, generator=g)
    tables, rows, lens = paged(7)
    packed = torch.full((5, 8, 65), 123.0, device=DEVICE)
    kernels.decode_attention(*on_device(q, k_cache, v_cache, tables, rows, lens), PAGE, 0.125,
                             4, out=packed[..., :64], lse=packed[..., 64])
    packed = packed.cpu()
    ref_out, ref_lse = reference(q, k_cache, v_cache, tables, rows, lens, 0.125)
    assert (packed[..., :64].double() - ref_out).abs().max() < 2e-6
    lse = packed[..., 64]
    assert torch.isneginf(lse[1]).all()
    assert (lse[lens > 0].double() - ref_lse[lens > 0]).abs().max() < 1e-5


def test_merge_packed_matches_merge_all(kernels):
    from tr_engine.attention import merge_all

    g = torch.Generator().manual_seed(3)
    outs = torch.randn(3, 2, 4, 64, generator=g)
    lses = torch.randn(3, 2, 4, generator=g) * 5
    lses[1, 0] = float("-inf")  # rank 1 saw no key for sequence 0
    lses[:, 1, 0] = float("-inf")  # no rank saw a key for (sequence 1, head 0)
    packed = torch.cat([outs, lses.unsqueeze(-1)], dim=-1)
    out, lse = (x.cpu() for x in kernels.merge_packed(packed.to(DEVICE), torch.float16))
    ref_out, ref_lse = merge_all(outs.double(), lses.double())
    assert out.dtype == torch.float16
    assert (out.double() - ref_out).abs().max() < 2e-3
    assert (out[1, 0] == 0).all() and torch.isneginf(lse[1, 0])
    finite = ~torch.isneginf(ref_lse)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-5


def test_portable_decode_attention_matches_float64():
    """The host-driven version on the CPU backend: the path decode takes without graphs."""
    g = torch.Generator().manual_seed(11)
    k_cache = torch.randn(400, 3, 64, generator=g)
    v_cache = torch.randn(400, 3, 64, generator=g)
    q = torch.randn(5, 9, 64, generator=g)
    tables, rows, lens = paged(11)
    out, lse = get_backend("cpu").decode_attention(q, k_cache, v_cache, tables, rows, lens,
                                                   PAGE, 0.125)
    ref_out, ref_lse = reference(q, k_cache, v_cache, tables, rows, lens, 0.125)
    assert (out.double() - ref_out).abs().max() < 2e-6
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    # the key slots worked out by the caller instead (decode does it once a step), one of
    # them as a slice: the same result
    keys = list(slots_of(tables, rows, lens, PAGE))
    keys[3] = slice(int(keys[3][0]), int(keys[3][0]) + 1)
    out2, lse2 = get_backend("cpu").decode_attention(q, k_cache, v_cache, tables, rows, lens,
                                                     PAGE, 0.125, keys=keys)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("fmt_name", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize(("dtype", "widen"), [(torch.float32, False), (torch.float16, False),
                                              (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel_reads_fp8_pages_with_their_scales(kernels, monkeypatch, fmt_name, dtype,
                                                         widen, splits):
    """8-bit pages and a scale per slot and head, loaded in the kernel: against float64
    attention over the pages as stored times their scales (keys of very different sizes,
    so a wrong scale shows); bf16 queries with the pages widened to q's dtype or to float16
    (WIDEN_FP16)."""
    from tr_engine.kv.quant import dequantize, kv_format, quantize

    if dtype == torch.bfloat16 and not widen and DEVICE == "cpu":
        pytest.skip("Triton's interpreter has no bfloat16 products")
    monkeypatch.setattr(kernels, "WIDEN_FP16", widen)

    fmt = kv_format(fmt_name)
    g = torch.Generator().manual_seed(splits + 10)
    sizes = torch.logspace(-2, 2, 400)[torch.randperm(400, generator=g)][:, None, None]
    k8, ks = quantize(torch.randn(400, 2, 64, generator=g) * sizes, fmt)
    v8, vs = quantize(torch.randn(400, 2, 64, generator=g) * sizes, fmt)
    q = (torch.randn(5, 8, 64, generator=g) * 0.05).to(dtype)
    tables, rows, lens = paged(splits)
    out, lse = kernels.decode_attention(
        *on_device(q, k8, v8, tables, rows, lens), PAGE, 0.125, splits,
        k_scale=ks.to(DEVICE), v_scale=vs.to(DEVICE))
    out, lse = out.cpu(), lse.cpu()
    k64, v64 = dequantize(k8, ks, torch.float64), dequantize(v8, vs, torch.float64)
    ref_out, ref_lse = reference(q, k64, v64, tables, rows, lens, 0.125)
    err = (out.double() - ref_out).abs() / ref_out.abs().amax().clamp_min(1)
    record_error(f"decode kernel {fmt_name} pages, {dtype}{' widened' * widen}"
                 .replace("torch.", ""), err.max().item(), err.mean().item())
    # bf16 outputs round to 8 bits: widened or not, their bound is bf16's
    assert err.max() < {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    empty = lens == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    assert (lse[~empty].double() - ref_lse[~empty]).abs().max() < 1e-4


@pytest.mark.parametrize("fmt_name", ["fp8_e4m3", "int8"])
def test_portable_decode_attention_dequantizes_pages(fmt_name):
    from tr_engine.kv.quant import dequantize, kv_format, quantize

    fmt = kv_format(fmt_name)
    g = torch.Generator().manual_seed(12)
    k8, ks = quantize(torch.randn(400, 3, 64, generator=g) * 4, fmt)
    v8, vs = quantize(torch.randn(400, 3, 64, generator=g), fmt)
    q = torch.randn(5, 9, 64, generator=g)
    tables, rows, lens = paged(12)
    out, lse = get_backend("cpu").decode_attention(q, k8, v8, tables, rows, lens, PAGE, 0.125,
                                                   k_scale=ks, v_scale=vs)
    k64, v64 = dequantize(k8, ks, torch.float64), dequantize(v8, vs, torch.float64)
    ref_out, ref_lse = reference(q, k64, v64, tables, rows, lens, 0.125)
    assert (out.double() - ref_out).abs().max() < 1e-5  # float32, scores up to ~30
    assert (lse[lens > 0].double() - ref_lse[lens > 0]).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["contiguous", "heads-major", "pair", "flat"])
def test_fused_merge_reads_parts_where_they_lie(layout):
    """The fused out/LSE merge (backends/cuda_merge.py) takes an attention kernel's output
    as it comes, `[T, H, D]` with heads and rows in any order and its lse `[T, H]` a
    transposed view, and equals the float64 merge; rows that saw no key on either side stay
    (0, -inf)."""
    from tr_engine.backends.cuda_merge import fused_merge_

    from tr_engine.attention.merge import merge_

    g = torch.Generator().manual_seed(7)
    t, h, d = 37, 4, 32
    acc = torch.randn(t, h, d, generator=g)
    acc_lse = torch.randn(t, h, generator=g)
    acc_lse[3] = float("-inf")
    acc[3] = 0
    part = torch.randn(2, h, t, d, generator=g).to(torch.float16)  # a kernel's [B, H, T, D]
    part_lse = torch.randn(2, h, t, generator=g)
    part_lse[1, :, 3] = float("-inf")
    part_lse[0, :, 3] = float("-inf")
    if layout == "contiguous":
        out_b, lse_b = part[0].transpose(0, 1).contiguous(), part_lse[0].t().contiguous()
    elif layout == "heads-major":  # cuDNN's and flash's [1, H, T, D], as transposed views
        out_b, lse_b = part[0].transpose(0, 1), part_lse[0].t()
    elif layout == "pair":  # the second of a batch of two, a view at an offset
        out_b, lse_b = part.transpose(1, 2)[1], part_lse.transpose(1, 2)[1]
    else:  # not [T, H, D]: copied contiguous first
        out_b, lse_b = part[1].transpose(0, 1).reshape(t, h * d)[:, :d], part_lse[1, 0]
        acc, acc_lse = acc[:, 0].contiguous(), acc_lse[:, 0].contiguous()
    want = acc.double(), acc_lse.double()
    merge_(*want, out_b.double(), lse_b.double())
    out, lse = on_device(acc.float(), acc_lse.float())
    fused_merge_(out, lse, *on_device(out_b, lse_b))
    assert (out.cpu().double() - want[0]).abs().max() < 1e-5
    seen = want[1] > float("-inf")
    assert torch.equal(lse.cpu() > float("-inf"), seen)
    assert (lse.cpu().double()[seen] - want[1][seen]).abs().max() < 1e-5
    if layout != "flat":
        assert torch.equal(lse.cpu()[3], torch.full((h,), float("-inf")))
        assert not out.cpu()[3].any()


@pytest.mark.parametrize("fmt_name", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_dequantize_rows_equals_the_float64_product(fmt_name, dtype):
    """The one-pass widening of 8-bit KV rows (backends/cuda_dequant.py), for a run of slots
    and for a list of them: each value the float64 product of the stored value and its scale
    within one rounding to `dtype`, and bit for bit what the portable dequantization gives."""
    from tr_engine.backends.cuda_dequant import dequantize_rows

    from tr_engine.kv.quant import dequantize, kv_format, quantize

    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter truncates to bfloat16 where the card rounds")
    fmt = kv_format(fmt_name)
    g = torch.Generator().manual_seed(21)
    stored, scale = quantize(torch.randn(300, 4, 32, generator=g) * 3, fmt)
    listed = torch.randperm(300, generator=g)[:77]
    for slots in (slice(9, 290), listed):
        want64 = dequantize(stored[slots], scale[slots], torch.float64)
        out = torch.full(want64.shape, float("nan"), dtype=dtype, device=DEVICE)
        got = dequantize_rows(*on_device(stored, scale),
                              slots if isinstance(slots, slice) else slots.to(DEVICE), out).cpu()
        ulp = torch.finfo(dtype).eps  # relative spacing: one rounding is half of it
        assert ((got.double() - want64).abs() <= want64.abs() * ulp / 2 + 1e-30).all()
        portable = dequantize(stored[slots], scale[slots], dtype)
        assert torch.equal(got, portable)
