"""The embedded model (SmolLM2-135M-Instruct, real weights) with an fp8 KV cache against
`auto`, through decode: at least as close as docs/serving.md's table says (the floor there,
measured by benchmarks/kv_quant.py at 8 tokens on one rank), teacher-forced along `auto`'s
greedy continuations of the six fixed prompts; and the pass-key test with its haystack read
from the prefix cache, fp8 and int8 finding every key `auto` finds."""

from __future__ import annotations

import pytest
from kv_measures import agreement, chat_prompts, forced, greedy, pass_keys

from tr_engine import LLM

NEW = 8
# docs/serving.md, one rank, 8 tokens: fp8 mean |Δ logprob| 0.038, top-1 97.9% (47 of 48);
# the floors leave room for float32 rounding that differs with the thread count
MAX_DLOGPROB, MIN_TOP1 = 0.045, 0.95


def test_fp8_agrees_with_auto_on_the_embedded_model():
    pytest.importorskip("gguf")
    with LLM(None, device="cpu", dtype="float32") as llm:
        prompts = chat_prompts(llm)
        ref = greedy(llm, prompts, NEW)
    with LLM(None, device="cpu", dtype="float32", kv_cache_dtype="fp8") as llm:
        row = agreement(ref, greedy(llm, prompts, NEW), forced(llm, prompts, ref))
    assert row["dlogprob"] <= MAX_DLOGPROB and row["top1"] >= MIN_TOP1, row


def test_pass_keys_are_found_in_a_cached_haystack():
    """The haystack comes from the prefix cache (all but the question's blocks); the key is in
    the answer with `auto` (the model can: a check of the test), and with fp8 and int8."""
    pytest.importorskip("gguf")
    for name in ("auto", "fp8", "int8"):
        with LLM(None, device="cpu", dtype="float32", kv_cache_dtype=name) as llm:
            block = llm.engine.config.block_size
            for hit, cached, length in pass_keys(llm):
                assert hit, (name, cached, length)
                assert cached >= length - 2 * block, (name, cached, length)
