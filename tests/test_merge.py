"""Properties of the out/LSE merge, checked against attention over the union of keys."""

from __future__ import annotations

import torch
from conftest import record_error
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import attention64

from tr_engine.attention import merge, merge_, merge_all


def partials(seed: int, parts: int, tq=5, h=3, d=16):
    """Split a random key set into `parts` pieces (some possibly empty); return the float64
    (out, lse) of each piece and of the whole."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(parts, 4 * parts + 8, (1,), generator=g))
    q = torch.randn(tq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, h, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=g).tolist())
    bounds = [0, *cuts, n]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            pieces.append((torch.zeros(tq, h, d, dtype=torch.float64),
                           torch.full((tq, h), float("-inf"), dtype=torch.float64)))
        else:
            pieces.append(attention64(q, k[a:b], v[a:b], causal=False))
    return pieces, attention64(q, k, v, causal=False)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), parts=st.integers(2, 6), data=st.data())
def test_merge_any_order_equals_union(seed, parts, data):
    pieces, (ref_out, ref_lse) = partials(seed, parts)
    order = data.draw(st.permutations(range(parts)))
    out, lse = pieces[order[0]]
    for i in order[1:]:
        out, lse = merge(out, lse, *pieces[i])
    err = (out.double() - ref_out).abs()
    record_error("merge, any order", err.max().item(), err.mean().item())
    assert err.max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_merge_is_associative(seed):
    (a, b, c), _ = partials(seed, 3)
    left = merge(*merge(*a, *b), *c)
    right = merge(*a, *merge(*b, *c))
    assert torch.allclose(left[0], right[0], atol=1e-6)
    assert torch.allclose(left[1], right[1], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), parts=st.integers(1, 5))
def test_merge_all_and_in_place_agree(seed, parts):
    pieces, (ref_out, ref_lse) = partials(seed, parts)
    outs = torch.stack([p[0] for p in pieces]).float()
    lses = torch.stack([p[1] for p in pieces]).float()
    out, lse = merge_all(outs, lses)
    assert (out.double() - ref_out).abs().max() < 1e-5
    acc_out, acc_lse = pieces[0][0].float().clone(), pieces[0][1].float().clone()
    for o, lse_b in pieces[1:]:
        merge_(acc_out, acc_lse, o.float(), lse_b.float())
    assert torch.allclose(acc_out, out, atol=1e-6)
    assert torch.allclose(acc_lse, lse, atol=1e-6)


def test_merge_with_empty_sides():
    out = torch.randn(4, 2, 8)
    lse = torch.randn(4, 2)
    empty_out = torch.zeros(4, 2, 8)
    empty_lse = torch.full((4, 2), float("-inf"))
    o, lse_m = merge(out, lse, empty_out, empty_lse)
    assert torch.equal(o, out) and torch.equal(lse_m, lse)
    o, lse_m = merge(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(o, empty_out) and torch.isneginf(lse_m).all()
    assert not torch.isnan(o).any()
