"""The quantized KV cache (kv_cache_dtype fp8, fp8_e5m2, int8) on the CPU.

- The quantization itself: per token and KV head, within each format's error bound.
- The engine on 1, 2 and 3 gloo ranks against a float64 transformers forward that applies
  the same quantization to K and V where the engine reads them from the cache: a prompt
  chunk attends its own keys at full precision and every earlier key (earlier chunks, a
  cached prefix) as stored; a decode step attends every key as stored, its own included.
  Teacher-forced on the engine's own tokens, so the check measures the path (which key is
  read at which precision), not the format's error: the same forward without quantization
  is shown to be far off.
- Refusals: an unknown dtype, int8 on CUDA, fp8 on a card without it, fp8 on Ascend.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import Recorder, byte_ids, make_checkpoint
from conftest import record_error

from tr_engine import LLM, SamplingParams
from tr_engine.kv.cache import KVCache
from tr_engine.kv.quant import KV_CACHE_DTYPES, dequantize, kv_format, quantize, round_trip

# (largest relative error of a normal value, largest error of the smallest values as a
# multiple of the row's scale): fp8 rounds to 3 or 2 mantissa bits (subnormals to a fixed
# step), int8 to a step of one scale.
BOUNDS = {"fp8": (2**-4, 2**-10), "fp8_e5m2": (2**-3, 2**-17), "int8": (0.0, 0.5)}


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_round_trip_per_token_and_head_within_the_format_bound(name, dtype):
    g = torch.Generator().manual_seed(3)
    # rows of very different sizes (one per token and head), a row of zeros
    x = torch.randn(64, 3, 32, generator=g) * torch.logspace(-4, 4, 64)[:, None, None]
    x[5, 1] = 0
    x = x.to(dtype)
    fmt = kv_format(name)
    q, scale = quantize(x, fmt)
    assert q.dtype == fmt.storage and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:2]
    amax = x.double().abs().amax(-1)
    # each row spans the format: its largest value is stored at the format's largest
    assert torch.allclose(q.double().abs().amax(-1)[amax > 0], torch.tensor(fmt.max).double())
    back = dequantize(q, scale, torch.float64)
    rel, step = BOUNDS[name]
    bound = torch.maximum(rel * x.double().abs(), step * scale.double()[..., None])
    err = (back - x.double()).abs()
    # plus the float32 arithmetic of x / scale (values up to the format's max)
    bound = bound + 1e-6 * fmt.max * scale.double()[..., None] + 1e-30
    assert (err <= bound).all(), (err / bound).max()
    assert (back[5, 1] == 0).all() and scale[5, 1] == 1
    assert torch.equal(round_trip(x, kv_format("auto")), x)


def test_pool_holds_scales_beside_the_pages():
    fmt = kv_format("fp8")
    cache = KVCache(2, 4, 8, 3, 32, torch.float32, torch.device("cpu"), fmt)
    k_, v_, ks, vs = cache.tensors()
    assert k_.dtype == torch.float8_e4m3fn and ks.shape == (2, 33, 3)
    assert all(t.shape[:2] == (2, 33) for t in cache.tensors())
    kv, scales = KVCache.bytes_per_token(32, 8, 128, torch.bfloat16, fmt)
    assert (kv, scales) == (2 * 32 * 8 * 128, 2 * 32 * 8 * 4)
    assert sum(KVCache.bytes_per_token(32, 8, 128, torch.bfloat16)) / (kv + scales) > 1.9
    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, 3, 32, generator=g)
    v = torch.randn(5, 3, 32, generator=g)
    slots = torch.tensor([9, 2, 30, 31, 17])
    cache.store(1, slots, k, v)
    got_k, got_v = cache.gather(1, slots)
    assert torch.equal(got_k, round_trip(k, fmt)) and torch.equal(got_v, round_trip(v, fmt))
    cache.store(0, slice(3, 8), k, v)
    assert torch.equal(cache.gather(0, slice(3, 8))[0], round_trip(k, fmt))


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_pages_and_their_scales_come_back_from_the_host_tier_byte_equal(name):
    from tr_engine.backends import get_backend

    from tr_engine.kv.host_tier import HostTier
    from tr_engine.plan import PageCopy

    cpu = torch.device("cpu")
    cache = KVCache(2, 4, 8, 3, 32, torch.float32, cpu, kv_format(name))
    g = torch.Generator().manual_seed(1)
    for layer in range(2):
        cache.store(layer, slice(0, 32), torch.randn(32, 3, 32, generator=g) * 5,
                    torch.randn(32, 3, 32, generator=g))
    before = [t.clone() for t in cache.tensors()]
    tier = HostTier(cache, 3, get_backend("cpu"), cpu)
    assert cache.page_bytes() == 2 * 2 * 8 * 3 * (32 + 4)  # 8-bit K/V and float32 scales
    tier.copy([PageCopy(0, 1, 2, True), PageCopy(0, 3, 0, True)])  # pages 1, 3 out
    for t in cache.tensors():
        t[:, 8:16] = t[:, 24:32] = 0  # the pages reused meanwhile
    tier.copy([PageCopy(0, 3, 2, False), PageCopy(0, 1, 0, False)])  # back, swapped over
    swap = torch.tensor([*range(8), *range(24, 32), *range(16, 24), *range(8, 16), 32])
    for got, want in zip(cache.tensors(), before):
        assert torch.equal(_bytes(got), _bytes(_bytes(want)[:, swap]))


def _bytes(t):
    """fp8 as bytes (comparisons and indexing are not built for float8)."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def test_unknown_dtype_is_refused_naming_the_values():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        LLM(None, device="cpu", kv_cache_dtype="fp4")
    assert KV_CACHE_DTYPES == ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")


def test_cuda_refuses_int8_and_fp8_without_the_hardware():
    from tr_engine.backends.cuda import cuda_kv_cache_dtypes

    hopper = cuda_kv_cache_dtypes((9, 0))
    assert hopper == ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
    assert cuda_kv_cache_dtypes((8, 0)) == ("auto",)  # A100: no fp8 conversions


# ---- the engine against float64 ------------------------------------------------------
NEW = 8
BLOCK, CHUNK = 8, 16
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=0)


class Reference:
    """transformers' model in float64 whose attention reads K and V as the engine's cache
    would: for query position i, keys before `starts[i]` round-tripped through `fmt`,
    keys from `starts[i]` to i as computed."""

    def __init__(self, path: str) -> None:
        from transformers import AttentionInterface, AutoModelForCausalLM

        AttentionInterface.register("kv_quant_reference", self._attention)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, attn_implementation="kv_quant_reference").eval()
        self.fmt, self.starts = kv_format("auto"), None

    def _attention(self, module, query, key, value, attention_mask, scaling=None,
                   dropout=0.0, **kwargs):
        # query [1, Hq, T, D], key/value [1, Hkv, T, D]: the whole sequence
        q, k, v = query[0], key[0].transpose(0, 1), value[0].transpose(0, 1)  # k [T, Hkv, D]
        kq = round_trip(k, self.fmt).transpose(0, 1)  # [Hkv, T, D]
        vq = round_trip(v, self.fmt).transpose(0, 1)
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        g = q.shape[0] // k.shape[0]
        k, v, kq, vq = (x.repeat_interleave(g, dim=0) for x in (k, v, kq, vq))
        t = q.shape[1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        start = torch.tensor(self.starts)[:, None]
        fresh = (j >= start) & (j <= i)
        stored = j < start
        s = torch.where(fresh, q @ k.transpose(-1, -2), q @ kq.transpose(-1, -2)) * scaling
        s = s.masked_fill(~(fresh | stored), float("-inf"))
        p = torch.softmax(s, dim=-1)
        out = (p * fresh) @ v + (p * stored) @ vq  # [Hq, T, D]
        return out.transpose(0, 1).unsqueeze(0), None

    def logprobs(self, tokens: list[int], starts: list[int], fmt) -> torch.Tensor:
        """log-softmax `[T, V]` float64 of every position of `tokens`."""
        self.fmt, self.starts = fmt, starts
        with torch.no_grad():
            return torch.log_softmax(self.model(torch.tensor([tokens])).logits[0], -1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def reference(ckpt):
    return Reference(ckpt)


CASES = [(name, p) for name in ("fp8", "int8") for p in (1, 2, 3)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-P{p}" for n, p in CASES])
def llm(request, ckpt):
    name, world = request.param
    with LLM(ckpt, device="cpu", world_size=world, dtype="float32", kv_cache_dtype=name,
             block_size=BLOCK, prefill_chunk=CHUNK, kv_cache_tokens=256, max_model_len=128,
             shard_min_tokens=0) as engine:
        yield engine


def chunk_starts(plans) -> list[int]:
    """Where each prompt chunk of the plans began (one request at a time)."""
    return [p.start for plan in plans for p in [plan.prefill, *plan.local] if p is not None]


def starts_of(prompt_len: int, chunks: list[int], total: int) -> list[int]:
    """Per position, the first key it attends as computed: its chunk's start for a prompt
    position, past itself (none) for a generated one."""
    return [max(s for s in chunks if s <= i) if i < prompt_len else i + 1
            for i in range(total)]


# float32 against float64, and now and then one value that rounds to the other neighbour
# of the format (engine and reference compute K in different precisions): up to 3.3e-4
# seen; without quantization the reference is 4e-3 (int8) to 5e-2 (fp8) off
TOL = 1e-3


def check(reference, out, prompt, chunks, fmt, label) -> float:
    """The engine's tokens and logprobs against the reference's; returns the error of the
    same forward without quantization (what the check tells apart)."""
    tokens = list(out.token_ids)
    starts = starts_of(len(prompt), chunks, len(prompt) + len(tokens))
    rows = torch.arange(len(tokens))
    lp = reference.logprobs(prompt + tokens, starts, fmt)[len(prompt) - 1 : -1]
    want = lp[rows, tokens]
    got = torch.tensor([e.logprob for e in out.outputs[0].logprobs], dtype=torch.float64)
    err = (got - want).abs()
    record_error(f"engine {label} vs float64, same quantization", err.max().item(),
                 err.mean().item())
    assert err.max() < TOL, f"{label}: {err.max().item():.2e}"
    # greedy: each token is the reference's most likely, up to the same tolerance
    assert (lp.max(-1).values - want).max() < TOL, label
    plain = reference.logprobs(prompt + tokens, starts, kv_format("auto"))[len(prompt) - 1 : -1]
    return (got - plain[rows, tokens]).abs().max().item()


def test_decode_and_follow_up_match_float64_with_the_same_quantization(llm, reference):
    name, world = llm.config.kv_cache_dtype, llm.config.world_size
    fmt = kv_format(name)
    llm.engine.reset_prefix_cache()
    doc = byte_ids(100, 11)  # in chunks: the later ones attend the earlier as stored
    follow = doc + byte_ids(12, 12)
    first, second, doc_chunks, follow_chunks = _document_then_follow_up(llm, doc, follow)
    assert len(doc_chunks) >= 3  # chunks are padded to 2 x world blocks: 16, 32, 48 tokens
    assert second.num_cached_tokens == 96 and follow_chunks == [96]
    off = check(reference, first, doc, doc_chunks, fmt, f"{name} P{world} decode")
    # the follow-up's prefix was computed as the document's chunks were
    off2 = check(reference, second, follow, doc_chunks + follow_chunks, fmt,
                 f"{name} P{world} follow-up")
    print(f"{name} P{world}: without quantization the reference is off by {off:.2e}, "
          f"{off2:.2e}")
    assert min(off, off2) > 3 * TOL  # the check tells quantized reads from plain ones


def _document_then_follow_up(llm, doc: list[int], follow: list[int]):
    """Greedy outputs of `doc`, then of `follow`, and the starts of each one's prefill chunks
    (from the recorded plans)."""
    recorder = Recorder(llm.engine.scheduler)
    try:
        first = llm.generate([{"prompt_token_ids": doc}], GREEDY)[0]
        doc_chunks = chunk_starts(recorder.plans)
        recorder.plans.clear()
        second = llm.generate([{"prompt_token_ids": follow}], GREEDY)[0]
        return first, second, doc_chunks, chunk_starts(recorder.plans)
    finally:
        recorder.close()


def test_a_long_prefix_is_read_in_pieces_on_one_rank(llm, reference, monkeypatch):
    """The local strategy dequantizes a long prefix piece by piece (pieces of 16 keys here,
    128K in service): the same result as the reference."""
    from tr_engine.worker import model_runner

    if llm.config.world_size != 1:
        pytest.skip("pieces are the local strategy's, on one rank")
    monkeypatch.setattr(model_runner, "PREFIX_PIECE", 16)
    monkeypatch.setattr(model_runner, "PREFIX_PIECE_BYTES", 1)
    calls = []
    monkeypatch.setattr(model_runner.PrefillContext, "_local_over_pieces",
                        _counting(model_runner.PrefillContext._local_over_pieces, calls))
    name = llm.config.kv_cache_dtype
    llm.engine.reset_prefix_cache()
    doc = byte_ids(100, 21)
    follow = doc + byte_ids(9, 22)
    _, out, doc_chunks, follow_chunks = _document_then_follow_up(llm, doc, follow)
    assert out.num_cached_tokens == 96 and calls  # 96 cached keys in 6 pieces
    check(reference, out, follow, doc_chunks + follow_chunks, kv_format(name),
          f"{name} P1 prefix in pieces")


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped
