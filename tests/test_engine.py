"""The engine against Hugging Face transformers: prefill logits and greedy generation of
every supported family on 1-4 gloo ranks, float32 on the CPU.

Each (family, world size) starts one engine (its rank processes once) and runs all of its
cases in it. Prompts include lengths that are not a multiple of 2P and prompts shorter
than 2P; prefill_chunk is small so long prompts are prefilled in several chunks, each
attending to the KV the earlier chunks left on every rank.
"""

from __future__ import annotations

import functools

import pytest
import torch
from checkpoints import FAMILIES, PROMPT_LENS, hf_greedy, make_checkpoint, sample_prompts
from conftest import record_error

from tr_engine import LLM, SamplingParams

NEW_TOKENS = 32
CHUNK = 16  # prefill_chunk: the 40-token prompt takes three chunks


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@functools.cache
def hf_reference(path: str):
    """transformers' logits of the longest prompt and greedy continuation of each prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([sample_prompts()[-1]])).logits[0]
    return logits, hf_greedy(model, sample_prompts(), NEW_TOKENS)


# Which checks run at which world size: logits on 1-3 ranks, generation on 1, 2 and 4.
WORLDS = [(f, p) for f in FAMILIES for p in (1, 2, 3, 4)]


@pytest.mark.parametrize("family,world", WORLDS, ids=[f"{f}-P{p}" for f, p in WORLDS])
def test_family_matches_transformers(ckpt_root, family, world):
    path = str(make_checkpoint(family, ckpt_root))
    ref_logits, ref_tokens = hf_reference(path)
    strategy = "ring" if family == "qwen2" else "tokenring"
    with LLM(path, device="cpu", world_size=world, dtype="float32", prefill_chunk=CHUNK,
             attention_strategy=strategy, kv_cache_tokens=1024, shard_min_tokens=0) as llm:
        if world in (1, 2, 3):
            logits = llm.prompt_logits(sample_prompts()[-1])
            err = (logits - ref_logits).abs()
            record_error(f"engine prefill logits P={world}", err.max().item(),
                         err.mean().item())
            assert err.max().item() < 1e-4, f"{family} P={world}: {err.max().item():.2e}"
        if world in (1, 2, 4):
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in sample_prompts()], params)
            for n, out, ref in zip(PROMPT_LENS, outs, ref_tokens):
                assert out.token_ids == ref, f"{family} P={world}, prompt of {n} tokens"
                assert out.finish_reason == "length"
            assert llm.engine.scheduler.kv_used() == [0] * world
            assert llm.engine.scheduler.blocks.reserved() == [0] * world
        workers = list(llm.engine.cluster.procs)
    # every other rank left by itself at shutdown (a rank that had to be killed shows -9)
    assert [p.exitcode for p in workers] == [0] * (world - 1)
