"""TokenRing attention (Wang et al., arXiv 2412.20501): queries travel, results come home.

Rank r holds the zigzag shard of the sequence: chunks r and 2P-1-r of L tokens each.

- Step 0: causal attention of the local queries over the local keys (and the cached prefix,
  unmasked). A plain causal mask over the concatenation is exact: chunk r precedes 2P-1-r.
- Step s = 1..P-1: rank r attends the queries of owner j = (r + s) mod P:
  j > r: all of Q_j against the first local chunk (both of j's chunks come after chunk r,
         and neither reaches chunk 2P-1-r);
  j < r: only Q_j's second chunk 2P-1-j, against all local keys (chunk j sees nothing here).
  Both are 2L x L blocks, so every rank does the same work each step.
- Q_j moves one hop per step, r+1 -> r, carrying only the rows the receiver needs. The
  partial (out, lse) of step s goes straight back to owner j, the other way round the ring,
  while step s+1 computes, and is merged there. So both directions of each link carry data.
  The last step computes its rows in pieces, each sending its results while the next
  computes, so only the last piece's transfer is left uncovered.

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

    def remote(q_j: torch.Tensor, owner: int, lo: int, hi: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows lo:hi of owner's partial result here (q_j: the rows this rank received)."""
        rows = q_j[lo:hi]
        if not causal or owner > rank or not has_prefix:
            # j > r: every row sees the first local chunk (and the prefix); j < r without a
            # prefix: q_j is only the second chunk, which sees all local keys
            k, v = (kv.k_first, kv.v_first) if causal and owner > rank else (kv.k_all, kv.v_all)
            return attend(rows, k, v, False, scale)
        # j < r with a prefix: the first chunk sees only the prefix, the second everything
        parts = []
        if lo < half:
            parts.append(attend(q_j[lo : min(hi, half)], kv.k_prefix, kv.v_prefix, False, scale))
        if hi > half:
            parts.append(attend(q_j[max(lo, half) : hi], kv.k_all, kv.v_all, False, scale))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    if world == 1:
        return attend(q, kv.k_all, kv.v_all, causal, scale)

    to_prev, from_next = comm.peer(-1), comm.peer(1)
    q_cur = q.contiguous()  # the queries of owner (rank + s) % P at step s
    acc_out = acc_lse = None
    pending = None  # (out, lse, owner) computed at the previous step for another rank
    for s in range(world - 1):
        owner = (rank + s) % world
        # The previous rank works on the same owner's queries at step s + 1.
        part = q_cur if whole(owner, to_prev) else q_cur[q_cur.shape[0] - half :]
        rows = n if whole((rank + s + 1) % world, rank) else half
        q_next = q.new_empty((rows, *q.shape[1:]))
        sends, recvs = [(part, to_prev)], [(q_next, from_next)]
        result = None
        if pending is not None:
            sends += [(pending[0], pending[2]), (pending[1], pending[2])]
            result = _result_buffers(q, rank, s - 1, world, n, half, whole)
            recvs += [(result[0], result[2]), (result[1], result[2])]
        handle = comm.exchange(sends, recvs)

        if s == 0:
            out, lse = attend(q_cur, kv.k_all, kv.v_all, causal, scale)
            acc_out = out.to(torch.float32, memory_format=torch.contiguous_format)
            acc_lse = lse.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        else:
            out, lse = remote(q_cur, owner, 0, q_cur.shape[0])
            pending = (out.contiguous(), lse.contiguous(), owner)

        handle.wait()
        if result is not None:
            _fold(backend, acc_out, acc_lse, result[0], result[1], n - result[0].shape[0])
        q_cur = q_next

    # The last step runs in pieces of its rows, so each piece's results travel home while
    # the next one computes; only the last piece's transfer is left in the open.
    s, owner = world - 1, (rank + world - 1) % world
    early = None
    if pending is not None:  # the previous step's results
        early = _result_buffers(q, rank, s - 1, world, n, half, whole)
        h_early = comm.exchange([(pending[0], pending[2]), (pending[1], pending[2])],
                                [(early[0], early[2]), (early[1], early[2])])
    mine = _result_buffers(q, rank, s, world, n, half, whole)  # my rows, computed elsewhere
    theirs, mine_rows = q_cur.shape[0], mine[0].shape[0]
    pieces = _pieces(n)  # from n, which every rank shares
    cuts = [theirs * i // pieces for i in range(pieces + 1)]
    my_cuts = [mine_rows * i // pieces for i in range(pieces + 1)]
    handles = []
    for i in range(pieces):
        out, lse = remote(q_cur, owner, cuts[i], cuts[i + 1])
        a, b = my_cuts[i], my_cuts[i + 1]
        handles.append(comm.exchange(
            [(out.contiguous(), owner), (lse.contiguous(), owner)],
            [(mine[0][a:b], mine[2]), (mine[1][a:b], mine[2])]))
        if early is not None:
            h_early.wait()
            _fold(backend, acc_out, acc_lse, early[0], early[1], n - early[0].shape[0])
            early = None
    start = n - mine_rows
    for i, handle in enumerate(handles):
        handle.wait()
        a, b = my_cuts[i], my_cuts[i + 1]
        _fold(backend, acc_out, acc_lse, mine[0][a:b], mine[1][a:b], start + a)
    return acc_out.to(q.dtype), acc_lse


PIECES_FROM = 8192  # shard length from which the last step is cut in four


def _pieces(n: int) -> int:
    """Pieces the last step is cut into: each sends its results while the next computes, so
    only the last piece's transfer is left uncovered; pieces stay big enough to run well.
    Every rank reaches the same number (the sender's and receiver's row counts agree)."""
    return 4 if n >= PIECES_FROM else 2


def _result_buffers(q, rank, step, world, n, half, whole):
    """Buffers for the partial result of this rank's queries computed at `step` elsewhere."""
    src = (rank - step) % world
    rows = n if whole(rank, src) else half
    out = q.new_empty((rows, *q.shape[1:]))
    lse = torch.empty((rows, q.shape[1]), dtype=torch.float32, device=q.device)
    return out, lse, src


def _fold(backend, acc_out, acc_lse, out_b, lse_b, start: int) -> None:
    """Merge a partial result for rows start:start + rows(out_b) of the accumulator."""
    end = start + out_b.shape[0]
    backend.merge_(acc_out[start:end], acc_lse[start:end], out_b, lse_b)


__all__ = ["tokenring_attention", "LocalKV"]
