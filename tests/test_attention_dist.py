"""Every strategy on 1-4 gloo ranks against float64 attention on one process; and the
channel that carries step plans to the ranks, in the same world."""

from __future__ import annotations

import itertools

import pytest
import torch
from attention_cases import relay_plans, run_strategy, run_tokenring_in_pieces
from conftest import record_error
from reference import attention64
from world import World

from tr_engine.distributed import zigzag

WORLD = 4
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def world():
    w = World(WORLD)
    yield w
    w.close()


def make_qkv(total, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, hq, d, generator=g).to(dtype)
    k = torch.randn(total, hkv, d, generator=g).to(dtype)
    v = torch.randn(total, hkv, d, generator=g).to(dtype)
    return q, k, v


def check(world, name, p, q, k, v, causal, label, prefix=None, splits=None):
    """Run on p ranks and compare out and lse (rows of the new tokens) with float64."""
    prefixes = None
    if prefix is not None:
        kp, vp = prefix
        bounds = [0, *itertools.accumulate(splits)]
        prefixes = [(kp[a:b], vp[a:b]) for a, b in zip(bounds, bounds[1:])]
    results = world.run(run_strategy, (name, q, k, v, causal, prefixes), ranks=p)
    total = q.shape[0]
    out = zigzag.unshard([r[0] for r in results], total)
    lse = zigzag.unshard([r[1] for r in results], total)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    if prefix is None:
        ref_out, ref_lse = attention64(q, k, v, causal=causal)
    else:
        c = prefix[0].shape[0]
        ref_out, ref_lse = attention64(
            q, torch.cat([prefix[0], k]), torch.cat([prefix[1], v]), causal=causal, q_offset=c
        )
    err = (out.double() - ref_out).abs()
    lse_err = (lse.double() - ref_lse).abs()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    record_error(label, err.max().item(), err.mean().item())
    record_error(label + " lse", lse_err.max().item(), lse_err.mean().item())
    tol = TOL[q.dtype]
    assert err.max().item() < tol, f"{label}: max out error {err.max().item():.3e}"
    assert lse_err.max().item() < tol, f"{label}: max lse error {lse_err.max().item():.3e}"


STRATS = ("tokenring", "ring", "allgather_kv")


@pytest.mark.parametrize("name", STRATS)
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_full_prefill_matrix(world, name, p):
    """Hq/Hkv 1, 3, 4; D 64 and 128; lengths with and without padding; causal and not;
    float32 and bfloat16."""
    combos = itertools.product(
        [(4, 4), (6, 2), (8, 2)], [64, 128], [True, False], [torch.float32, torch.bfloat16],
        [0, 3],
    )
    for seed, ((hq, hkv), d, causal, dtype, extra) in enumerate(combos, start=1):
        total = 2 * p * 5 + extra  # extra > 0 needs padding to a multiple of 2P
        q, k, v = make_qkv(total, hq, hkv, d, dtype, seed)
        label = f"{name} {'causal' if causal else 'full'} {str(dtype)[6:]}"
        check(world, name, p, q, k, v, causal, label)


def test_local_strategy_is_single_rank(world):
    q, k, v = make_qkv(37, 6, 2, 64, torch.float32, 7)
    for causal in (True, False):
        check(world, "local", 1, q, k, v, causal, "local")
    with pytest.raises(RuntimeError, match="needs a world of one rank"):
        world.run(run_strategy, ("local", q, k, v, True, None), ranks=2)


@pytest.mark.parametrize("name", STRATS)
@pytest.mark.parametrize("p", [2, 3, 4])
def test_partial_prefill_after_cached_prefix(world, name, p):
    """New tokens' queries against a cached prefix spread unevenly (some ranks hold none)
    plus the new tokens themselves."""
    seed = 100
    for (hq, hkv), new, cached, dtype in itertools.product(
        [(8, 2), (3, 3)], [1, 2 * p, 2 * p * 3 + 1], [5, 40], [torch.float32, torch.bfloat16]
    ):
        seed += 1
        d = 64
        q, k, v = make_qkv(new, hq, hkv, d, dtype, seed)
        kp, vp, _ = make_qkv(cached, hkv, hkv, d, dtype, seed + 1000)[1:] + (None,)
        splits = [cached // 2, 0] + [0] * (p - 2)
        splits[-1] += cached - sum(splits)
        check(world, name, p, q, k, v, True, f"{name} prefix {str(dtype)[6:]}",
              prefix=(kp, vp), splits=splits)


def test_short_sequences_and_tiny_shards(world):
    """Sequences shorter than 2P: most chunks are padding, some ranks hold no real token."""
    for p, total, causal in itertools.product([2, 3, 4], [1, 2, 5], [True, False]):
        q, k, v = make_qkv(total, 4, 2, 64, torch.float32, total * 10 + p)
        for name in STRATS:
            check(world, name, p, q, k, v, causal, f"{name} short")


def test_custom_scale_and_bad_input(world):
    q, k, v = make_qkv(24, 4, 2, 64, torch.float32, 3)
    res = world.run(run_strategy, ("tokenring", q, k, v, True, None, 0.05), ranks=2)
    out = zigzag.unshard([r[0] for r in res], 24)
    ref, _ = attention64(q, k, v, causal=True, scale=0.05)
    assert (out.double() - ref).abs().max() < 1e-4
    bad_k = torch.randn(24, 3, 64)  # 4 query heads are not a multiple of 3
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        world.run(run_strategy, ("tokenring", q, bad_k, bad_k, True, None), ranks=2)


def test_last_step_in_four_pieces(world):
    """The four-piece last step (long shards), with pieces of uneven length."""
    for p, causal, total in ((2, True, 2 * 2 * 9 + 3), (3, True, 2 * 3 * 7), (4, False, 61)):
        q, k, v = make_qkv(total, 4, 2, 32, torch.float32, 40 + p)
        results = world.run(run_tokenring_in_pieces, (q, k, v, causal, 4), ranks=p)
        out = zigzag.unshard([r[0] for r in results], total)
        ref, _ = attention64(q, k, v, causal=causal)
        err = (out.double() - ref).abs()
        record_error("tokenring four pieces", err.max().item(), err.mean().item())
        assert err.max().item() < 1e-4


def test_plan_channel_carries_plans_of_any_size(world):
    """Small plans fit the channel's buffer; a long prefill chunk overflows it and follows in
    a second broadcast. Every rank must receive each plan whole and in order."""
    from tr_engine.plan import SHUTDOWN, DecodePlan, PrefillPlan, StepPlan

    decode = StepPlan("decode", decode=DecodePlan([3, 4], [11, 12], [70000, 9], [[0, 5]] * 2,
                                                  [[35000, 4], [35000, 5]], [1, 0]))
    prefill = StepPlan("prefill", prefill=PrefillPlan(7, list(range(100_000, 130_000)), 4096,
                                                      [0, 0, 0], [2048] * 3, True, "tokenring"))
    plans = [decode, prefill, decode, SHUTDOWN]
    for got in world.run(relay_plans, (plans,), ranks=3):
        assert got == plans
