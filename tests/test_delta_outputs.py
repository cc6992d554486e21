"""What the engine hands back, through AsyncEngine on one CPU rank (a small random
checkpoint): each output holds one step's delta, whatever the length so far; the deltas
concatenate to the whole output a non-streamed request gets at its end; a reader that stops
reading is aborted once its bound of outputs waits, its KV freed; and the tokenizer is never
shared between threads (chat templates, encodes and detokenizing, all at once)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from checkpoints import byte_ids, make_checkpoint

from tr_engine import SamplingParams
from tr_engine.config import EngineConfig
from tr_engine.engine.async_engine import AsyncEngine
from tr_engine.errors import ReaderTooSlow

BOUND = 64  # far more than a reader that keeps reading ever lags (steps are ms here)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt"))
    mp = pytest.MonkeyPatch()
    mp.setenv("TR_ENGINE_MAX_QUEUED_OUTPUTS", str(BOUND))
    e = AsyncEngine.start(EngineConfig(model=str(path), device="cpu", world_size=1,
                                       dtype="float32", max_model_len=512,
                                       kv_cache_tokens=1024))
    mp.undo()
    yield e
    e.shutdown()


def run(engine, request_id, ids, params, read_delay=0.0):
    async def go():
        outs = []
        async for out in engine.generate(request_id, ids, params):
            outs.append(out)
            if read_delay:
                await asyncio.sleep(read_delay)
        return outs
    return asyncio.run(go())


def _idle(engine, wait_s: float = 10.0) -> bool:
    """No request left and no KV in use, within `wait_s` (the stats follow each step)."""
    end = time.time() + wait_s
    while True:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and sum(s.kv_used_tokens) == 0:
            return True
        if time.time() > end:
            return False
        time.sleep(0.02)


def check_deltas(outs, kind: str, longest_stop: int = 0):
    """Each output's delta is one step's (a token, its text, its logprob); the whole
    view comes only in the last output of a "final" request."""
    for j, out in enumerate(outs):
        c = out.outputs[0]
        last = j == len(outs) - 1
        assert len(c.delta_token_ids) <= 1 and len(c.delta_logprobs or ()) <= 1
        # a token's text (the first may finish the prompt's last bytes), and what was held
        assert len(c.delta_text) <= 8 + longest_stop
        assert c.num_tokens == sum(len(o.outputs[0].delta_token_ids) for o in outs[: j + 1])
        if not (last and kind == "final"):
            assert c.text == "" and c.token_ids == [] and not c.logprobs
    return ("".join(o.outputs[0].delta_text for o in outs),
            [t for o in outs for t in o.outputs[0].delta_token_ids],
            [lp for o in outs for lp in o.outputs[0].delta_logprobs or ()])


def test_streamed_deltas_concatenate_to_the_whole_output(engine):
    ids = byte_ids(9, 3)
    base = dict(max_tokens=80, temperature=0, ignore_eos=True, logprobs=2)
    final = run(engine, "f", ids, SamplingParams(**base))
    delta = run(engine, "d", ids, SamplingParams(**base, output_kind="delta"))
    whole = final[-1].outputs[0]
    assert check_deltas(final, "final") == (whole.text, whole.token_ids, whole.logprobs)
    text, tokens, lps = check_deltas(delta, "delta")
    assert (text, tokens) == (whole.text, whole.token_ids) and len(tokens) == 80
    assert [(e.token_id, e.logprob, e.top) for e in lps] == \
        [(e.token_id, e.logprob, e.top) for e in whole.logprobs]
    # a stop string from the middle of that text: held back, never handed out, cut at
    stop = whole.text[30:33]
    cut = whole.text[: whole.text.index(stop)]
    for kind in ("final", "delta"):
        outs = run(engine, f"s-{kind}", ids, SamplingParams(**base, stop=[stop, "\x00\x01"],
                                                            output_kind=kind))
        text, _, _ = check_deltas(outs, kind, longest_stop=3)
        assert text == cut and outs[-1].outputs[0].stop_reason == stop
        assert outs[-1].outputs[0].text == (cut if kind == "final" else "")
    assert _idle(engine)


def test_a_reader_that_stops_reading_is_aborted(engine):
    ids = byte_ids(5, 4)
    params = SamplingParams(max_tokens=240, temperature=0, ignore_eos=True,
                            output_kind="delta")

    async def go():
        slow = engine.generate("slow", ids, params)
        fast = engine.generate("fast", byte_ids(6, 5), SamplingParams(
            max_tokens=40, temperature=0, ignore_eos=True))
        first = await anext(slow)
        got_fast = [out async for out in fast]  # meanwhile `slow` is not read
        for _ in range(600):
            if _idle(engine, 0):
                break
            await asyncio.sleep(0.05)
        assert _idle(engine, 0)  # aborted: its KV is free, long before its 240 tokens
        rest = []
        with pytest.raises(ReaderTooSlow):
            async for out in slow:
                rest.append(out)
        return first, got_fast, rest

    first, got_fast, rest = asyncio.run(go())
    assert len(first.outputs[0].delta_token_ids) == 1
    assert len(rest) <= BOUND  # what waited, then the error
    assert got_fast[-1].finished and got_fast[-1].outputs[0].num_tokens == 40


def test_the_tokenizer_is_never_shared_between_threads(engine):
    messages = [[{"role": "user", "content": f"question {i} " * (i + 1)}] for i in range(8)]
    texts = [f"some text {i}, ünïcode ✓ {'x' * (50 * i)}" for i in range(8)]
    want_chat = [engine.encode_chat(m) for m in messages]
    tok = engine.tokenizer
    want_enc = [tok.encode(t) for t in texts]
    want_dec = [tok.decode(ids) for ids in want_enc]
    seen, errors = [], []  # each thread's tokenizer (kept alive, so ids stay distinct)

    def work(n: int) -> None:
        try:
            mine = engine.tokenizer
            seen.append(mine)
            for r in range(30):
                i = (n + r) % 8
                assert engine.encode_chat(messages[i]) == want_chat[i]
                # a truncating encode changes the tokenizer's settings: the call that makes
                # a shared tokenizer raise "Already borrowed" beside another thread's use
                assert mine.encode(texts[i], truncation=True, max_length=5) == want_enc[i][:5]
                assert mine.encode(texts[i]) == want_enc[i]
                assert mine.decode(want_enc[i]) == want_dec[i]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    start = time.time()
    for t in threads:
        t.start()
    # the engine's thread detokenizes streams meanwhile
    outs = run(engine, "during", byte_ids(7, 6), SamplingParams(max_tokens=60, temperature=0,
                                                               ignore_eos=True))
    for t in threads:
        t.join(120)
    assert errors == [] and time.time() - start < 120
    assert len({id(t) for t in seen}) == len(threads)  # one tokenizer each
    assert id(tok) not in {id(t) for t in seen}
    assert outs[-1].outputs[0].text == tok.decode(outs[-1].outputs[0].token_ids)
