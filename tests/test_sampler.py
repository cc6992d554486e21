"""The batched sampler against exact references, on the CPU: its draws follow the
top-k/min-p/top-p-filtered softmax of each row (mixed batches), a seeded row draws the same
tokens alone or in any batch, and the penalties equal transformers' repetition processor and
OpenAI's presence/frequency formula."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tr_engine import SamplingParams
from tr_engine.engine import penalties
from tr_engine.engine.sampler import Sampler, apply_token_bitmask
from tr_engine.engine.sequence import Sequence

V = 16
LOGITS = torch.tensor([3.0, 2.5, 2.5, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0,
                       -4.0, float("-inf"), -6.0, -8.0])
MIXED = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6),
         dict(temperature=1.0, min_p=0.1), dict(temperature=2.0, top_k=8, top_p=0.9, min_p=0.05),
         dict(temperature=0.5, top_p=0.999), dict(temperature=1.0, top_k=3, seed=11),
         dict(temperature=1.5, top_p=0.75, seed=12)]


def exact(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filtered distribution, from the definitions, in float64."""
    x = logits.double() / p.temperature
    if 0 < p.top_k < len(x):
        x = torch.where(x >= torch.sort(x, descending=True).values[p.top_k - 1], x, -math.inf)
    probs = torch.softmax(x, -1)
    probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if p.top_p < 1.0:
        kept, mass = torch.zeros_like(probs), 0.0
        for i in torch.argsort(probs, descending=True).tolist():
            if mass >= p.top_p or probs[i] == 0:
                break
            kept[i], mass = probs[i], mass + float(probs[i])
        probs = kept
    return probs / probs.sum()


def seqs_of(kinds: list[dict], copies: int = 1) -> list[Sequence]:
    out = []
    for c in range(copies):
        for k in kinds:
            if "seed" in k:
                k = {**k, "seed": k["seed"] * 1000 + c}
            out.append(Sequence(len(out), f"r{len(out)}", [1, 2], SamplingParams(**k)))
    return out


def test_draws_follow_the_filtered_softmax():
    copies, rounds = 400, 15  # 6000 draws a parameter set
    seqs = seqs_of(MIXED, copies)
    sampler = Sampler(torch.device("cpu"), seed=1)
    logits = LOGITS.repeat(len(seqs), 1)
    counts = [Counter() for _ in MIXED]
    for _ in range(rounds):
        tokens, _, errors = sampler(logits, seqs)
        assert errors == {}
        for i, t in enumerate(tokens):
            counts[i % len(MIXED)][t] += 1
    n = copies * rounds
    for kind, got in zip(MIXED, counts):
        want = exact(LOGITS, SamplingParams(**kind))
        seen = torch.tensor([got[t] / n for t in range(V)], dtype=torch.float64)
        assert set(got) <= set(torch.nonzero(want).flatten().tolist()), kind  # the support
        tv = 0.5 * float((seen - want).abs().sum())
        assert tv < 0.03, (kind, tv)


def test_a_row_the_filters_empty_is_greedy_and_every_row_finite():
    sampler = Sampler(torch.device("cpu"))
    seq = Sequence(0, "r", [0], SamplingParams(temperature=1e-30, top_p=1e-46,
                                                repetition_penalty=1e-38))
    rows = torch.tensor([[float("nan")] * 4, [float("-inf")] * 3 + [float("nan")],
                         [-3e38, 3e38, 3e38, 0.0]])
    tokens, _, errors = sampler(rows, [seq, seq, seq])
    assert errors == {} and all(0 <= t < 4 for t in tokens) and tokens[2] in (1, 2)


def _steps(sampler, seqs, steps: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = [[] for _ in seqs]
    for _ in range(steps):
        logits = torch.randn(len(seqs), 300, generator=g) * 3
        tokens, _, errors = sampler(logits, seqs)
        assert errors == {}
        for i, (s, t) in enumerate(zip(seqs, tokens)):
            s.output_ids.append(t)
            out[i].append(t)
    return out


def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _triton(), reason="the fused kernel runs where Triton is installed"))])
def test_a_seeded_row_draws_the_same_alone_and_in_a_mixed_batch(fused):
    """Both paths: the tensor operations, and the fused kernel (tr_engine/backends/
    cuda_sample.py; in Triton's interpreter on the CPU)."""
    kinds = [dict(temperature=0.9, top_p=0.95), dict(temperature=0), dict(temperature=1.2),
             dict(temperature=0.8, top_k=40, repetition_penalty=1.2), dict(temperature=1.0,
             min_p=0.05, seed=3), dict(temperature=0, frequency_penalty=0.5, logprobs=2)]
    target = dict(temperature=0.8, top_p=0.9, top_k=100, presence_penalty=0.3, seed=1234)
    alone = Sequence(0, "t", [5, 6], SamplingParams(**target))
    # the target's logits are row 0 of each step alone, row 17 of 32 in the batch
    g = torch.Generator().manual_seed(9)
    rows = [torch.randn(300, generator=g) * 3 for _ in range(12)]
    want = []
    solo = Sampler(torch.device("cpu"), seed=5, fused=fused)
    for r in rows:
        t, _, _ = solo(r[None], [alone])
        alone.output_ids.append(t[0])
        want.append(t[0])
    batch = [Sequence(i + 1, f"o{i}", [7, i], SamplingParams(**kinds[i % len(kinds)]))
             for i in range(31)]
    target_seq = Sequence(99, "t", [5, 6], SamplingParams(**target))
    batch.insert(17, target_seq)
    mixed = Sampler(torch.device("cpu"), seed=6, fused=fused)
    got = []
    for r in rows:
        logits = torch.randn(32, 300, generator=g) * 3
        logits[17] = r
        tokens, _, errors = mixed(logits, batch)
        assert errors == {}
        for s, t in zip(batch, tokens):
            s.output_ids.append(t)
        got.append(tokens[17])
    assert got == want


@pytest.mark.parametrize("penalty", [1.3, 0.7, 1e-38])
def test_repetition_penalty_equals_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 500, generator=g) * 5
    prompts = [[1, 2, 3, 3, 499], list(range(0, 500, 7)), [42]]
    outputs = [[9, 9, 10], [], [42, 43]]
    seqs = [Sequence(i, f"r{i}", p, SamplingParams(temperature=0,
                                                  repetition_penalty=penalty))
            for i, p in enumerate(prompts)]
    for s, o in zip(seqs, outputs):
        s.output_ids = list(o)
    ours = _penalized(seqs, logits)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for i, s in enumerate(seqs):
        ids = torch.tensor([s.prompt_ids + s.output_ids])
        assert torch.equal(ours[i], hf(ids, logits[i : i + 1].clone())[0]), i


def test_presence_and_frequency_follow_openai():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 200, generator=g)
    seqs = [Sequence(0, "a", [5, 5, 6], SamplingParams(presence_penalty=0.5,
                                                       frequency_penalty=1.5)),
            Sequence(1, "b", [7], SamplingParams(presence_penalty=-2.0, frequency_penalty=0.25,
                                                 repetition_penalty=1.1))]
    seqs[0].output_ids = [5, 8, 8, 8, 199]
    seqs[1].output_ids = [7, 7, 3]
    ours = _penalized(seqs, logits)
    for i, s in enumerate(seqs):
        p = s.params
        want = logits[i].double().clone()
        if p.repetition_penalty != 1.0:
            for t in set(s.prompt_ids) | set(s.output_ids):
                want[t] = want[t] / p.repetition_penalty if want[t] > 0 \
                    else want[t] * p.repetition_penalty
        for t, c in Counter(s.output_ids).items():  # the output only (OpenAI)
            want[t] -= c * p.frequency_penalty + p.presence_penalty
        assert torch.allclose(ours[i].double(), want, atol=1e-5, rtol=0), i


def test_penalty_counts_follow_the_sampled_tokens():
    """A row's counts are built once, then kept by the sampler's own updates."""
    sampler = Sampler(torch.device("cpu"))
    seq = Sequence(0, "r", list(range(50)) * 3, SamplingParams(temperature=1.0, seed=4,
                                                               frequency_penalty=1.0,
                                                               repetition_penalty=1.2))
    _steps(sampler, [seq], 20, seed=1)
    row = sampler.penalties.rows([seq], 300)[0]
    want = torch.zeros(300, dtype=torch.int32)
    want[:50] = 1
    for t in seq.output_ids:
        want[t] += 2
    assert torch.equal(sampler.penalties.table[row], want)


def _penalized(seqs, logits):
    state = penalties.PenaltyState(torch.device("cpu"))
    rows = torch.tensor(state.rows(seqs, logits.shape[1]))
    p = [s.params for s in seqs]
    return penalties.apply(logits.clone(), state.table[rows],
                           torch.tensor([q.repetition_penalty for q in p]),
                           torch.tensor([q.presence_penalty for q in p]),
                           torch.tensor([q.frequency_penalty for q in p]))


def test_the_token_bitmask_leaves_only_allowed_tokens():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.randn(2, 70, generator=torch.Generator().manual_seed(0))
    allowed = {0: [3, 40, 69], 1: list(range(70))}
    mask = torch.zeros(2, 3, dtype=torch.int32)
    for r, ids in allowed.items():
        for t in ids:
            mask[r, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)
    x = apply_token_bitmask(logits, mask)
    assert torch.isfinite(x[0]).sum() == 3 and torch.equal(x[1], logits[1])
    seqs = [Sequence(i, f"r{i}", [1], SamplingParams(temperature=1.0)) for i in range(2)]
    for _ in range(20):
        tokens, _, _ = sampler(logits, seqs, allowed=mask)
        assert tokens[0] in allowed[0]


def test_a_batch_that_fails_on_the_device_is_sampled_row_by_row(monkeypatch):
    """The rows then get what the batch would have given them: the same draws, the same
    penalty counts."""
    kinds = MIXED + [dict(temperature=0, repetition_penalty=1.4, logprobs=2),
                     dict(temperature=0.9, frequency_penalty=1.0, seed=5)]
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(len(kinds), 64, generator=g) * 2
    want, _, _ = Sampler(torch.device("cpu"), seed=3)(logits, seqs_of(kinds))
    real = penalties.apply

    def batch_fails(x, *args):
        if x.shape[0] > 1:
            raise RuntimeError("injected device fault")
        return real(x, *args)

    monkeypatch.setattr(penalties, "apply", batch_fails)
    got, lps, errors = Sampler(torch.device("cpu"), seed=3)(logits, seqs_of(kinds))
    assert errors == {} and got == want and lps[-2].token_id == got[-2]
