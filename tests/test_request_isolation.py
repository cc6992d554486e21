"""One request cannot take the engine down (two gloo ranks, a small random checkpoint).

Every sampling value SamplingParams accepts, extremes and combinations included, samples
tokens; a request batched beside it gets exactly the tokens it gets alone. An exception
raised while serving one request ends that request (finish_reason "error", KV freed) and
the engine goes on.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import VOCAB, make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tr_engine import LLM, SamplingParams
from tr_engine.engine.sampler import Sampler
from tr_engine.errors import RequestFailed

NEW = 3
REFERENCE = {"prompt_token_ids": [5, 17, 99, 3, 250, 41]}
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_checkpoint("qwen3", tmp_path_factory.mktemp("ckpt"))
    with LLM(str(path), device="cpu", world_size=2, dtype="float32", prefill_chunk=16,
             kv_cache_tokens=64, max_model_len=64, max_num_seqs=4) as engine:
        yield engine


@pytest.fixture(scope="module")
def alone(llm) -> list[int]:
    return llm.generate(REFERENCE, GREEDY)[0].token_ids


def _idle(llm) -> bool:
    s = llm.engine.scheduler
    return not s.has_work() and s.kv_used() == [0, 0]


def _tiny_or(strategy, *extremes):
    return st.one_of(st.sampled_from(extremes), strategy)


sampling = st.fixed_dictionaries({}, optional={
    "temperature": _tiny_or(st.floats(0.0, 100.0), 0.0, 5e-324, 1e-300, 1e-38, 1e-6, 100.0),
    "top_p": _tiny_or(st.floats(0.0, 1.0, exclude_min=True), 5e-324, 1e-46, 1e-38, 1.0),
    "top_k": st.integers(-1, VOCAB + 5),
    "min_p": _tiny_or(st.floats(0.0, 1.0), 0.0, 1.0, 1e-300),
    "presence_penalty": _tiny_or(st.floats(-2.0, 2.0), -2.0, 2.0),
    "frequency_penalty": _tiny_or(st.floats(-2.0, 2.0), -2.0, 2.0),
    "repetition_penalty": _tiny_or(st.floats(0.0, 10.0, exclude_min=True), 5e-324, 1e-38,
                                   10.0),
    "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
    "logprobs": st.none() | st.integers(0, 20),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1),
                                  _tiny_or(st.floats(-100.0, 100.0), -100.0, 100.0),
                                  max_size=4),
})


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(params=sampling)
def test_every_accepted_sampling_value_samples(llm, alone, params):
    fuzzed = SamplingParams(max_tokens=NEW, ignore_eos=True, **params)
    ref, out = llm.generate([REFERENCE, {"prompt_token_ids": [7, 8, 9]}], [GREEDY, fuzzed])
    assert ref.token_ids == alone
    assert out.finish_reason == "length" and len(out.token_ids) == NEW, out
    assert all(0 <= t < VOCAB for t in out.token_ids)
    if params.get("logprobs") is not None:
        assert len(out.outputs[0].logprobs) == NEW


@pytest.mark.parametrize("params", [{"temperature": 1.0, "top_p": 1e-46},
                                    {"temperature": 1.0, "repetition_penalty": 1e-38}],
                         ids=["top_p", "repetition_penalty"])
def test_the_reported_values_sample(llm, alone, params):
    # the two values that killed the engine (issue 14): both in range
    fuzzed = SamplingParams(max_tokens=NEW, ignore_eos=True, **params)
    ref, out = llm.generate([REFERENCE, {"prompt_token_ids": [1, 2]}], [GREEDY, fuzzed])
    assert ref.token_ids == alone and out.finish_reason == "length"


def test_top_p_that_keeps_nothing_is_greedy(llm):
    p = {"prompt_token_ids": [40, 41, 42]}
    greedy = llm.generate(p, GREEDY)[0].token_ids
    tiny = SamplingParams(max_tokens=NEW, temperature=3.0, top_p=1e-46, ignore_eos=True, seed=1)
    assert llm.generate(p, tiny)[0].token_ids == greedy


def test_logit_bias_steers_greedy(llm):
    p = {"prompt_token_ids": [40, 41, 42]}
    forced = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True,
                            logit_bias={123: 100.0})
    assert llm.generate(p, forced)[0].token_ids == [123] * NEW
    greedy = llm.generate(p, GREEDY)[0].token_ids
    banned = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True,
                            logit_bias={greedy[0]: -100.0})
    assert llm.generate(p, banned)[0].token_ids[0] != greedy[0]


def test_a_request_that_raises_ends_alone(llm, alone, monkeypatch):
    real = Sampler._generator  # a seeded row's own work, on the host

    def faulty(self, seq):
        if seq.params.seed == 666 and len(seq.output_ids) == 1:
            raise RuntimeError("injected fault")
        return real(self, seq)

    monkeypatch.setattr(Sampler, "_generator", faulty)
    doomed = SamplingParams(max_tokens=NEW + 2, temperature=1.0, seed=666, ignore_eos=True)
    ref, bad, other = llm.generate(
        [REFERENCE, {"prompt_token_ids": [3, 4]}, {"prompt_token_ids": [9, 9, 9]}],
        [GREEDY, doomed, SamplingParams(max_tokens=NEW, temperature=0.5, seed=2,
                                        ignore_eos=True)])
    assert ref.token_ids == alone
    assert bad.finish_reason == "error" and isinstance(bad.error, RequestFailed)
    assert len(bad.token_ids) == 2  # the token before the fault, and the failed step's
    assert other.finish_reason == "length" and len(other.token_ids) == NEW
    assert _idle(llm)  # its KV was freed
    monkeypatch.undo()
    assert llm.generate(REFERENCE, GREEDY)[0].token_ids == alone


def test_sampler_never_sees_an_unusable_distribution():
    # the sampler alone, on rows no model gives: all -inf but one NaN, +inf ties
    from tr_engine.engine.sequence import Sequence

    sampler = Sampler(torch.device("cpu"))
    seq = Sequence(0, "r", [0], SamplingParams(temperature=1e-30, top_p=1e-46,
                                                repetition_penalty=1e-38), None)
    rows = torch.tensor([[float("nan"), 1.0, 2.0, 3.0],
                         [float("inf"), float("inf"), 0.0, -1.0],
                         [-3e38, 3e38, 3e38, 0.0]])
    tokens, _, errors = sampler(rows, [seq, seq, seq])
    assert errors == {} and tokens[0] == 3 and tokens[1] in (0, 1) and tokens[2] in (1, 2)


def test_the_batched_sampler_agrees_with_row_by_row():
    """One argmax and one log-softmax per logprobs value for the batch give what each row
    alone gives: tokens, chosen logprobs and alternatives (seeded rows draw the same)."""
    from tr_engine.engine.sequence import Sequence

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 50, generator=g) * 4
    logits[0, 7] = float("nan")  # rows that ask for no logprobs (theirs would be NaN)
    logits[5, 11] = float("inf")
    kinds = [dict(temperature=0), dict(temperature=0, logprobs=0),
             dict(temperature=0, logprobs=3), dict(temperature=0, logprobs=3),
             dict(temperature=0, logit_bias={4: 30.0}, logprobs=1),
             dict(temperature=0, repetition_penalty=1.3),
             dict(temperature=0.8, seed=5, logprobs=2), dict(temperature=0.8, seed=6),
             dict(temperature=0, logprobs=0)]
    seqs = [Sequence(i, f"r{i}", [1, 2, 4], SamplingParams(**k), None)
            for i, k in enumerate(kinds)]
    tokens, logprobs, errors = Sampler(torch.device("cpu"))(logits, seqs)
    assert errors == {}
    alone = Sampler(torch.device("cpu"))
    for i, seq in enumerate(seqs):
        assert tokens[i] == alone._sample_row(logits[i], seq), i
        top = seq.params.logprobs
        if top is None:
            assert logprobs[i] is None
            continue
        lp = torch.log_softmax(logits[i], -1)
        assert logprobs[i].token_id == tokens[i]
        assert logprobs[i].logprob == float(lp[tokens[i]])
        vals, ids = torch.topk(lp, top)
        assert logprobs[i].top == dict(zip(ids.tolist(), vals.tolist())), i
    assert tokens[4] == 4  # the bias decided it
