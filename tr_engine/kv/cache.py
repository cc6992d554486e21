"""The KV pool on one rank: K (after RoPE) and V of the tokens this rank owns, in pages.

One tensor per K and V, `[layers, pages·block_size + 1, Hkv, D]`: page p holds slots
[p·B, (p+1)·B). Which pages a sequence uses is decided on rank 0 (kv.block_manager) and arrives
in the step plans as block-table updates; this rank keeps the tables (`BlockTables`) and
turns them into slots. One spare slot after the last page holds what a rank has no use
for: decode writes every new token's K/V on every rank, and the ranks that do not keep it
write here.
"""

from __future__ import annotations

import torch

from ..plan import TableOp


class KVCache:
    def __init__(self, layers: int, num_pages: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        capacity = num_pages * block_size
        shape = (layers, capacity + 1, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity, self.block_size = capacity, block_size
        self.spare = capacity  # the spare slot's index

    def tensors(self) -> list[torch.Tensor]:
        """Every pooled tensor, each `[layers, capacity + 1, ...]`: slots [p·B, (p+1)·B) of
        each are page p's. What moves a page (the host tier) moves all of them."""
        return [self.k, self.v]

    def page_bytes(self) -> int:
        """Bytes of one page, over every pooled tensor."""
        return sum(t[:, : self.block_size].numel() * t.element_size() for t in self.tensors())

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole pool of one layer, `[capacity + 1, Hkv, D]` each."""
        return self.k[layer], self.v[layer]

    def gather(self, layer: int, slots: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots` (an index tensor, or a slice when they are one run)."""
        if isinstance(slots, slice):
            return self.k[layer, slots], self.v[layer, slots]
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)

    def store(self, layer: int, slots: torch.Tensor | slice, k: torch.Tensor,
              v: torch.Tensor) -> None:
        if isinstance(slots, slice):
            self.k[layer, slots] = k
            self.v[layer, slots] = v
        else:
            self.k[layer].index_copy_(0, slots, k)
            self.v[layer].index_copy_(0, slots, v)


class BlockTables:
    """This rank's block tables: row i lists the pages of one running sequence on this rank,
    in position order. Kept on the host (to make slot lists) and on the device as
    `[rows, width]` int32 (the decode kernel reads it there, so graphs replay any step)."""

    def __init__(self, rows: int, width: int, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.host: list[list[int]] = [[] for _ in range(rows)]
        self.device = torch.zeros((rows, width), dtype=torch.int32, device=device)

    def apply(self, op: TableOp) -> None:
        row = self.host[op.row]
        del row[op.at :]
        row.extend(op.pages)
        if op.pages:
            pages = torch.tensor(op.pages, dtype=torch.int32)
            self.device[op.row, op.at : op.at + len(op.pages)].copy_(pages, non_blocking=True)

    def slots(self, row: int, start: int, n: int) -> torch.Tensor | slice:
        """Slots of keys start .. start+n-1 of `row`: a slice when they are one run of
        consecutive pages (a view instead of a gather), else an int64 index tensor (host)."""
        b = self.block_size
        if n == 0:
            return slice(0, 0)
        first, last = start // b, (start + n - 1) // b
        pages = self.host[row][first : last + 1]
        lo = pages[0] * b + start % b
        if pages[-1] - pages[0] == len(pages) - 1 and all(
                y == x + 1 for x, y in zip(pages, pages[1:])):
            return slice(lo, lo + n)
        idx = torch.arange(start, start + n)
        table = torch.tensor(pages, dtype=torch.int64)
        return table[idx // b - first] * b + idx % b
