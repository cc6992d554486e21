"""A quantized KV cache through the host tier on 2 gloo ranks: a document's fp8 pages evicted
to host memory and restored with their scales; the follow-up against the float64 reference
of tests/test_kv_quant.py (the document read as first stored). A module of its own: one
engine of several ranks per process at a time."""

from __future__ import annotations

import pytest
from checkpoints import Recorder, byte_ids, make_checkpoint
from test_kv_quant import BLOCK, GREEDY, Reference, check, chunk_starts

from tr_engine import LLM
from tr_engine.kv.quant import kv_format


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def reference(ckpt):
    return Reference(ckpt)


def test_a_document_back_from_the_host_tier_reads_as_it_was_stored(ckpt, reference):
    """fp8 pages evicted to host memory and restored with their scales: the follow-up equals
    the float64 reference that reads the document as first stored (2 ranks)."""
    from tr_engine.kv.block_manager import block_keys

    fmt, doc_len = kv_format("fp8"), 64
    with LLM(ckpt, device="cpu", world_size=2, dtype="float32", kv_cache_dtype="fp8",
             block_size=BLOCK, prefill_chunk=32, kv_cache_tokens=80, max_model_len=128,
             shard_min_tokens=0, kv_offloading_size=2**-10) as llm:
        s = llm.engine.scheduler
        recorder = Recorder(s)
        try:
            docs = [byte_ids(doc_len, 30 + i) for i in range(4)]  # the pool holds two
            llm.generate([{"prompt_token_ids": docs[0]}], GREEDY)
            doc_chunks = chunk_starts(recorder.plans)
            for d in docs[1:]:
                llm.generate([{"prompt_token_ids": d}], GREEDY)
            assert len(s.blocks.lookup(block_keys(docs[0], BLOCK))) < doc_len // BLOCK
            restored = s.blocks.pages_restored
            recorder.plans.clear()
            follow = docs[0] + byte_ids(7, 40)
            out = llm.generate([{"prompt_token_ids": follow}], GREEDY)[0]
            follow_chunks = chunk_starts(recorder.plans)
        finally:
            recorder.close()
        assert out.num_cached_tokens == doc_len and s.blocks.pages_restored > restored
    check(reference, out, follow, doc_chunks + follow_chunks, fmt, "fp8 P2 host tier")
