"""Two simple strategies: gather every key first (`allgather_kv`), or none (`local`).

`allgather_kv` moves (P-1)/P of all keys to every rank before any compute, with nothing to
hide it behind; it wins only when the keys are few (short prompts, many KV heads shared).
`local` is attention on one rank: the P = 1 case, with no communication at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tr_engine.backends import backend_for

from .common import check, check_and_prepare, communicator, shard_sizes


def allgather_kv_attention(
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
    """Same contract as `tokenring_attention`; all keys are gathered, then one local pass."""
    comm = communicator(group)
    world, rank = comm.world_size, comm.rank
    kv, scale = check_and_prepare(q, k, v, world, causal, scale, kv_len, k_prefix, v_prefix)
    attend = backend_for(q.device).attention
    if world == 1:
        return attend(q, kv.k_all, kv.v_all, causal, scale)

    sizes = shard_sizes(comm, kv, q.device)
    longest = max(a + b for a, b in sizes)

    def gather(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        stacked = comm.all_gather(padded)  # [P, longest, Hkv, D]
        return [(t[:a], t[a : a + b]) for t, (a, b) in zip(stacked, sizes)]

    ks, vs = gather(kv.k_all), gather(kv.v_all)
    k_pre = torch.cat([p for p, _ in ks])
    v_pre = torch.cat([p for p, _ in vs])
    if not causal:
        k_full = torch.cat([k_pre, *[own for _, own in ks]])
        v_full = torch.cat([v_pre, *[own for _, own in vs]])
        return attend(q, k_full, v_full, False, scale)

    # Causal: put the shards back in sequence order (chunk c of every rank), then each local
    # chunk attends the prefix and the sequence up to its own end, bottom-right aligned.
    half = q.shape[0] // 2

    def in_order(parts):
        firsts = [own[:half] for _, own in parts]
        seconds = [own[half:] for _, own in parts]
        return torch.cat(firsts + seconds[::-1])

    k_seq, v_seq = in_order(ks), in_order(vs)
    outs, lses = [], []
    for i, c in enumerate((rank, 2 * world - 1 - rank)):
        end = (c + 1) * half
        k_see = torch.cat([k_pre, k_seq[:end]])
        v_see = torch.cat([v_pre, v_seq[:end]])
        o, lse = attend(q[i * half : (i + 1) * half], k_see, v_see, True, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def local_attention(
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
    """Attention on one rank. The whole sequence must be here: a world of one rank. A
    prefix is attended where it lies (a gathered or sliced view of the cache), not copied
    in front of the new keys."""
    world = communicator(group).world_size
    if world != 1:
        raise ValueError(f"'local' attention needs a world of one rank; this one has {world}")
    valid, scale = check(q, k, v, 1, causal, scale, kv_len, k_prefix, v_prefix)
    backend = backend_for(q.device)
    if k_prefix is None:
        return backend.attention(q, k[:valid], v[:valid], causal, scale)
    return backend.attention_prefixed(q, k_prefix.to(k.dtype), v_prefix.to(v.dtype),
                                      k[:valid], v[:valid], causal, scale)
