"""The KV pool on one rank: K (after RoPE) and V of the tokens this rank owns, in pages.

One tensor per K and V, `[layers, pages·block_size + 1, Hkv, D]`: page p holds slots
[p·B, (p+1)·B). Which pages a sequence uses is decided on rank 0 (kv.block_manager) and arrives
in the step plans as block-table updates; this rank keeps the tables (`BlockTables`) and
turns them into slots. One spare slot after the last page holds what a rank has no use
for: decode writes every new token's K/V on every rank, and the ranks that do not keep it
write here.

A quantized cache (`kv_cache_dtype` fp8/int8, kv/quant.py) stores K and V in 8 bits and one
float32 scale per slot and KV head beside them, `[layers, pages·block_size + 1, Hkv]` each.
`tensors()` lists every pooled tensor, each indexed by slot on dimension 1, so whatever
moves a page (a copy to host memory and back) moves its scales with it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..plan import TableOp
from .quant import SCALE_DTYPE, KVFormat, dequantize, kv_format, quantize


class LayerKV(NamedTuple):
    """One layer's whole pool, `[capacity + 1, Hkv, D]` each; the scales `[capacity + 1,
    Hkv]` float32 where the pages are quantized, else None."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


class KVCache:
    def __init__(self, layers: int, num_pages: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 fmt: KVFormat | None = None) -> None:
        self.format = fmt or kv_format("auto")
        self.dtype = dtype  # what gather gives back and store takes
        capacity = num_pages * block_size
        shape = (layers, capacity + 1, kv_heads, head_dim)
        storage = self.format.storage or dtype
        self.k = torch.empty(shape, dtype=storage, device=device)
        self.v = torch.empty(shape, dtype=storage, device=device)
        self.k_scale = self.v_scale = None
        if self.format.quantized:
            # the spare slot's scales too: decode reads what the kernel masks as 0 x scale
            self.k_scale = torch.ones(shape[:3], dtype=SCALE_DTYPE, device=device)
            self.v_scale = torch.ones(shape[:3], dtype=SCALE_DTYPE, device=device)
        self.capacity, self.block_size = capacity, block_size
        self.spare = capacity  # the spare slot's index

    def page_bytes(self) -> int:
        """Bytes of one page, over every pooled tensor."""
        return sum(t[:, : self.block_size].numel() * t.element_size() for t in self.tensors())

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                        fmt: KVFormat | None = None) -> tuple[int, int]:
        """(K and V bytes, scale bytes) one token takes in the pool, all layers."""
        fmt = fmt or kv_format("auto")
        kv = 2 * layers * kv_heads * head_dim * (fmt.storage or dtype).itemsize
        scales = 2 * layers * kv_heads * SCALE_DTYPE.itemsize if fmt.quantized else 0
        return kv, scales

    def tensors(self) -> list[torch.Tensor]:
        """Every pooled tensor (K, V, then their scales where quantized), each
        `[layers, capacity + 1, ...]`: slots [p·B, (p+1)·B) of each are page p's. What moves
        a page (the host tier) moves all of them."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def layer(self, layer: int) -> LayerKV:
        """The whole pool of one layer, as stored."""
        if self.k_scale is None:
            return LayerKV(self.k[layer], self.v[layer], None, None)
        return LayerKV(self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer])

    def gather(self, layer: int, slots: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots` (an index tensor, or a slice when they are one run), in the
        model's dtype (dequantized where the pages are 8-bit)."""
        pool = self.layer(layer)
        if isinstance(slots, slice):
            k, v, ks, vs = (None if t is None else t[slots] for t in pool)
        else:
            k, v, ks, vs = (None if t is None else _index_select(t, slots) for t in pool)
        if ks is None:
            return k, v
        return dequantize(k, ks, self.dtype), dequantize(v, vs, self.dtype)

    def store(self, layer: int, slots: torch.Tensor | slice, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write K and V `[n, Hkv, D]` of n tokens to `slots`, quantized where the pages are
        8-bit (scales per token and head, worked out here)."""
        values = [k, v]
        if self.format.quantized:
            (kq, ks), (vq, vs) = quantize(k, self.format), quantize(v, self.format)
            values = [kq, vq, ks, vs]
        for pool, x in zip(self.tensors(), values):
            if isinstance(slots, slice):
                pool[layer, slots] = x
            else:
                _bytes(pool[layer]).index_copy_(0, slots, _bytes(x))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as bytes: indexed copies are not built for float8 dtypes (a byte is a
    byte either way)."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def _index_select(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return _bytes(t).index_select(0, slots).view(t.dtype)


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
