"""Decode attention for CUDA (Triton): one query per sequence against its keys in the paged
cache.

Sequence b reads its first lens[b] keys through its block table: key i lies in slot
`tables[rows[b], i // PAGE] * PAGE + i % PAGE`. Tables, rows and lens are read on the
device, so a CUDA graph captured once serves every step whatever the lengths.
Split-K ("flash decoding"): the keys of a sequence are cut into `splits` ranges,
one program per (sequence, KV head, range) so a single long sequence still fills the GPU;
each program handles all the query heads that share its KV head (grouped-query attention)
as the rows of one small matrix product. A second kernel merges the ranges with the same
identity as tr_engine/attention/merge.py. Ranges and rows that see no key give (0, -inf).

Quantized pages (fp8 or int8, one float32 scale per slot and KV head, tr_engine/kv/quant.py)
are read as they are stored: a tile of keys is loaded in 8 bits with its scales and widened
to q's dtype in registers, so decode reads about half the bytes of a 16-bit cache. The scales
are applied where they cost least: q·(s_j k_j) = s_j (q·k_j) scales a tile's scores by
column, and Σ_j p_j (s_j v_j) = Σ_j (p_j s_j) v_j scales the probabilities before the
product with V (the softmax sums p_j themselves).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(q, k, v, k_scale, v_scale, tables, rows_of, lens, part_out, part_lse, scale,
                  sq_b, sq_h, sk_n, sk_h, sv_n, sv_h, ss_n, st_r, splits,
                  GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                  PAGE: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr,
                  WIDEN_FP16: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    table = tables + tl.load(rows_of + b).to(tl.int64) * st_r
    n = tl.load(lens + b).to(tl.int32)
    per = tl.cdiv(tl.cdiv(n, splits), BLOCK) * BLOCK  # keys per range, whole blocks
    lo = s * per
    hi = tl.minimum(lo + per, n)

    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, D)
    heads = h * GROUP + rows  # the query heads reading KV head h
    row_ok = rows < GROUP
    qb = tl.load(q + b * sq_b + heads[:, None] * sq_h + dims[None, :], mask=row_ok[:, None],
                 other=0.0)  # [ROWS, D]
    if WIDEN_FP16:  # 8-bit pages widen to float16 (one conversion, more mantissa than bf16)
        qb = qb.to(tl.float16)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for off in range(lo, hi, BLOCK):
        keys = off + tl.arange(0, BLOCK)
        key_ok = keys < hi
        page = tl.load(table + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
        pos = page * PAGE + keys % PAGE
        kb = tl.load(k + pos[:, None] * sk_n + h * sk_h + dims[None, :], mask=key_ok[:, None],
                     other=0.0)  # [BLOCK, D]
        if QUANT:
            kb = kb.to(qb.dtype)
        scores = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * scale  # [ROWS, BLOCK]
        if QUANT:  # each key's scale, by column
            scores = scores * tl.load(k_scale + pos * ss_n + h, mask=key_ok, other=0.0)[None, :]
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        vb = tl.load(v + pos[:, None] * sv_n + h * sv_h + dims[None, :], mask=key_ok[:, None],
                     other=0.0)
        if QUANT:  # each value's scale, on its probabilities
            vb = vb.to(qb.dtype)
            pv = p * tl.load(v_scale + pos * ss_n + h, mask=key_ok, other=0.0)[None, :]
        else:
            pv = p
        acc = acc * alpha[:, None] + tl.dot(pv.to(vb.dtype), vb, input_precision=PRECISION)
        m = m_new

    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    slot = (b * (GROUP * tl.num_programs(1)) + heads) * splits + s  # [B, Hq, splits]
    tl.store(part_out + slot[:, None] * D + dims[None, :], out, mask=row_ok[:, None])
    tl.store(part_lse + slot, lse, mask=row_ok)


@triton.jit
def _combine_kernel(part_out, part_lse, out, lse, n, o_row, o_part, l_row, l_part, s_out, s_lse,
                    D: tl.constexpr, N: tl.constexpr):
    """Merge n partial results per row: part i of row r is out `part_out[r*o_row + i*o_part :
    ... + D]`, lse `part_lse[r*l_row + i*l_part]`. Σ_i exp(lse_i - max) out_i / Σ_i exp(...)
    is merge.py's identity with the largest lse as the reference."""
    row = tl.program_id(0)
    idx = tl.arange(0, N)
    dims = tl.arange(0, D)
    ok = idx < n
    lses = tl.load(part_lse + row * l_row + idx * l_part, mask=ok, other=float("-inf"))
    top = tl.max(lses, 0)
    ref = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lses - ref)  # 0 for parts that saw no key
    total = tl.sum(w, 0)
    parts = tl.load(part_out + row * o_row + idx[:, None] * o_part + dims[None, :],
                    mask=ok[:, None], other=0.0)
    safe = tl.where(total > 0, total, 1.0)
    merged = tl.sum(parts * w[:, None], 0) / safe
    tl.store(out + row * s_out + dims, merged.to(out.dtype.element_ty))
    tl.store(lse + row * s_lse, tl.where(total > 0, ref + tl.log(safe), float("-inf")))


# Tuned on an H200 with benchmarks/decode_kernels.py: keys per block, warps, pipeline stages,
# and programs per SM the key ranges aim at.
BLOCK, WARPS, STAGES, WAVES = 32, 2, 3, 4
# The same on 8-bit pages: a tile of 128 keys reads as many bytes as bf16's 64. Swept on
# one H100 (decode_kernels.py --fp8-sweep): 389 us for one sequence of 400K keys against
# 516 us with the bf16 tiles (bf16 pages 568 us), 141 us for 32 of 4K (best 133). Widening to
# float16 instead of q's dtype (WIDEN_FP16) was no faster there.
QUANT_TILES = (128, 4, 3, 8)
WIDEN_FP16 = False


def decode_splits(batch: int, kv_heads: int, sms: int, waves: int | None = None,
                  quant: bool = False) -> int:
    """Key ranges per sequence: enough programs to give every SM `waves` of them."""
    if waves is None:
        waves = QUANT_TILES[3] if quant else WAVES
    return max(1, min(128, triton.cdiv(waves * sms, batch * kv_heads)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     tables: torch.Tensor, rows: torch.Tensor, lens: torch.Tensor,
                     block_size: int, scale: float, splits: int,
                     out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                     tiles: tuple[int, int, int] | None = None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, Hq, D]`; k_cache, v_cache `[N, Hkv, D]` (last dim contiguous), in pages of
    `block_size` slots; tables `[R, W]` (rows contiguous), rows and lens `[B]` integer
    tensors. Returns out `[B, Hq, D]` and lse `[B, Hq]`, written into `out` and
    `lse` when given (any dtype, rows of stride out.stride(1) and lse.stride(1): the caller
    may pass views into one packed buffer). float32 runs its products in full float32 (no
    TF32). `tiles` = (keys per block, warps, pipeline stages) overrides the tuned ones.
    k_scale, v_scale `[N, Hkv]` float32 (both or neither, the same strides): the caches are
    8-bit (fp8 or int8) and slot n of head h holds cache[n, h] * scale[n, h]."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("decode_attention needs the head dimension contiguous")
    if tables.stride(1) != 1:
        raise ValueError("decode_attention needs block-table rows contiguous")
    quant = k_scale is not None
    if quant and (v_scale is None or k_scale.stride() != v_scale.stride()
                  or k_scale.stride(1) != 1 or k_scale.dtype != torch.float32):
        raise ValueError("decode_attention needs k_scale and v_scale float32 [N, Hkv] alike")
    if quant and k_cache.element_size() != 1:
        raise ValueError("scales come with 8-bit caches")
    block, warps, stages = tiles or (QUANT_TILES[:3] if quant else (BLOCK, WARPS, STAGES))
    part_out = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((b, hq), dtype=torch.float32, device=q.device)
    _split_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, k_scale if quant else lens, v_scale if quant else lens, tables,
        rows, lens, part_out, part_lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), k_scale.stride(0) if quant else 0,
        tables.stride(0), splits,
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), D=d, BLOCK=block,
        PAGE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", QUANT=quant,
        WIDEN_FP16=quant and WIDEN_FP16 and q.dtype != torch.float32,
        num_warps=warps, num_stages=stages,
    )
    if out.stride(0) != hq * out.stride(1) or lse.stride(0) != hq * lse.stride(1):
        raise ValueError("out and lse rows must be evenly strided over (B, Hq)")
    _combine_kernel[(b * hq,)](part_out, part_lse, out, lse, splits, splits * d, d, splits, 1,
                               out.stride(1), lse.stride(1), D=d,
                               N=max(2, triton.next_power_of_2(splits)))
    return out, lse


def merge_packed(gathered: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the ranks' packed partial results: gathered `[P, B, H, D + 1]` float32 (out,
    then lse, per row) -> out `[B, H, D]` in `dtype`, lse `[B, H]` float32. One kernel."""
    p, b, h, d1 = gathered.shape
    d, rows = d1 - 1, b * h
    gathered = gathered.contiguous()
    out = torch.empty((b, h, d), dtype=dtype, device=gathered.device)
    lse = torch.empty((b, h), dtype=torch.float32, device=gathered.device)
    _combine_kernel[(rows,)](gathered, gathered[..., d], out, lse, p, d1, rows * d1, d1, rows * d1,
                             d, 1, D=d, N=max(2, triton.next_power_of_2(p)))
    return out, lse
