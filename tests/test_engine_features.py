"""Engine behaviour on two gloo ranks: batching, sampling, stop strings, aborts, refusals;
and the embedded SmolLM2 model against transformers."""

from __future__ import annotations

import pytest
import torch
from checkpoints import make_checkpoint

from tr_engine import LLM, SamplingParams
from tr_engine.errors import RequestTooLong
from tr_engine.sampling_params import InvalidParameter

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt"))
    with LLM(str(path), device="cpu", world_size=2, dtype="float32", prefill_chunk=16,
             kv_cache_tokens=100, max_model_len=256) as engine:
        yield engine


def ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tokens(out):
    return out.token_ids


def test_batch_equals_each_alone(llm):
    prompts = [{"prompt_token_ids": ids(n, n)} for n in (2, 9, 30, 17)]
    together = [tokens(o) for o in llm.generate(prompts, GREEDY)]
    alone = [tokens(llm.generate(p, GREEDY)[0]) for p in prompts]
    assert together == alone
    assert all(len(t) == 24 for t in together)


def test_seeded_sampling_is_reproducible(llm):
    p = {"prompt_token_ids": ids(11, 1)}
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                        ignore_eos=True)
    first = tokens(llm.generate(p, sp)[0])
    # the same seed again, this time beside other requests in the batch
    others = [{"prompt_token_ids": ids(5, s)} for s in (2, 3)]
    batch = llm.generate([others[0], p, others[1]],
                         [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), sp,
                          SamplingParams(max_tokens=7, temperature=0.7, ignore_eos=True)])
    assert tokens(batch[1]) == first
    other_seed = tokens(llm.generate(p, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9,
                                                       top_k=50, seed=99, ignore_eos=True))[0])
    assert other_seed != first


def test_penalties_and_filters_change_sampling(llm):
    p = {"prompt_token_ids": ids(6, 4)}
    base = tokens(llm.generate(p, GREEDY)[0])
    rep = tokens(llm.generate(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                repetition_penalty=5.0))[0])
    freq = tokens(llm.generate(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                 frequency_penalty=2.0, presence_penalty=2.0)
                               )[0])
    assert rep != base and freq != base
    # top_k = 1 is greedy whatever the temperature
    top1 = tokens(llm.generate(p, SamplingParams(max_tokens=24, temperature=5.0, top_k=1,
                                                 ignore_eos=True, seed=3))[0])
    assert top1 == base


def test_logprobs(llm):
    out = llm.generate({"prompt_token_ids": ids(8, 5)},
                       SamplingParams(max_tokens=5, temperature=0, logprobs=3,
                                      ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5
    for tok, lp in zip(out.token_ids, lps):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3
        assert max(lp.top.values()) == pytest.approx(lp.logprob)  # greedy picks the top one


def test_stop_strings_and_tokens(llm):
    p = {"prompt_token_ids": ids(10, 6)}
    full = llm.generate(p, GREEDY)[0]
    text = full.text
    cut = len(text) // 2
    stop = text[cut : cut + 2]
    first = text.find(stop)
    out = llm.generate(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                         stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == text[:first]
    kept = llm.generate(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                          stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.text == text[: first + len(stop)]
    token = full.token_ids[5]
    out = llm.generate(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                         stop_token_ids=[token]))[0]
    n = full.token_ids.index(token) + 1
    assert out.token_ids == full.token_ids[:n] and out.outputs[0].stop_reason == token


def test_abort_frees_kv(llm):
    engine = llm.engine
    engine.add_request("a", ids(30, 7), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", ids(3, 8), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert sum(engine.scheduler.kv_used()) > 30
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    engine.abort("b")
    assert engine.scheduler.kv_used() == [0, 0] and engine.scheduler.blocks.reserved() == [0, 0]
    assert not engine.has_work()
    assert engine.abort("a") is None  # already gone


def test_refusals_leave_the_engine_serving(llm):
    with pytest.raises(RequestTooLong, match=r"256 tokens.*250 in the prompt \+ 10"):
        llm.generate({"prompt_token_ids": ids(250, 9)}, SamplingParams(max_tokens=10))
    # 100 tokens per rank hold 6 blocks of 16: 192 tokens on the two ranks
    with pytest.raises(RequestTooLong, match=r"KV cache holds 192 tokens.*needs 240"):
        llm.generate({"prompt_token_ids": ids(200, 9)}, SamplingParams(max_tokens=40))
    with pytest.raises(InvalidParameter, match="token ids"):
        llm.generate({"prompt_token_ids": [1, 2, 10**6]}, GREEDY)
    with pytest.raises(InvalidParameter, match="max_tokens"):
        SamplingParams(max_tokens=0)
    # a refused request in a batch refuses the batch before any of it starts
    with pytest.raises(RequestTooLong):
        llm.generate([{"prompt_token_ids": ids(5, 1)}, {"prompt_token_ids": ids(250, 1)}],
                     SamplingParams(max_tokens=10))
    assert llm.engine.scheduler.kv_used() == [0, 0] and not llm.engine.has_work()
    assert len(llm.generate({"prompt_token_ids": ids(5, 1)}, GREEDY)[0].token_ids) == 24


def test_string_prompts_and_chat(llm):
    out = llm.generate("hello there", GREEDY)[0]
    assert out.prompt == "hello there" and len(out.token_ids) == 24
    by_ids = llm.generate({"prompt_token_ids": llm.tokenizer.encode("hello there")}, GREEDY)[0]
    assert by_ids.token_ids == out.token_ids
    chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY)[0]
    expect = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                               add_generation_prompt=True, tokenize=False)
    assert llm.tokenizer.decode(chat.prompt_token_ids) == expect


def test_one_rank_engine_beside_a_two_rank_one(llm, tmp_path):
    """A one-rank engine never touches the process group of the two-rank engine beside it,
    and a second multi-rank engine in the same process is refused clearly."""
    path = make_checkpoint("llama3.1", tmp_path)
    p = {"prompt_token_ids": ids(9, 11)}
    with LLM(str(path), device="cpu", world_size=1, dtype="float32") as solo:
        assert tokens(solo.generate(p, GREEDY)[0]) == tokens(llm.generate(p, GREEDY)[0])
    with pytest.raises(RuntimeError, match="already initialized"):
        LLM(str(path), device="cpu", world_size=2, dtype="float32")
    assert len(tokens(llm.generate(p, GREEDY)[0])) == 24  # the first engine still serves


def test_prompt_logprobs_match_the_prompt_logits(llm):
    # 40 tokens in chunks of 16: the logprobs of every chunk, each scored where it ran
    prompt = ids(40, 11)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2,
                                      ignore_eos=True))[0]
    ref = torch.log_softmax(llm.prompt_logits(prompt), dim=-1)
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    for i, lp in enumerate(lps[1:]):
        assert lp.token_id == prompt[i + 1]
        assert abs(lp.logprob - float(ref[i, prompt[i + 1]])) < 1e-4
        assert set(lp.top) == set(torch.topk(ref[i], 2).indices.tolist())
    # and the generated tokens are those of a request without them
    plain = llm.generate({"prompt_token_ids": prompt},
                         SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == plain.token_ids and plain.prompt_logprobs is None
