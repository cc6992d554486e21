"""8-bit KV rows widened for attention, in one pass (Triton): rows of a pool layer, a run of
slots or a list of them, read as stored (fp8 or int8 `[N, H, D]` with float32 scales
`[N, H]`) and written in the model's dtype, each value the float32 product of the stored
value and its scale rounded once. The portable `dequantize` (tr_engine/kv/quant.py) gives
the same values in two passes of 16-bit traffic and a gather before them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# A prefix piece's first slot and length change with every request, and so does the slot
# list's offset: Triton is not to specialise on them (no variant built on the request path).
@triton.jit(do_not_specialize=["first", "n_rows"])
def _dequant_kernel(src, scale, out, slots, first, n_rows, H: tl.constexpr, D: tl.constexpr,
                    LISTED: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    head = tl.program_id(1)
    in_range = rows < n_rows
    if LISTED:
        slot = tl.load(slots + rows, mask=in_range, other=0).to(tl.int64)
    else:
        slot = (first + rows).to(tl.int64)
    cols = tl.arange(0, D)
    mask = in_range[:, None]
    s = tl.load(scale + slot * H + head, mask=in_range, other=0.0)
    x = tl.load(src + (slot * (H * D) + head * D)[:, None] + cols[None, :], mask=mask,
                other=0.0)
    y = x.to(tl.float32) * s[:, None]
    tl.store(out + (rows.to(tl.int64) * (H * D) + head * D)[:, None] + cols[None, :],
             y.to(out.dtype.element_ty), mask=mask)


def dequantize_rows(stored: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor | slice,
                    out: torch.Tensor) -> torch.Tensor:
    """`out[i] = stored[slots[i]] * scale[slots[i]]` for a pool layer `stored` `[N, H, D]`
    (contiguous), its scales `[N, H]` float32 (contiguous) and `slots` a slice (step 1) or
    an index tensor on the device; out `[n, H, D]` contiguous in the model's dtype."""
    n, h, d = out.shape
    if isinstance(slots, slice):
        first, listed, index = slots.start, False, scale  # `index` unread: any pointer
    else:
        first, listed, index = 0, True, slots
    if n == 0:
        return out
    rows = max(1, 8192 // d)
    _dequant_kernel[(triton.cdiv(n, rows), h)](
        stored, scale, out, index, first, n, H=h, D=d, LISTED=listed, ROWS=rows)
    return out
