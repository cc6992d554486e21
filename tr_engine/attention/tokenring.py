"""TokenRing attention (Wang et al., arXiv 2412.20501): queries travel, results come home.

Rank r holds the zigzag shard of the sequence: chunks r and 2P-1-r of L tokens each.

- Step 0: causal attention of the local queries over the local keys (and the cached prefix,
  unmasked). A plain causal mask over the concatenation is exact: chunk r precedes 2P-1-r.
  It runs in two parts: chunk r's rows before the ring steps, chunk 2P-1-r's rows after
  them, so the first queries and the last results both travel while something computes.
- Step s = 1..P-1: rank r attends the queries of owner j = (r + s) mod P:
  j > r: all of Q_j against the first local chunk (both of j's chunks come after chunk r,
         and neither reaches chunk 2P-1-r);
  j < r: only Q_j's second chunk 2P-1-j, against all local keys (chunk j sees nothing here).
  Both are 2L x L blocks, so every rank does the same work each step.
- Q_j moves one hop per step, r+1 -> r, carrying only the rows the receiver needs. The
  partial (out, lse) of step s goes straight back to owner j, the other way round the ring,
  while step s+1 computes, and is merged there. So both directions of each link carry data.

Partial prefill (new tokens after a cached prefix) is the case that favours passing Q: every
rank's slice of the cache is attended by every query without a mask, so nothing of the cache
moves; only the new tokens' queries do (then always whole, since every row needs the cache).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tr_engine.backends import backend_for

from .common import LocalKV, check_and_prepare, communicator


def tokenring_attention(
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
    """Attention of the rank's zigzag shard of queries over the whole sharded sequence.

    q `[T_local, Hq, D]`, k and v `[T_local, Hkv, D]`: chunks r and 2P-1-r of a sequence
    cut into 2P equal chunks. Returns out `[T_local, Hq, D]` in q's dtype and lse
    `[T_local, Hq]` float32, equal to full-sequence attention restricted to this rank's rows.

    causal=False gives bidirectional attention over any equal split; `kv_len` then says how
    many leading local keys are real (the rest padding). `k_prefix`/`v_prefix` `[C_r, Hkv, D]`
    are this rank's share of an earlier, cached part of the sequence, seen by every query;
    pass them on every rank or on none (an empty tensor is fine).
    """
    comm = communicator(group)
    world, rank = comm.world_size, comm.rank
    kv, scale = check_and_prepare(q, k, v, world, causal, scale, kv_len, k_prefix, v_prefix)
    backend = backend_for(q.device)
    attend = backend.attention
    n, half = q.shape[0], q.shape[0] // 2
    has_prefix = k_prefix is not None

    def whole(owner: int, at: int) -> bool:
        """Does rank `at` need every row of owner's queries (or only the second chunk)?"""
        return not causal or has_prefix or owner > at

    def remote(q_j: torch.Tensor, owner: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not causal:
            return attend(q_j, kv.k_all, kv.v_all, False, scale)
        if owner > rank:
            return attend(q_j, kv.k_first, kv.v_first, False, scale)
        if not has_prefix:  # q_j is only the second chunk
            return attend(q_j, kv.k_all, kv.v_all, False, scale)
        o1, l1 = attend(q_j[:half], kv.k_prefix, kv.v_prefix, False, scale)
        o2, l2 = attend(q_j[half:], kv.k_all, kv.v_all, False, scale)
        return torch.cat([o1, o2]), torch.cat([l1, l2])

    if world == 1:
        return attend(q, kv.k_all, kv.v_all, causal, scale)

    to_prev, from_next = comm.peer(-1), comm.peer(1)
    # The local block is cut in two: the first chunk's rows run first (hiding the first Q
    # transfer), the second chunk's rows last (hiding the last results on their way home).
    h = n // 2
    acc_out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    acc_lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    acc_out[h:].zero_()
    acc_lse[h:].fill_(float("-inf"))
    q_cur = q.contiguous()  # the queries of owner (rank + s) % P at step s
    pending = None  # (out, lse, owner) computed at the previous step for another rank
    for s in range(world):
        owner = (rank + s) % world
        sends, recvs = [], []
        q_next = None
        if s < world - 1:
            # The previous rank works on the same owner's queries at step s + 1.
            part = q_cur if whole(owner, to_prev) else q_cur[q_cur.shape[0] - half :]
            sends.append((part, to_prev))
            rows = n if whole((rank + s + 1) % world, rank) else half
            q_next = q.new_empty((rows, *q.shape[1:]))
            recvs.append((q_next, from_next))
        result = None
        if pending is not None:
            sends += [(pending[0], pending[2]), (pending[1], pending[2])]
            result = _result_buffers(q, rank, s - 1, world, n, half, whole)
            recvs += [(result[0], result[2]), (result[1], result[2])]
        handle = comm.exchange(sends, recvs)

        if s == 0:
            k_a, v_a = (kv.k_first, kv.v_first) if causal else (kv.k_all, kv.v_all)
            out, lse = attend(q[:h], k_a, v_a, causal, scale)
            acc_out[:h] = out
            acc_lse[:h] = lse
        else:
            out, lse = remote(q_cur, owner)
            pending = (out.contiguous(), lse.contiguous(), owner)

        handle.wait()
        if result is not None:
            _fold(backend, acc_out, acc_lse, result[0], result[1])
        q_cur = q_next

    result = _result_buffers(q, rank, world - 1, world, n, half, whole)
    handle = comm.exchange(
        [(pending[0], pending[2]), (pending[1], pending[2])],
        [(result[0], result[2]), (result[1], result[2])],
    )
    out, lse = attend(q[h:], kv.k_all, kv.v_all, causal, scale)
    backend.merge_(acc_out[h:], acc_lse[h:], out, lse)
    handle.wait()
    _fold(backend, acc_out, acc_lse, result[0], result[1])
    return acc_out.to(q.dtype), acc_lse


def _result_buffers(q, rank, step, world, n, half, whole):
    """Buffers for the partial result of this rank's queries computed at `step` elsewhere."""
    src = (rank - step) % world
    rows = n if whole(rank, src) else half
    out = q.new_empty((rows, *q.shape[1:]))
    lse = torch.empty((rows, q.shape[1]), dtype=torch.float32, device=q.device)
    return out, lse, src


def _fold(backend, acc_out, acc_lse, out_b, lse_b) -> None:
    """Merge a partial result for the last rows(out_b) rows of the accumulator."""
    rows = out_b.shape[0]
    start = acc_out.shape[0] - rows
    backend.merge_(acc_out[start:], acc_lse[start:], out_b, lse_b)


__all__ = ["tokenring_attention", "LocalKV"]
