"""Sampling through the engine, on one CPU rank and on two gloo ranks (a small random
checkpoint): a seeded request's tokens are the same alone and in a batch of 32 requests of
mixed parameters, on either, and greedy decoding with penalties follows transformers (its
repetition_penalty) and OpenAI's presence/frequency formula on the model's own logits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from checkpoints import byte_ids, make_checkpoint

from tr_engine import LLM, SamplingParams

NEW = 8
TARGET = SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.9, top_k=60, min_p=0.01,
                        repetition_penalty=1.1, seed=4321, ignore_eos=True)
KINDS = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.8),
         dict(temperature=1.2, top_k=20, seed=7), dict(temperature=0, repetition_penalty=1.3),
         dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5, logprobs=3),
         dict(temperature=1.0, min_p=0.2, logit_bias={65: 5.0}), dict(temperature=0.5,
                                                                      seed=8, logprobs=0)]
ALONE: dict[int, list[int]] = {}  # the target's tokens alone, by world size


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module", params=[1, 2], ids=["1-rank", "2-ranks"])
def llm(request, path):
    with LLM(str(path), device="cpu", world_size=request.param, dtype="float32",
             max_model_len=128, kv_cache_tokens=4096, max_num_seqs=32) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_a_seeded_request_is_the_same_alone_and_in_a_mixed_batch(llm):
    prompt = {"prompt_token_ids": byte_ids(12, 1)}
    alone = llm.generate(prompt, TARGET)[0].token_ids
    prompts = [{"prompt_token_ids": byte_ids(3 + i % 9, 100 + i)} for i in range(31)]
    params = [SamplingParams(max_tokens=NEW - i % 3, ignore_eos=True, **KINDS[i % len(KINDS)])
              for i in range(31)]
    outs = llm.generate(prompts[:17] + [prompt] + prompts[17:],
                        params[:17] + [TARGET] + params[17:])
    assert outs[17].token_ids == alone and len(alone) == NEW
    ALONE[llm.config.world_size] = alone
    assert alone == ALONE.get(1, alone)  # and on one rank (whose tests run first)
    assert all(o.finish_reason == "length" for o in outs)
    other = llm.generate(prompt, SamplingParams(**{**_fields(TARGET), "seed": 1}))[0]
    assert other.token_ids != alone  # the seed decides


def _fields(p: SamplingParams) -> dict:
    return dict(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                seed=p.seed, ignore_eos=True)


@pytest.mark.parametrize("penalty", [1.5, 0.6])
def test_repetition_penalty_follows_transformers(llm, hf, penalty):
    from transformers import GenerationConfig

    prompt = byte_ids(10, 2) + byte_ids(10, 2)  # repeats, so the penalty bites
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        max_tokens=12, temperature=0, repetition_penalty=penalty, ignore_eos=True))[0]
    gen = GenerationConfig(max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                           eos_token_id=None, pad_token_id=None, bos_token_id=None)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), generation_config=gen)[0, len(prompt):]
    assert got.token_ids == want.tolist()
    plain = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert plain.token_ids != got.token_ids  # the penalty changed something


def test_presence_and_frequency_penalties_follow_openai(llm, hf):
    prompt = byte_ids(9, 3)
    presence, frequency = 0.8, 1.3
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        max_tokens=12, temperature=0, presence_penalty=presence,
        frequency_penalty=frequency, ignore_eos=True))[0].token_ids
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
            for t, c in Counter(want).items():  # OpenAI: generated tokens only
                logits[t] -= c * frequency + presence
            want.append(int(torch.argmax(logits)))
            ids.append(want[-1])
    assert got == want
