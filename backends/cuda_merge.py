"""A fused out/LSE merge for CUDA (Triton): one pass over the accumulator instead of the
five or six elementwise kernels of the portable merge. Same formula as
tr_engine/attention/merge.py; rows that saw no key on either side stay (0, -inf)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Row counts and the part's head and lse strides vary from call to call (every chunk length,
# prefix piece and kernel lays them out its own way): Triton is not to specialise on them,
# or a new length builds a variant on the request path.
@triton.jit(do_not_specialize=["n_rows", "heads", "l_t", "l_h"])
def _merge_kernel(acc, acc_lse, part, part_lse, n_rows, heads, p_t, p_h, l_t, l_h,
                  D: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    in_range = rows < n_rows
    t, h = rows // heads, rows % heads  # the part's row t, head h: read where they lie
    la = tl.load(acc_lse + rows, mask=in_range, other=float("-inf"))
    lb = tl.load(part_lse + t * l_t + h * l_h, mask=in_range, other=float("-inf"))
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    ea = tl.exp(la - m)
    eb = tl.exp(lb - m)
    s = ea + eb
    wa = tl.where(s > 0, ea / s, 0.0)
    wb = tl.where(s > 0, eb / s, 0.0)
    new_lse = tl.where(s > 0, m + tl.log(s), float("-inf"))
    cols = tl.arange(0, D)
    mask = in_range[:, None]
    a = tl.load(acc + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    b = tl.load(part + (t * p_t + h * p_h)[:, None] + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    tl.store(acc + rows[:, None] * D + cols[None, :], a * wa[:, None] + b * wb[:, None],
             mask=mask)
    tl.store(acc_lse + rows, new_lse, mask=in_range)


def fused_merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> None:
    """In place: out `[..., D]` float32 contiguous, lse `[...]` float32 contiguous. A part
    `[T, H, D]` with its head dimension contiguous (an attention kernel's output as it
    comes, heads and rows in any order) and its lse `[T, H]` are read where they lie;
    other parts are copied contiguous first."""
    d = out.shape[-1]
    if out_b.dim() == 3 and lse_b.dim() == 2 and out_b.stride(-1) == 1:
        heads = out_b.shape[1]
    else:
        out_b = out_b.contiguous().view(-1, 1, d)
        lse_b = lse_b.reshape(-1, 1)
        heads = 1
    if lse_b.dtype != torch.float32:
        lse_b = lse_b.float()
    n_rows = lse.numel()
    rows = max(1, 4096 // d)
    _merge_kernel[(triton.cdiv(n_rows, rows),)](
        out, lse, out_b, lse_b, n_rows, heads, out_b.stride(0), out_b.stride(1),
        lse_b.stride(0), lse_b.stride(1), D=d, ROWS=rows)
