"""TR_ENGINE_STEP_TRACE: one JSON line per engine step, with its chunks, decode rows and
times; and the backend's count of kernel variants built after start-up."""

from __future__ import annotations

import json

from checkpoints import byte_ids, make_checkpoint
from tr_engine.backends import get_backend

from tr_engine import LLM, SamplingParams


def test_every_step_is_traced_with_its_work(tmp_path, monkeypatch):
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("TR_ENGINE_STEP_TRACE", str(path))
    ckpt = str(make_checkpoint("llama3.2", tmp_path / "ckpt"))
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    with LLM(ckpt, device="cpu", dtype="float32", prefill_chunk=32,
             max_num_batched_tokens=32) as llm:
        llm.generate([{"prompt_token_ids": byte_ids(70, 1)}], params)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    chunks = [c for r in rows for c in r["prefill"]]
    # the prompt in chunks of at most 32, in order, then 4 decode steps (the 5th token
    # comes from the last chunk)
    assert [c["start"] for c in chunks] == [0, 32, 64]
    assert sum(c["tokens"] for c in chunks) == 70
    assert [r["decode"] for r in rows if not r["prefill"]] == [1, 1, 1, 1]
    for r in rows:
        assert r["kind"] in ("prefill", "decode", "mixed")
        for part in ("idle", "schedule", "forward", "sample", "outputs"):
            assert r[f"{part}_ms"] >= 0
        assert r["builds"] == 0  # the CPU builds no kernel variants


def test_builds_after_start_up_count_as_late():
    backend = type(get_backend("cpu"))()  # a fresh one: the engines' may have started
    backend.count_build("a variant at start-up")
    assert backend.late_builds() == 0
    backend.started()
    backend.count_build("a variant on a request's path")
    backend.count_build("another")
    assert backend.late_builds() == 2 and backend.kernel_builds == 3


def test_a_step_line_says_what_garbage_collection_took(tmp_path):
    """gc_ms and gc: the time in collections since the previous step began and the oldest
    generation collected (-1: none)."""
    import gc
    from types import SimpleNamespace

    from tr_engine.engine.step_trace import StepTrace

    plan = SimpleNamespace(kind="decode", prefill=None, local=[], decode=None)
    trace = StepTrace(str(tmp_path / "steps.jsonl"), get_backend("cpu"))
    try:
        trace.begin()
        gc.collect(1)
        trace.end(plan)
        trace.begin()
        gc.collect()
        trace.end(plan)
        trace.begin()
        trace.end(plan)
    finally:
        trace.close()
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["gc"] for r in rows][:2] == [1, 2]
    assert rows[0]["gc_ms"] > 0 and rows[1]["gc_ms"] > 0
    assert rows[2]["gc_ms"] >= 0 and rows[2]["gc"] in (-1, 0)  # an automatic one, at most
    assert trace._on_gc not in gc.callbacks


def test_what_start_up_made_is_out_of_the_collectors_reach_until_shutdown(tmp_path):
    """A full collection during a step does not walk the engine's own objects (frozen once
    it has started); at shutdown they are given back to the collector."""
    import gc

    ckpt = str(make_checkpoint("llama3.2", tmp_path / "ckpt"))
    llm = LLM(ckpt, device="cpu", dtype="float32")
    engine = llm.engine
    try:
        tracked = {id(o) for o in gc.get_objects()}
        assert id(engine.scheduler) not in tracked and id(engine.cluster) not in tracked
        assert gc.get_freeze_count() > 0
    finally:
        llm.close()
    tracked = {id(o) for o in gc.get_objects()}
    assert id(engine.scheduler) in tracked
