"""What every strategy needs: the rank's keys as blocks, and argument checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tr_engine.backends import Communicator


def communicator(group: dist.ProcessGroup | None) -> Communicator:
    """A communicator over `group` (None = the default group, or a lone process). Cheap:
    it reads the group's rank and size."""
    return Communicator(group)


@dataclass
class LocalKV:
    """The keys/values a rank attends with, as contiguous blocks.

    `all` = the cached prefix followed by the rank's valid shard keys; `first` = the prefix
    followed by the first zigzag chunk only (what later chunks of the sequence see of this
    rank under a causal mask). `n_prefix` rows of each come from the cache.
    """

    k_all: torch.Tensor
    v_all: torch.Tensor
    n_prefix: int
    half: int  # L: the length of one zigzag chunk

    @property
    def k_first(self) -> torch.Tensor:
        return self.k_all[: self.n_prefix + self.half]

    @property
    def v_first(self) -> torch.Tensor:
        return self.v_all[: self.n_prefix + self.half]

    @property
    def k_prefix(self) -> torch.Tensor:
        return self.k_all[: self.n_prefix]

    @property
    def v_prefix(self) -> torch.Tensor:
        return self.v_all[: self.n_prefix]


def check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    world_size: int,
    causal: bool,
    scale: float | None,
    kv_len: int | None,
    k_prefix: torch.Tensor | None,
    v_prefix: torch.Tensor | None,
) -> tuple[int, float]:
    """Validate shapes; returns how many of the rank's own keys are valid, and the softmax
    scale."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q, k, v as [T, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    n, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"k and v must be [{n}, Hkv, {d}]; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads "
                         f"({k.shape[1]})")
    if causal and world_size > 1 and n % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks; got {n} local tokens")
    if (k_prefix is None) != (v_prefix is None):
        raise ValueError("pass both k_prefix and v_prefix, or neither")
    if kv_len is not None and not 0 <= kv_len <= n:
        raise ValueError(f"kv_len must lie in [0, {n}]; got {kv_len}")
    return (n if kv_len is None or causal else kv_len), scale or 1.0 / math.sqrt(d)


def check_and_prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    world_size: int,
    causal: bool,
    scale: float | None,
    kv_len: int | None,
    k_prefix: torch.Tensor | None,
    v_prefix: torch.Tensor | None,
) -> tuple[LocalKV, float]:
    """Validate shapes and build the rank's LocalKV; returns it and the softmax scale."""
    valid, scale = check(q, k, v, world_size, causal, scale, kv_len, k_prefix, v_prefix)
    if k_prefix is not None and k_prefix.shape[0] > 0:
        k_all = torch.cat([k_prefix.to(k.dtype), k[:valid]])
        v_all = torch.cat([v_prefix.to(v.dtype), v[:valid]])
        n_prefix = k_prefix.shape[0]
    else:
        k_all, v_all, n_prefix = k[:valid].contiguous(), v[:valid].contiguous(), 0
    return LocalKV(k_all, v_all, n_prefix, q.shape[0] // 2), scale


def shard_sizes(comm: Communicator, kv: LocalKV, device: torch.device) -> list[list[int]]:
    """Every rank's [prefix rows, own key rows]: prefixes and padding may differ by rank,
    and a rank must know what it will receive before it posts the receive."""
    mine = torch.tensor([kv.n_prefix, kv.k_all.shape[0] - kv.n_prefix], dtype=torch.int64)
    return comm.all_gather(mine.to(device)).tolist()
