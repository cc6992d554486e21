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
from checkpoints import FAMILIES, make_checkpoint
from conftest import record_error

from tr_engine import LLM, SamplingParams

PROMPT_LENS = (1, 3, 7, 13, 40)
NEW_TOKENS = 32
CHUNK = 16  # prefill_chunk: the 40-token prompt takes three chunks


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


@functools.cache
def hf_reference(path: str):
    """transformers' logits of the longest prompt and greedy continuation of each prompt."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # else it overrides ours and stops at EOS
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=None, bos_token_id=None)
    with torch.no_grad():
        logits = model(torch.tensor([prompts()[-1]])).logits[0]
        outs = [model.generate(torch.tensor([p]), generation_config=gen)[0, len(p):].tolist()
                for p in prompts()]
    return logits, outs


# Which checks run at which world size: logits on 1-3 ranks, generation on 1, 2 and 4.
WORLDS = [(f, p) for f in FAMILIES for p in (1, 2, 3, 4)]


@pytest.mark.parametrize("family,world", WORLDS, ids=[f"{f}-P{p}" for f, p in WORLDS])
def test_family_matches_transformers(ckpt_root, family, world):
    path = str(make_checkpoint(family, ckpt_root))
    ref_logits, ref_tokens = hf_reference(path)
    strategy = "ring" if family == "qwen2" else "tokenring"
    with LLM(path, device="cpu", world_size=world, dtype="float32", prefill_chunk=CHUNK,
             attention_strategy=strategy, kv_cache_tokens=1024) as llm:
        if world in (1, 2, 3):
            logits = llm.prompt_logits(prompts()[-1])
            err = (logits - ref_logits).abs()
            record_error(f"engine prefill logits P={world}", err.max().item(),
                         err.mean().item())
            assert err.max().item() < 1e-4, f"{family} P={world}: {err.max().item():.2e}"
        if world in (1, 2, 4):
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
            for n, out, ref in zip(PROMPT_LENS, outs, ref_tokens):
                assert out.token_ids == ref, f"{family} P={world}, prompt of {n} tokens"
                assert out.finish_reason == "length"
            assert llm.engine.scheduler.kv_used() == [0] * world
            assert llm.engine.scheduler.kv.reserved() == [0] * world
