"""Work run inside the gloo ranks by the attention tests (importable by spawned workers)."""

from __future__ import annotations

from tr_engine.attention import get_strategy
from tr_engine.distributed import zigzag


def run_strategy(ctx, name, q, k, v, causal, prefixes, scale=None):
    """Shard the full q/k/v in the zigzag layout, run strategy `name`, return this rank's
    (out, lse). `prefixes` is None or a per-rank list of (k_prefix, v_prefix)."""
    total, p, r = q.shape[0], ctx.size, ctx.rank
    kw = {}
    if not causal and zigzag.padded_len(total, p) != total:
        kw["kv_len"] = zigzag.local_len(total, p, r)
    if prefixes is not None:
        kw["k_prefix"], kw["v_prefix"] = prefixes[r]
    qs, ks, vs = (zigzag.shard(x, p, r) for x in (q, k, v))
    return get_strategy(name)(qs, ks, vs, ctx.group, causal=causal, scale=scale, **kw)


def run_tokenring_in_pieces(ctx, q, k, v, causal, pieces_from):
    """tokenring with the four-piece last step switched on from shards of `pieces_from`."""
    from tr_engine.attention import tokenring

    saved, tokenring.PIECES_FROM = tokenring.PIECES_FROM, pieces_from
    try:
        return run_strategy(ctx, "tokenring", q, k, v, causal, None)
    finally:
        tokenring.PIECES_FROM = saved


def relay_plans(ctx, plans):
    """Rank 0 sends `plans` through a PlanChannel; every rank returns what it holds after."""
    from tr_engine.worker.cluster import PlanChannel

    channel = PlanChannel(ctx.group)
    got = []
    for plan in plans:
        if ctx.rank == 0:
            channel.send(plan)
            got.append(plan)
        else:
            got.append(channel.recv())
    return got
