"""Decode attention for CUDA (Triton): a few query rows against a long KV shard.

A stock flash kernel gives one query row only (heads) blocks of work, far too few to fill a
GPU, and reads each key/value head once per query head of its group. Here every program
takes one KV head and one slice of the keys, attends all the query heads of that head's
group at once (so K and V are read once), and writes a partial (out, lse); the slices are
then merged by their LSE (tr_engine/attention/merge.py gives the identity).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(q, k, v, out, lse, n_keys, keys_per_split, scale,
                   stride_kt, stride_kh, stride_vt, stride_vh,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    head = tl.program_id(0)  # KV head
    split = tl.program_id(1)
    n_heads = tl.num_programs(0) * G
    rows = tl.arange(0, GP)  # query heads of this group (padded to GP)
    row_ok = rows < G
    cols = tl.arange(0, D)
    qh = head * G + rows
    qt = tl.load(q + qh[:, None] * D + cols[None, :], mask=row_ok[:, None], other=0.0)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    m = tl.full([GP], float("-inf"), tl.float32)
    s = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for t0 in range(start, end, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        t_ok = t < end
        kt = tl.load(k + t[:, None] * stride_kt + head * stride_kh + cols[None, :],
                     mask=t_ok[:, None], other=0.0)
        scores = tl.dot(qt, tl.trans(kt)) * scale  # [GP, BLOCK]
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        vt = tl.load(v + t[:, None] * stride_vt + head * stride_vh + cols[None, :],
                     mask=t_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    has = s > 0
    o = acc / tl.where(has, s, 1.0)[:, None]
    out_rows = split * n_heads + qh
    tl.store(out + out_rows[:, None] * D + cols[None, :], o, mask=row_ok[:, None])
    tl.store(lse + out_rows, tl.where(has, m + tl.log(tl.where(has, s, 1.0)), float("-inf")),
             mask=row_ok)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     splits: int | None = None, block: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[1, Hq, D]`, k/v `[N, Hkv, D]` (N > 0, last dim contiguous) -> out `[1, Hq, D]`
    in q's dtype, lse `[1, Hq]` float32."""
    from tr_engine.attention.merge import merge_all

    n, hkv, d = k.shape
    hq = q.shape[1]
    g = hq // hkv
    if splits is None:  # enough programs to fill the GPU, slices of at least a few blocks
        splits = max(1, min(256, triton.cdiv(n, 4 * block), 1024 // hkv))
    per_split = triton.cdiv(triton.cdiv(n, splits), block) * block
    splits = triton.cdiv(n, per_split)
    out = torch.empty(splits, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(splits, hq, dtype=torch.float32, device=q.device)
    _decode_kernel[(hkv, splits)](
        q.contiguous(), k, v, out, lse, n, per_split, scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BLOCK=block)
    merged, merged_lse = merge_all(out, lse)  # [Hq, D], [Hq]
    return merged.to(q.dtype).unsqueeze(0), merged_lse.unsqueeze(0)
