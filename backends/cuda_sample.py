"""The sampler's filters and draw for CUDA (Triton): one program per row does what
tr_engine/engine/sampler.py does in tensor operations (penalties, temperature, top-k, min-p,
top-p, the exponential race), without sorting the vocabulary.

The draw is the tensor path's: the argmax of e / E over the kept tokens, e = exp(z - max z),
E ~ Exp(1) given. What is kept needs no sort:

    top_k:  z >= the k-th largest z, found by radix selection on the values' bits (four
            passes of 256-bin histograms; ties at the k-th value all kept)
    min_p:  e >= min_p (p >= min_p x the largest p)
    top_p:  a token is kept iff the tokens of strictly larger e hold less than top_p of the
            mass. The race is run over every token that passes top_k and min_p; if its
            winner is kept by top_p it is the winner over the kept tokens too (they are a
            subset), and one pass tells (the mass above it). If not, no kept token has an e
            as small as the winner's, so the race is run again over the larger e only.
            Since the winner of a race falls outside top_p's set with probability about
            1 - top_p, a row usually needs one round (a pass for the race, one for the
            mass). After ROUNDS rounds the threshold itself is found by bisection over the
            bits of e (31 passes) and the race run once more over the kept set.

Kept sets are the tensor path's (ties at a threshold all kept); what may differ is float
rounding in the sums that place the top_p threshold, and e / E against p / E. A row of the
8B shape's vocabulary (128K float32, 512 KiB) stays in L2 between passes.

Per row: settings (the sampler's seven columns), a penalty-table row (-1: none) and a noise
row (-1: greedy, the row's argmax after the penalties: one pass). Nothing is read on the
host, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, WARPS, ROUNDS = 8192, 16, 3
_MAX = tl.constexpr(3.4028234663852886e38)
_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _key(x):
    """Float32 values to int64 keys in [0, 2^32), in the values' order (-inf lowest)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648


@triton.jit
def _first_max(best, where, val, idx):
    """Per lane: the larger value so far, the earlier index on ties (idx grows)."""
    better = val > best
    return tl.where(better, val, best), tl.where(better, idx, where)


@triton.jit
def _argmax(best, where):
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, where, 2147483647), 0)


@triton.jit
def _kth_key(wr, V, k, lanes, BLOCK: tl.constexpr):
    """The key of the k-th largest of the row's V values at wr (1 <= k <= V)."""
    bins = tl.arange(0, 512)  # digits 0-255; the values outside the prefix go to bin 256
    prefix = tl.zeros([], tl.int64)
    for j in tl.static_range(4):
        shift = 24 - 8 * j
        hist = tl.zeros([512], tl.int32)
        for off in range(0, V, BLOCK):
            i = off + lanes
            key = _key(tl.load(wr + i, mask=i < V, other=float("-inf")))
            match = ((key >> (shift + 8)) == prefix) & (i < V)
            hist += tl.histogram(tl.where(match, (key >> shift) & 255, 256).to(tl.int32), 512)
        hist = tl.where(bins < 256, hist, 0)
        suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # values in bins >= b
        b = tl.max(tl.where(suffix >= k, bins, -1), 0)
        k -= tl.sum(tl.where(bins == b, suffix - hist, 0), 0)
        prefix = prefix * 256 + b
    return prefix


@triton.jit
def _race(wr, nr, V, kth, m, min_p, above, lanes, BLOCK: tl.constexpr):
    """The exponential race over the tokens top_k and min_p keep whose e = exp(z - m) has a
    key above `above`: the winner, and the softmax's sum over top_k's set."""
    d_best = tl.full([BLOCK], -1.0, tl.float32)
    d_at = lanes
    total = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        i = off + lanes
        ok = i < V
        z = tl.load(wr + i, mask=ok, other=float("-inf"))
        e = tl.where((_key(z) >= kth) & ok, tl.exp(z - m), 0.0)
        total += e
        keep = (e >= min_p) & (_key(e) > above) & ok
        noise = tl.load(nr + i, mask=keep, other=1.0)
        d_best, d_at = _first_max(d_best, d_at,
                                  tl.where(keep, e / tl.maximum(noise, _TINY), -1.0), i)
    best, token = _argmax(d_best, d_at)
    return token, tl.sum(total, 0)


@triton.jit
def _mass_above(wr, V, kth, m, min_p, above, lanes, BLOCK: tl.constexpr):
    """Σ e over the tokens top_k and min_p keep whose e has a key above `above`."""
    mass = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        i = off + lanes
        z = tl.load(wr + i, mask=i < V, other=float("-inf"))
        e = tl.where(_key(z) >= kth, tl.exp(z - m), 0.0)
        mass += tl.where((e >= min_p) & (_key(e) > above), e, 0.0)
    return tl.sum(mass, 0)


@triton.jit
def _sample_kernel(x_ptr, sx, counts_ptr, sc, rows_ptr, settings, ss, noise_ptr,
                   sn, work_ptr, sw, out_ptr, V, BLOCK: tl.constexpr, PENALTY: tl.constexpr,
                   ROUNDS: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    xr, wr = x_ptr + r * sx, work_ptr + r * sw
    st = settings + r * ss
    temp, top_k, top_p = tl.load(st), tl.load(st + 1), tl.load(st + 2)
    min_p, rep, pres, freq = tl.load(st + 3), tl.load(st + 4), tl.load(st + 5), tl.load(st + 6)
    prow = tl.load(rows_ptr + 2 * r).to(tl.int64)
    nrow = tl.load(rows_ptr + 2 * r + 1).to(tl.int64)
    sampled = nrow >= 0
    cr = counts_ptr + tl.maximum(prow, 0) * sc  # row 0 read and ignored without a row
    has = (prow >= 0).to(tl.int32)
    nr = noise_ptr + tl.maximum(nrow, 0) * sn

    # pass 1: penalties, finite, the greedy argmax; z = finite(y / T) kept for the rest
    g_best = tl.full([BLOCK], float("-inf"), tl.float32)
    g_at = lanes
    z_best = tl.full([BLOCK], float("-inf"), tl.float32)
    for off in range(0, V, BLOCK):
        i = off + lanes
        ok = i < V
        y = tl.load(xr + i, mask=ok, other=float("-inf")).to(tl.float32)
        if PENALTY:
            c = tl.load(cr + i, mask=ok, other=0) * has
            gen = (c >> 1).to(tl.float32)
            y = tl.where(c > 0, tl.where(y > 0, y / rep, y * rep), y)
            y = y - (pres * (gen > 0).to(tl.float32) + freq * gen)
        y = tl.where(y != y, float("-inf"), y)
        y = tl.where(y == float("inf"), _MAX, y)
        g_best, g_at = _first_max(g_best, g_at, y, i)
        if sampled:
            z = y / temp
            z = tl.where(z != z, float("-inf"), z)
            z = tl.where(z == float("inf"), _MAX, z)
            z_best = tl.maximum(z_best, z)
            tl.store(wr + i, z, mask=ok)
    best, token = _argmax(g_best, g_at)
    m = tl.max(z_best, 0)
    if sampled & (m > float("-inf")):
        k = top_k.to(tl.int64)
        kth = tl.zeros([], tl.int64)  # the top_k cut on z's keys (0: none)
        if (k > 0) & (k < V):
            kth = _kth_key(wr, V, k, lanes, BLOCK)
        use_p = top_p < 1.5
        floor = _key(tl.full([], -1.0, tl.float32))  # a round's race: keys above this
        target = tl.zeros([], tl.float32)
        done = tl.zeros([], tl.int32)
        one = tl.full([], 1, tl.int32)
        for _rnd in range(ROUNDS):
            if done == 0:
                token, total = _race(wr, nr, V, kth, m, min_p, floor, lanes, BLOCK)
                done = one
                if use_p:
                    target = top_p * total
                    won = _key(tl.exp(tl.load(wr + token) - m))
                    if _mass_above(wr, V, kth, m, min_p, won, lanes, BLOCK) >= target:
                        done = one - 1  # the winner is outside top_p's set
                        floor = won
        if done == 0:  # the top_p cut by bisection over e's keys, then the race over it
            lo = _key(tl.full([], -1.0, tl.float32))
            hi = _key(tl.full([], 1.0, tl.float32))
            for _bit in range(31):
                mid = lo + (hi - lo) // 2
                if _mass_above(wr, V, kth, m, min_p, mid, lanes, BLOCK) < target:
                    hi = mid
                else:
                    lo = mid
            token, total = _race(wr, nr, V, kth, m, min_p, hi - 1, lanes, BLOCK)
    elif sampled:  # no finite logit: the tensor path's fallback, argmax of z
        token = tl.zeros([], tl.int32)
    tl.store(out_ptr + r, token.to(tl.int64))


def sample(x: torch.Tensor, settings: torch.Tensor, rows: torch.Tensor,
           noise: torch.Tensor | None, counts: torch.Tensor | None) -> torch.Tensor:
    """x `[B, V]` logits (any float dtype, rows contiguous) after the mask and bias;
    settings `[B, 7]` float32 (the sampler's columns); rows `[B, 2]` integers (contiguous):
    each row's penalty-table row and noise row (-1: none, greedy; one tensor, so that no
    batch size gives a pointer of other alignment, which Triton would build anew for);
    noise `[n, V]` float32 E ~ Exp(1); counts the penalty table `[R, V]` int32. Returns the
    tokens `[B]` int64."""
    b, vocab = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(b, dtype=torch.long, device=x.device)
    work = torch.empty(b, vocab, dtype=torch.float32, device=x.device)
    noise = work if noise is None else noise
    penalty = counts is not None and counts.numel() > 0
    counts = rows if not penalty else counts
    _sample_kernel[(b,)](x, x.stride(0), counts, counts.stride(0) if penalty else 0,
                         rows.contiguous(), settings, settings.stride(0), noise,
                         noise.stride(0), work, work.stride(0), out, vocab,
                         BLOCK=min(BLOCK, max(256, triton.next_power_of_2(vocab))),
                         PENALTY=penalty, ROUNDS=ROUNDS,
                         num_warps=WARPS)
    return out
