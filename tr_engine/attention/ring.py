"""Ring attention, pass-KV: keys and values travel, queries and results stay home.

Rank r holds zigzag chunks r and 2P-1-r. At step s it holds the keys of owner
i = (r - s) mod P (they move r -> r+1 each step, overlapped with compute) and attends:
  i < r: all local queries against i's first chunk;
  i > r: only the local second chunk against all of i's keys.
Every step is a 2L x L block, as in TokenRing; the difference is what moves: 4L·Hkv·D
elements one way per step, against ~2L·Hq·D each way for TokenRing. With a cached prefix,
each rank's slice of the cache travels with its keys, which is what makes pass-KV costly
for a few new tokens after a long context.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tr_engine.backends import backend_for

from .common import check_and_prepare, communicator, shard_sizes


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    kv_len: int | None = None,
    k_prefix: torch.Tensor | None = None,
    v_prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `tokenring_attention`; keys and values travel instead of queries."""
    comm = communicator(group)
    world, rank = comm.world_size, comm.rank
    kv, scale = check_and_prepare(q, k, v, world, causal, scale, kv_len, k_prefix, v_prefix)
    backend = backend_for(q.device)
    attend = backend.attention
    if world == 1:
        return attend(q, kv.k_all, kv.v_all, causal, scale)
    half = q.shape[0] // 2

    sizes = shard_sizes(comm, kv, q.device)

    def rows_for(owner: int, at: int) -> int:
        """How many of owner's key rows rank `at` needs: its prefix plus chunk(s)."""
        n_pre, n_own = sizes[owner]
        return n_pre + (half if causal and owner < at else n_own)

    def rows_from(owner: int, at: int) -> int:
        """Rows of owner's keys that `at` and every later rank on their way round need.
        (After the wrap past rank 0 the receivers need the whole shard again.)"""
        need, y = 0, at
        while y != owner:
            need = max(need, rows_for(owner, y))
            y = (y + 1) % world
        return need

    acc_out = acc_lse = None
    kk, vv = kv.k_all, kv.v_all  # owner (rank - s) % P at step s
    to_next, from_prev = comm.peer(1), comm.peer(-1)
    for s in range(world):
        owner = (rank - s) % world
        handle, nk, nv = None, None, None
        if s < world - 1:
            send_rows = rows_from(owner, to_next)
            recv_rows = rows_from((rank - s - 1) % world, rank)
            nk = kk.new_empty((recv_rows, *kk.shape[1:]))
            nv = vv.new_empty((recv_rows, *vv.shape[1:]))
            handle = comm.exchange(
                [(kk[:send_rows], to_next), (vv[:send_rows], to_next)],
                [(nk, from_prev), (nv, from_prev)],
            )
        n_pre = sizes[owner][0]
        if s == 0:
            out, lse = attend(q, kk, vv, causal, scale)
            acc_out = out.to(torch.float32, memory_format=torch.contiguous_format)
            acc_lse = lse.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        elif not causal or owner < rank:
            m = rows_for(owner, rank)  # kk may carry rows that later ranks need, not this one
            backend.merge_(acc_out, acc_lse, *attend(q, kk[:m], vv[:m], False, scale))
        else:  # owner > rank: the second local chunk sees everything, the first the prefix
            if n_pre:
                o, lse = attend(q[:half], kk[:n_pre], vv[:n_pre], False, scale)
                backend.merge_(acc_out[:half], acc_lse[:half], o, lse)
            o, lse = attend(q[half:], kk, vv, False, scale)
            backend.merge_(acc_out[half:], acc_lse[half:], o, lse)
        if handle is not None:
            handle.wait()
            kk, vv = nk, nv
    return acc_out.to(q.dtype), acc_lse
