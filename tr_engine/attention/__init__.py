"""Sequence-parallel attention: strategies behind one signature, and their building blocks.

Every strategy is a pure function `(q, k, v, group=None, *, causal, scale, kv_len, k_prefix,
v_prefix) -> (out, lse)` over the rank's zigzag shard; see `tokenring_attention`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tr_engine.backends import backend_for

from .allgather import allgather_kv_attention, local_attention
from .common import communicator
from .cost import STRATEGIES, Rates, choose, estimate
from .merge import merge, merge_, merge_all
from .ring import ring_attention
from .tokenring import tokenring_attention

_FUNCTIONS = {
    "tokenring": tokenring_attention,
    "ring": ring_attention,
    "allgather_kv": allgather_kv_attention,
    "local": local_attention,
}


def get_strategy(name: str):
    """The strategy function for a concrete name (not `auto`)."""
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention strategy {name!r}; choose one of auto, {', '.join(STRATEGIES)}"
        ) from None


def sharded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    strategy: str = "auto",
    causal: bool = True,
    scale: float | None = None,
    kv_len: int | None = None,
    k_prefix: torch.Tensor | None = None,
    v_prefix: torch.Tensor | None = None,
    rates: Rates | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `strategy` ("auto" asks the cost model; every rank reaches the same choice)."""
    if strategy == "auto":
        comm = communicator(group)
        cached = 0
        if k_prefix is not None and comm.world_size > 1:
            # Prefix slices differ by rank; agree on one number so every rank picks alike.
            n_pre = torch.tensor([k_prefix.shape[0]], dtype=torch.int64, device=q.device)
            cached = int(comm.all_reduce_max(n_pre).item()) * comm.world_size
        elif k_prefix is not None:
            cached = k_prefix.shape[0]
        strategy = choose(
            new=q.shape[0] * comm.world_size, cached=cached, world=comm.world_size,
            hq=q.shape[1], hkv=k.shape[1], d=q.shape[2], elem=q.element_size(), rates=rates,
        )
    return get_strategy(strategy)(
        q, k, v, group, causal=causal, scale=scale, kv_len=kv_len, k_prefix=k_prefix,
        v_prefix=v_prefix,
    )


def gather_merge(
    packed: torch.Tensor, dtype: torch.dtype, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode-style combine: every rank holds a partial result for the same queries (its
    slice of the keys), out and lse packed as one float32 tensor `[..., D + 1]` so they
    travel in one collective; one all-gather and the N-way merge give every rank the same
    (out `[..., D]` in `dtype`, lse)."""
    comm = communicator(group)
    gathered = comm.all_gather(packed)  # [P, ..., D + 1]
    return backend_for(packed.device).merge_gathered(gathered, dtype)


__all__ = [
    "STRATEGIES",
    "Rates",
    "allgather_kv_attention",
    "choose",
    "estimate",
    "gather_merge",
    "get_strategy",
    "local_attention",
    "merge",
    "merge_",
    "merge_all",
    "ring_attention",
    "sharded_attention",
    "tokenring_attention",
]
