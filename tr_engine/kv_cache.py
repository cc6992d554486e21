"""The KV pool on one rank: K (after RoPE) and V of the tokens this rank owns.

One tensor per K and V, `[layers, capacity, Hkv, D]`. Where each sequence's slab lies is
decided on rank 0 (kv_accounting) and arrives in the step plan; this class only stores and
hands out views. A slab is contiguous, so decode attends to it without gathering. One spare
slot after the last holds what a rank has no use for: decode writes every new token's K/V
on every rank, and the ranks that do not keep it write here.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, capacity + 1, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.spare = capacity  # the spare slot's index

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def view(self, layer: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, start : start + n], self.v[layer, start : start + n]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole pool of one layer, `[capacity + 1, Hkv, D]` each."""
        return self.k[layer], self.v[layer]

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[0]
        self.k[layer, start : start + n] = k
        self.v[layer, start : start + n] = v
