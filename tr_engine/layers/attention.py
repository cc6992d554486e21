"""The attention layer the models hold: it forwards to the step's context.

Parallel attention is plugged in from outside: the model computes q, k, v (RoPE applied, in
global positions) and calls this layer; the context decides how the sequence is sharded,
which strategy runs, and where k and v are cached.
"""

from __future__ import annotations

import torch
from torch import nn

from tr_engine.layers.context import current


class Attention(nn.Module):
    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of "
                             f"{num_kv_heads} key/value heads")
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]
        ctx = current()
        ctx.before_layer(self.layer)  # the KV this layer reads is in its pages
        return ctx.attention(self.layer, q, k, v, self.scale)
