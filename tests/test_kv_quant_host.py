"""A quantized KV cache through the host tier and preemption on 2 gloo ranks, one engine for
the module (one engine of several ranks per process at a time), against the float64
reference of tests/test_kv_quant.py that reads each key as the engine stored it:
- a document's fp8 pages evicted to host memory and restored with their scales: the
  follow-up reads the document as first stored;
- requests that outgrow the pool: preempted, their surviving blocks evicted to the host
  tier and brought back when they resume, the rest recomputed; every token's logprob is what
  the keys stored at the time it was sampled give."""

from __future__ import annotations

import pytest
import torch
from checkpoints import Recorder, byte_ids, make_checkpoint
from conftest import record_error
from test_kv_quant import BLOCK, GREEDY, TOL, Reference, check, chunk_starts

from tr_engine import LLM, SamplingParams
from tr_engine.kv.quant import kv_format

FMT = kv_format("fp8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def reference(ckpt):
    return Reference(ckpt)


@pytest.fixture(scope="module")
def llm(ckpt):
    # 10 blocks of 8 a rank: two 64-token documents
    with LLM(ckpt, device="cpu", world_size=2, dtype="float32", kv_cache_dtype="fp8",
             block_size=BLOCK, prefill_chunk=32, kv_cache_tokens=80, max_model_len=128,
             shard_min_tokens=0, kv_offloading_size=2**-10) as engine:
        yield engine


def test_a_document_back_from_the_host_tier_reads_as_it_was_stored(llm, reference):
    """fp8 pages evicted to host memory and restored with their scales: the follow-up equals
    the float64 reference that reads the document as first stored (2 ranks)."""
    from tr_engine.kv.block_manager import block_keys

    doc_len = 64
    llm.engine.reset_prefix_cache()
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
    check(reference, out, follow, doc_chunks + follow_chunks, FMT, "fp8 P2 host tier")


def sampled_starts(plans, seq_id: int) -> dict[int, list[int]]:
    """For each position at which `seq_id` sampled a token: per earlier position, the first
    key the computation now stored there attended as computed (its chunk's start; past
    itself for a decode step). The last computation of a position wins: a resume's prefill
    recomputes what was not cached, and what was cached keeps its first computation."""
    starts: dict[int, int] = {}
    sampled = {}
    for plan in plans:
        for p in [plan.prefill, *plan.local]:
            if p is not None and p.seq_id == seq_id:
                end = p.start + len(p.tokens)
                starts.update({i: p.start for i in range(p.start, end)})
                if p.sample:
                    sampled[end - 1] = [starts[i] for i in range(end)]
        if plan.decode is not None and seq_id in plan.decode.seq_ids:
            pos = plan.decode.positions[plan.decode.seq_ids.index(seq_id)]
            starts[pos] = pos + 1
            sampled[pos] = [starts[i] for i in range(pos + 1)]
    return sampled


def test_preempted_requests_read_their_keys_as_stored_through_the_host_tier(llm, reference):
    engine = llm.engine
    engine.reset_prefix_cache()
    s = engine.scheduler
    new = 40
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [byte_ids(24 + 4 * i, 300 + i) for i in range(6)]  # 64-84 tokens each at the end
    before, restored = s.num_preemptions, s.blocks.pages_restored
    recorder = Recorder(s)
    try:
        seqs = [engine.add_request(f"p{i}", p, params) for i, p in enumerate(prompts)]
        final = {}
        while engine.has_work():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
    finally:
        recorder.close()
    preempted = [q for q in seqs if q.preemptions]
    assert preempted and s.num_preemptions > before and s.blocks.pages_restored > restored
    for seq, prompt in zip(seqs, prompts):
        out = final[seq.request_id]
        tokens = list(out.token_ids)
        assert len(tokens) == new
        got = torch.tensor([e.logprob for e in out.outputs[0].logprobs], dtype=torch.float64)
        by_position = sampled_starts(recorder.plans, seq.seq_id)
        want = torch.empty(new, dtype=torch.float64)
        for j, token in enumerate(tokens):
            q = len(prompt) + j - 1
            starts = by_position[q] + [i + 1 for i in range(q + 1, len(prompt) + new)]
            lp = reference.logprobs(prompt + tokens, starts, FMT)
            want[j] = lp[q, token]
            assert lp[q].max() - want[j] < TOL, (seq.request_id, j)  # greedy, up to TOL
        err = (got - want).abs()
        record_error("engine fp8 P2 preempted vs float64, keys as stored", err.max().item(),
                     err.mean().item())
        assert err.max() < TOL, (seq.request_id, err.max().item(), seq.preemptions)
