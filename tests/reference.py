"""Independent references: float64 attention on one process."""

from __future__ import annotations

import torch


def attention64(q, k, v, *, causal=True, q_offset=0, scale=None, kv_valid=None):
    """Full attention in float64. q `[Tq, Hq, D]` are positions q_offset.. of the sequence
    whose keys are k, v `[Tk, Hkv, D]`; causal masks keys after the query's position.
    kv_valid limits the keys to the first kv_valid. Returns (out, lse) float64."""
    q, k, v = q.double(), k.double(), v.double()
    if kv_valid is not None:
        k, v = k[:kv_valid], v[:kv_valid]
    tq, hq, d = q.shape
    g = hq // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scale = scale or d**-0.5
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        qpos = torch.arange(tq, device=q.device).unsqueeze(1) + q_offset
        kpos = torch.arange(k.shape[0], device=q.device).unsqueeze(0)
        s = s.masked_fill(kpos > qpos, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, Tq]
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse.transpose(0, 1)
