"""The fused sampling kernel (tr_engine/backends/cuda_sample.py, Triton: compiled on a GPU,
in Triton's interpreter on the CPU elsewhere) against the sampler's tensor-operations path,
which tests/test_sampler.py checks against the exact filtered distributions, transformers'
repetition processor and OpenAI's penalty formulas: given the same noise, both draw the same
token on every row, over mixed batches and several steps (penalty counts growing), edge rows
(NaN, inf, no finite logit, ties at the top-k value, filters that leave one token), more
blocks than one a row, and the bisection that follows when the race rounds run out."""

from __future__ import annotations

import pytest
import torch

from tr_engine import SamplingParams
from tr_engine.engine.sampler import Sampler
from tr_engine.engine.sequence import Sequence

pytest.importorskip("triton", reason="the CUDA kernels are checked where Triton is installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6),
         dict(temperature=1.0, min_p=0.1), dict(temperature=2.0, top_k=8, top_p=0.9, min_p=0.05),
         dict(temperature=0.5, top_p=0.999), dict(temperature=1.0, top_k=3, seed=11),
         dict(temperature=1.5, top_p=0.3, seed=12), dict(temperature=0),
         dict(temperature=0, repetition_penalty=1.3),
         dict(temperature=0.9, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
              frequency_penalty=0.3),
         dict(temperature=0.8, top_k=1), dict(temperature=0.8, top_k=10**6, top_p=0.95),
         dict(temperature=1e-30, top_p=1e-46, repetition_penalty=1e-38),
         dict(temperature=1.0, min_p=1.0), dict(temperature=1.1, top_k=4, seed=3)]


def _batch(vocab: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(len(KINDS), vocab, generator=g) * 3
    x[0, 5], x[1, 7], x[2] = float("inf"), float("nan"), float("-inf")
    x[4, :40] = 2.5  # ties at the top-k value
    x[15, :10] = 4.0
    x[13, :3] = torch.tensor([-3e38, 3e38, 3e38])
    return x.to(DEVICE)


def _run(fused: bool, vocab: int, steps: int = 3):
    sampler = Sampler(torch.device(DEVICE), seed=3, fused=fused)
    seqs = [Sequence(i, f"r{i}", [1, 2, 3, 50, 60, vocab - 1], SamplingParams(**k))
            for i, k in enumerate(KINDS)]
    out = []
    for step in range(steps):
        tokens, _, errors = sampler(_batch(vocab, step), seqs)
        assert errors == {}
        out.append(tokens)
        for s, t in zip(seqs, tokens):
            s.output_ids.append(t)
    rows = sampler.penalties.rows([s for s in seqs if s.params.repetition_penalty != 1.0],
                                  vocab)
    return out, sampler.penalties.table[torch.tensor(rows)].cpu()


@pytest.mark.parametrize("vocab,block,rounds", [(300, None, None), (3000, 256, 1)])
def test_the_kernel_draws_what_the_tensor_path_draws(monkeypatch, vocab, block, rounds):
    from tr_engine.backends import cuda_sample

    if block:  # several blocks a row; one race round, so most top_p rows take the bisection
        monkeypatch.setattr(cuda_sample, "BLOCK", block)
        monkeypatch.setattr(cuda_sample, "ROUNDS", rounds)
    want, want_counts = _run(False, vocab)
    got, got_counts = _run(True, vocab)
    assert got == want
    assert torch.equal(got_counts, want_counts)
    assert Sampler(torch.device(DEVICE)).fused == (DEVICE == "cuda")


def test_the_start_up_warm_up_runs_both_variants(monkeypatch):
    from tr_engine.backends import cuda_sample

    seen = []
    real = cuda_sample.sample
    monkeypatch.setattr(cuda_sample, "sample", lambda *a: seen.append(a[4] is not None)
                        or real(*a))
    Sampler(torch.device(DEVICE), fused=True).warm_up(300)
    assert seen == [True, False]

