"""The zigzag sequence layout.

A sequence of T tokens over P ranks is padded to a multiple of 2P (of 2P·align when the
chunks must be whole KV blocks of `align` tokens) and cut into 2P chunks of L tokens;
rank r holds chunk r followed by chunk 2P-1-r. Every rank then has the same
share of causal work (an early chunk needs little, a late one much). Pad tokens sit at
the global end, so no real token attends to one under a causal mask, and on every rank
the real tokens are a prefix of its local shard. The padding rule is in `padding`.
"""

from __future__ import annotations

import torch

from .padding import chunk_len, local_len, padded_len

__all__ = ["chunk_len", "local_len", "owner", "padded_len", "positions", "shard", "unshard"]


def positions(total: int, world_size: int, rank: int, align: int = 1) -> torch.Tensor:
    """Global positions held by `rank`, in local order (pads included). `[2L]` int64."""
    n = chunk_len(total, world_size, align)
    first = torch.arange(rank * n, (rank + 1) * n)
    second_start = (2 * world_size - 1 - rank) * n
    return torch.cat([first, torch.arange(second_start, second_start + n)])


def shard(x: torch.Tensor, world_size: int, rank: int, dim: int = 0, pad_value=0,
          align: int = 1) -> torch.Tensor:
    """Rank `rank`'s zigzag shard of `x` along `dim`, padded with `pad_value`."""
    total = x.shape[dim]
    pad = padded_len(total, world_size, align) - total
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_full(shape, pad_value)], dim=dim)
    idx = positions(total, world_size, rank, align).to(x.device)
    return x.index_select(dim, idx)


def unshard(shards: list[torch.Tensor], total: int, dim: int = 0) -> torch.Tensor:
    """Inverse of `shard`: put every rank's shard back in order and drop the padding."""
    n = shards[0].shape[dim] // 2
    firsts = [s.narrow(dim, 0, n) for s in shards]
    seconds = [s.narrow(dim, n, n) for s in shards]
    full = torch.cat(firsts + seconds[::-1], dim=dim)
    assert full.shape[dim] >= total
    return full.narrow(dim, 0, total)


def owner(total: int, world_size: int, position: int, align: int = 1) -> tuple[int, int]:
    """(rank, local index) of global `position`."""
    n = chunk_len(total, world_size, align)
    c = position // n
    if c < world_size:
        return c, position - c * n
    return 2 * world_size - 1 - c, n + position - c * n
