"""The portable attention every backend is measured against: float32 math with an explicit
LSE. The CPU backend runs it; the start-up kernel self-check compares device kernels with it;
the CUDA and NPU backends fall back to it for shapes their kernels do not take."""

from __future__ import annotations

import torch

# Largest score block (elements) materialised at once; longer queries go in slices.
_SCORE_BLOCK = 1 << 24


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-style attention in float32 for [T, H, D] tensors (square causal only)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    kf = k.float().permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, Tk, D]
    vf = v.float().permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, Tk, D]
    out = torch.empty(tq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(tq, hq, dtype=torch.float32, device=q.device)
    step = max(1, _SCORE_BLOCK // max(1, tk * hq))
    for a in range(0, tq, step):
        b = min(tq, a + step)
        qf = q[a:b].float().reshape(b - a, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, g, t, D]
        s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [Hkv, g, t, Tk]
        if causal:
            rows = torch.arange(a, b, device=q.device).unsqueeze(1)
            cols = torch.arange(tk, device=q.device).unsqueeze(0)
            s.masked_fill_(cols > rows, float("-inf"))
        m = torch.logsumexp(s, dim=-1)  # [Hkv, g, t]
        o = torch.matmul(torch.exp(s - m.unsqueeze(-1)), vf)  # [Hkv, g, t, D]
        out[a:b] = o.permute(2, 0, 1, 3).reshape(b - a, hq, d).to(q.dtype)
        lse[a:b] = m.permute(2, 0, 1).reshape(b - a, hq)
    return out, lse
