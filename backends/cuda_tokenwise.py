"""Token-wise layers for CUDA (Triton), each one pass over its tensors: RMSNorm (optionally
after a residual add), SiLU-and-multiply of the fused gate/up projection, and RoPE.

They replace chains of small torch kernels with float32 round trips, and reproduce those torch
chains' rounding steps (tr_engine/layers: norm.py, mlp.py, rotary.py hold the definitions):
every value torch rounds to the model dtype is rounded here too, in the same order, and
float32 arithmetic is not contracted into FMAs (`enable_fp_fusion=False`), since torch runs
each step as its own kernel. What may still differ is the summation order of the RMSNorm mean.

No launch reads a tensor's values on the host or allocates by them, so all of them can be
captured in a CUDA graph.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_NORM_TILE = 2048  # elements a norm program covers when rows are narrow (q/k norm)
_SILU_BLOCK = 1024  # output columns per SiLU program
_ROPE_TILE = 1024  # elements of one half of the heads a RoPE program rotates


def _interpreted() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1, tests on the
    CPU). Read as the kernels are defined, which is when Triton reads it too."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if _interpreted():  # the interpreter has no libdevice; numpy's exp stands in

    @triton.jit
    def _exp(x):
        return tl.exp(x)

else:  # libdevice's expf is CUDA's expf, the one torch's silu calls; tl.exp is ex2.approx

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(x, res, w, out, summed, n_rows, n_inner, sxa, sxb, sra, srb, n_cols,
                     inv_n, eps, HAS_RES: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr):
    # Rows are (a, b) pairs of a [A, B, N] view with strides (sxa, sxb, 1); outputs are
    # contiguous [A * B, N].
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    a, b = rows // n_inner, rows % n_inner
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    v = tl.load(x + (a * sxa + b * sxb)[:, None] + cols[None, :], mask=mask, other=0.0)
    dst = rows[:, None] * n_cols + cols[None, :]
    if HAS_RES:
        r = tl.load(res + (a * sra + b * srb)[:, None] + cols[None, :], mask=mask, other=0.0)
        v = (v.to(tl.float32) + r.to(tl.float32)).to(summed.dtype.element_ty)
        tl.store(summed + dst, v, mask=mask)
    vf = v.to(tl.float32)
    # torch's CUDA mean is the sum times float(1/N)
    rstd = tl.math.rsqrt(tl.sum(vf * vf, axis=1) * inv_n + eps)  # [ROWS]
    y = (vf * rstd[:, None]).to(x.dtype.element_ty)  # rounded before the weight, as in torch
    wv = tl.load(w + cols, mask=cols < n_cols, other=0.0)
    o = wv[None, :].to(tl.float32) * y.to(tl.float32)
    tl.store(out + dst, o.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(gate_up, out, n_cols, stride, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    row = gate_up + t * stride
    g = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out.dtype.element_ty
    s = tl.math.div_rn(g, 1.0 + _exp(-g)).to(dtype)  # F.silu: float32, rounded to the dtype
    tl.store(out + t * n_cols + cols, (s.to(tl.float32) * u).to(dtype), mask=mask)


@triton.jit
def _rotate_heads(x, out, t, h0, n_heads, st, sh, c, s, d, d_mask, HALF: tl.constexpr,
                  HEADS: tl.constexpr):
    # Heads h0 .. h0 + HEADS of token t; c, s [BLOCK_D] float32 cos and sin of its position.
    h = h0 + tl.arange(0, HEADS)
    mask = (h < n_heads)[:, None] & d_mask[None, :]
    src = x + t * st + h[:, None] * sh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = out.dtype.element_ty
    # cos and sin in the dtype; each product and the sum rounded to it, as the torch code does
    c = c.to(dtype).to(tl.float32)[None, :]
    s = s.to(dtype).to(tl.float32)[None, :]
    o1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
    o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    dst = out + (t * n_heads + h[:, None]) * (2 * HALF) + d[None, :]
    tl.store(dst, o1.to(dtype), mask=mask)
    tl.store(dst + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(q, k, q_out, k_out, positions, cos, sin, s_pos, sqt, sqh, skt, skh,
                 n_q_heads, n_k_heads, q_blocks, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEADS: tl.constexpr):
    # Grid (T, q_blocks + k_blocks): one token, a block of HEADS heads of q or of k.
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    pos = tl.load(positions + t * s_pos)
    c = tl.load(cos + pos * HALF + d, mask=d_mask, other=0.0)
    s = tl.load(sin + pos * HALF + d, mask=d_mask, other=0.0)
    if hb < q_blocks:
        _rotate_heads(q, q_out, t, hb * HEADS, n_q_heads, sqt, sqh, c, s, d, d_mask, HALF,
                      HEADS)
    else:
        _rotate_heads(k, k_out, t, (hb - q_blocks) * HEADS, n_k_heads, skt, skh, c, s, d,
                      d_mask, HALF, HEADS)


@cache
def _inverse(n: int) -> float:
    """float32(1/n), correctly rounded (a float64 quotient rounded again could miss)."""
    return float(np.float32(1.0) / np.float32(n))


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """A [A, B, N] view of x [..., N] (a copy only if no such view exists)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    summed = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out, summed
    x3 = _as_3d(x)
    r3 = _as_3d(residual) if residual is not None else x3
    n_rows = x3.shape[0] * x3.shape[1]
    block = triton.next_power_of_2(n)
    rows = max(1, _NORM_TILE // block)  # by width only: a token count compiles nothing new
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x3, r3, weight, out, summed if summed is not None else out, n_rows, x3.shape[1],
        x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), n, _inverse(n), eps,
        HAS_RES=residual is not None, ROWS=rows, BLOCK=block,
        num_warps=min(16, max(1, rows * block // 512)), enable_fp_fusion=False,
    )
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)` over the last
    dimension. x [..., N] may be strided (last dimension contiguous); the result is contiguous."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to the dtype as torch's add
    rounds it and read once."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} does not match "
                         f"x {x.dtype} {tuple(x.shape)}")
    return _norm(x, residual, weight, eps)  # type: ignore[return-value]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] (gate's columns, then up's) -> [..., I]."""
    n = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    rows = gate_up.reshape(-1, 2 * n)  # [T, 2I]
    block = min(_SILU_BLOCK, triton.next_power_of_2(n))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](
        rows, out, n, rows.stride(0), BLOCK=block, num_warps=4, enable_fp_fusion=False,
    )
    return out


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (strided views allowed, last dimension
    contiguous) by their tokens' positions [T] (int64); cos, sin [max_pos, D/2] float32
    contiguous, half-split layout. Returns new contiguous q and k, in one launch."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    half = d // 2
    block_d = triton.next_power_of_2(half)
    heads = min(triton.next_power_of_2(max(hq, hkv)), max(1, _ROPE_TILE // block_d))
    q_blocks = triton.cdiv(hq, heads)
    _rope_kernel[(t, q_blocks + triton.cdiv(hkv, heads))](
        q, k, q_out, k_out, positions, cos, sin, positions.stride(0), q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), hq, hkv, q_blocks, HALF=half,
        BLOCK_D=block_d, HEADS=heads, num_warps=4, enable_fp_fusion=False,
    )
    return q_out, k_out
