"""Choosing a strategy: a small cost model of one attention layer on P ranks.

Per rank, with n = new tokens / P (the rank's queries) and c = cached tokens / P (its slice
of the cache), every strategy does the same arithmetic; they differ in what moves and how
much of it hides behind compute (Meta's context-parallel inference, arXiv 2411.01783,
Eq. 1-3, make the same comparison). Per step of the ring, with e bytes per element:

  pass-Q (tokenring): Q of n rows one way, (out, lse) of n rows the other way
                      -> max(n·Hq·D·e, n·Hq·(D·e + 4)) bytes per link direction
  pass-KV (ring):     K and V of c + n rows one way -> 2·(c + n)·Hkv·D·e bytes

A step costs max(compute, transfer); TokenRing also pays the last step's results, which
nothing hides. So for a full prefill pass-KV moves fewer bytes when Hq > 2·Hkv, but both
hide behind compute once blocks are long; with a long cache and few new tokens pass-KV
moves the whole cache every step and pass-Q wins by the ratio (c + n)/n. `allgather_kv`
moves all keys up front with nothing to hide behind.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import STRATEGIES


@dataclass(frozen=True)
class Rates:
    """Measured (or assumed) speeds: attention FLOP/s of one card's kernel, bytes/s of one
    link direction, and the fixed cost of one message."""

    flops: float = 300e12
    link: float = 100e9
    latency: float = 20e-6

    def __post_init__(self) -> None:
        if self.flops <= 0 or self.link <= 0 or self.latency < 0:
            raise ValueError(f"rates must be positive: {self}")


def estimate(
    strategy: str,
    *,
    new: int,
    cached: int,
    world: int,
    hq: int,
    hkv: int,
    d: int,
    elem: int,
    rates: Rates,
) -> float:
    """Seconds for one causal attention layer with this strategy (a model, not a promise)."""
    n = -(-new // world)
    c = cached / world
    flop = 4.0 * hq * d  # per query-key pair: QK^T and PV, multiply-add each
    step0 = flop * (n * n / 2 + n * c) / rates.flops
    step = flop * (n * n / 2 + n * c) / rates.flops  # balanced zigzag block + cache slice
    if world == 1:
        return step0 if strategy in ("local", "tokenring", "ring", "allgather_kv") else 0.0
    if strategy == "local":
        return float("inf")
    if strategy == "tokenring":
        q_bytes = n * hq * d * elem
        res_bytes = n * hq * (d * elem + 4)
        move = max(q_bytes, res_bytes) / rates.link + rates.latency
        return step0 + (world - 1) * max(step, move) + res_bytes / rates.link
    kv_bytes = 2 * (c + n) * hkv * d * elem
    if strategy == "ring":
        return step0 + (world - 1) * max(step, kv_bytes / rates.link + rates.latency)
    if strategy == "allgather_kv":
        gather = (world - 1) * (kv_bytes / rates.link + rates.latency)
        return gather + step0 + (world - 1) * step
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def choose(*, new: int, cached: int, world: int, hq: int, hkv: int, d: int, elem: int,
           rates: Rates | None = None) -> str:
    """The cheapest strategy by `estimate`; ties go to the earlier one in STRATEGIES."""
    if world == 1:
        return "local"
    rates = rates or Rates()
    times = {
        s: estimate(s, new=new, cached=cached, world=world, hq=hq, hkv=hkv, d=d, elem=elem,
                    rates=rates)
        for s in STRATEGIES
    }
    best = min(times.values())
    return next(s for s in STRATEGIES if times[s] <= best * (1 + 1e-9))


def prefix_cost(mc) -> float:
    """What attending one earlier key costs a new token, in units of the token's own layers
    (both in FLOPs): 4·Hq·D per layer for the scores and the sum, against twice the
    parameters of a layer for its projections and MLP. About 1/27000 for Llama-3.1-8B: a
    token deep in a 128K prompt costs about 5x one at its start."""
    h, d = mc.hidden_size, mc.head_dim
    per_layer = h * (mc.num_heads + 2 * mc.num_kv_heads) * d + mc.num_heads * d * h \
        + 3 * h * mc.intermediate_size
    return 4 * mc.num_heads * d / (2 * per_layer)
