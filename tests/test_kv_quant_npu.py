"""The int8 KV cache on the NPU backend, against the CPU stand-in for torch_npu
(tests/npu_standin.py, written from the documentation; this checks our use of the API, not
the hardware): decode hands int8 pages and their per-token, per-head scales to
npu_fused_infer_attention_score as antiquant parameters (mode 3), and the stand-in
dequantizes them as documented; the result against float64 attention over the pages as
stored times their scales."""

from __future__ import annotations

import npu_standin
import pytest
import torch
from conftest import record_error
from reference import attention64
from test_npu_backend import hccl_env_restored
from tr_engine.backends import npu as npu_mod
from tr_engine.backends.npu import NpuBackend

from tr_engine.kv.quant import dequantize, kv_format, quantize

FIA = "npu_fused_infer_attention_score"
INT8 = kv_format("int8")


@pytest.fixture
def npu():
    with hccl_env_restored(), npu_standin.install() as module:
        yield module, NpuBackend()


def pages(n, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.logspace(-1, 1, n)[torch.randperm(n, generator=g)][:, None, None]
    k8, ks = quantize(torch.randn(n, hkv, d, generator=g) * sizes, INT8)
    v8, vs = quantize(torch.randn(n, hkv, d, generator=g), INT8)
    return k8, v8, ks, vs


def decode(backend, q, k8, v8, ks, vs, lens, page=16):
    """The backend's decode over rows of consecutive pages, `lens` keys each."""
    width = k8.shape[0] // page
    tables = torch.arange(width, dtype=torch.int32).repeat(len(lens), 1)
    rows = torch.arange(len(lens))
    return backend.decode_attention(q, k8, v8, tables, rows, torch.tensor(lens), page, 0.125,
                                    k_scale=ks, v_scale=vs)


def check(out, lse, q, k8, v8, ks, vs, lens, via=torch.float64):
    """`via`: the dtype the pages are dequantized to before attention (q's on the portable
    path; none, float64, where the kernel dequantizes)."""
    k64, v64 = (dequantize(x, s, via).double() for x, s in ((k8, ks), (v8, vs)))
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.isneginf(lse[b]).all() and not out[b].any()
            continue
        ref_out, ref_lse = attention64(q[b : b + 1], k64[:n], v64[:n], causal=False,
                                       scale=0.125)
        err = (out[b : b + 1].double() - ref_out).abs().max().item()
        record_error("npu int8 KV decode (stand-in)", err, err)
        assert err < 2e-2  # out in bfloat16
        assert (lse[b : b + 1].double() - ref_lse).abs().max() < 1e-4


def test_int8_decode_passes_the_scales_to_fused_infer(npu):
    module, backend = npu
    q = torch.randn(3, 8, 64).to(torch.bfloat16)
    k8, v8, ks, vs = pages(160, 2, 64, 1)
    lens = [150, 0, 7]
    module.calls.clear()
    out, lse = decode(backend, q, k8, v8, ks, vs, lens)
    assert module.calls[FIA] == 2  # one call per sequence with keys, int8 pages as they are
    check(out, lse, q, k8, v8, ks, vs, lens)


def test_int8_decode_over_a_long_shard_goes_in_slices(npu, monkeypatch):
    module, backend = npu
    monkeypatch.setattr(npu_mod, "FIA_MAX_DECODE_KEYS", 64)
    monkeypatch.setattr(npu_standin, "FIA_MAX_DECODE_KEYS", 64)
    q = torch.randn(1, 8, 64).to(torch.bfloat16)
    k8, v8, ks, vs = pages(160, 2, 64, 2)
    module.calls.clear()
    out, lse = decode(backend, q, k8, v8, ks, vs, [150])
    assert module.calls[FIA] == 3  # 64 + 64 + 22 keys
    check(out, lse, q, k8, v8, ks, vs, [150])


def test_a_head_dim_fia_does_not_take_in_int8_is_dequantized_first(npu):
    module, backend = npu
    q = torch.randn(2, 4, 48).to(torch.bfloat16)  # 48: not a multiple of 32
    k8, v8, ks, vs = pages(64, 2, 48, 3)
    out, lse = decode(backend, q, k8, v8, ks, vs, [40, 9])
    check(out, lse, q, k8, v8, ks, vs, [40, 9], via=torch.bfloat16)


def test_standin_holds_antiquant_to_the_documentation(npu):
    module, _ = npu
    q = torch.randn(1, 1, 8, 64).to(torch.bfloat16)
    k8, v8, ks, vs = pages(32, 2, 64, 4)
    k8, v8 = k8.unsqueeze(0), v8.unsqueeze(0)  # BSND
    scale = npu_mod.per_token_head(ks)  # [1, KV_N, KV_S]
    args = dict(num_heads=8, num_key_value_heads=2, input_layout="BSND", softmax_lse_flag=True,
                key_antiquant_mode=3, value_antiquant_mode=3)
    fia = module.npu_fused_infer_attention_score
    fia(q, k8, v8, key_antiquant_scale=scale, value_antiquant_scale=scale, **args)  # accepted
    with pytest.raises(RuntimeError, match="Q_S = 1"):
        fia(q.expand(1, 2, 8, 64).contiguous(), k8, v8, key_antiquant_scale=scale,
            value_antiquant_scale=scale, **args)
    with pytest.raises(RuntimeError, match="float32"):
        fia(q, k8, v8, key_antiquant_scale=scale.bfloat16(),
            value_antiquant_scale=scale.bfloat16(), **args)
    with pytest.raises(RuntimeError, match=r"\(B, KV_N, KV_S\)"):
        fia(q, k8, v8, key_antiquant_scale=ks[None], value_antiquant_scale=ks[None], **args)
    with pytest.raises(RuntimeError, match="int8"):
        fia(q, k8.bfloat16(), v8.bfloat16(), key_antiquant_scale=scale,
            value_antiquant_scale=scale, **args)
    with pytest.raises(RuntimeError, match="differ"):
        fia(q, k8, v8, key_antiquant_scale=scale, value_antiquant_scale=scale,
            **{**args, "value_antiquant_mode": 1})
    with pytest.raises(RuntimeError, match="dtypes differ"):  # int8 pages without scales
        fia(q, k8, v8, **{**args, "key_antiquant_mode": 0, "value_antiquant_mode": 0})


def test_npu_takes_int8_and_refuses_fp8_naming_what_works(npu):
    _, backend = npu
    assert backend.kv_cache_dtypes() == ("auto", "int8")
    backend.check_kv_cache_dtype("int8")
    with pytest.raises(ValueError, match="it takes auto, int8"):
        backend.check_kv_cache_dtype("fp8")


def test_fp8_on_ascend_is_refused_before_any_rank_starts(tmp_path):
    """Through the engine: the refusal comes from the cluster, before it spawns a rank."""
    import multiprocessing

    from checkpoints import make_checkpoint
    from tr_engine.backends import get_backend

    from tr_engine import LLM

    ckpt = str(make_checkpoint("llama3.1", tmp_path))
    with hccl_env_restored(), npu_standin.install():
        try:
            with pytest.raises(ValueError, match="not available on the npu backend.*it takes "
                               "auto, int8"):
                LLM(ckpt, device="npu", world_size=2, kv_cache_dtype="fp8")
        finally:
            get_backend.cache_clear()  # the backend built on the stand-in stays out of others
    assert multiprocessing.active_children() == []


def test_the_flag_reaches_the_config():
    from tr_engine.cli import load_settings

    assert load_settings(["--kv-cache-dtype", "int8"])[0].kv_cache_dtype == "int8"
    assert load_settings([])[0].kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        load_settings(["--kv-cache-dtype", "fp4"])


def test_int8_pages_go_to_the_host_tier_and_back_layer_by_layer(npu):
    """The host tier through the NPU backend's streams and events (the stand-in's, which
    run in order): int8 pages and their scales copied out, the pool overwritten, then back
    with one event per layer recorded on the copy stream, which a forward's layers wait
    for; every tensor comes back byte-equal, and the restore is timed by its events."""
    from tr_engine.kv.cache import KVCache
    from tr_engine.kv.host_tier import HostTier
    from tr_engine.plan import PageCopy

    _, backend = npu
    cpu = torch.device("cpu")  # the stand-in's tensors live on the host
    cache = KVCache(3, 8, 4, 2, 16, torch.bfloat16, cpu, INT8)
    for t in cache.tensors():
        t.copy_(torch.randint(-100, 100, t.shape) if t.dtype == torch.int8 else
                torch.rand(t.shape).to(t.dtype))
    before = [t.clone() for t in cache.tensors()]
    tier = HostTier(cache, 4, backend, cpu)
    assert isinstance(tier.stream, npu_standin.Stream)
    out = [PageCopy(0, p, s, to_host=True) for p, s in [(6, 0), (5, 1), (2, 2)]]
    assert tier.copy(out) is None  # not layered: the forward after it sees them done
    for t in cache.tensors():
        t.zero_()
    back = [PageCopy(0, p, s, to_host=False) for p, s in [(6, 0), (5, 1), (2, 2)]]
    events = tier.copy(back, timed=True, layered=True)
    assert len(events) == 3 and all(e.recorded == 1 for e in events)
    for e in events:  # what the attention layers do before reading their pages
        e.wait()
    tier.finish()
    for got, want in zip(cache.tensors(), before):
        for p in (6, 5, 2):
            assert torch.equal(got[:, p * 4 : (p + 1) * 4], want[:, p * 4 : (p + 1) * 4])
        assert torch.count_nonzero(got[:, 0:4]) == 0  # pages not restored stay as they were
    assert tier.restore_s == 0.0 and not tier._timing  # the stand-in's events: 0 ms, read
