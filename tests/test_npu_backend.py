"""The NPU backend's own code (layouts, masks, LSE extraction, merge, kernel choice, device
calls) run against a CPU stand-in for torch_npu (tests/npu_standin.py), compared with the
float64 reference, alone and through TokenRing on gloo ranks.

This checks our use of the documented torch_npu API, not the hardware: the stand-in
computes in float32 on the CPU from the documentation's description of each op.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os

import npu_standin
import pytest
import torch
from conftest import record_error
from reference import attention64
from tr_engine.backends import BackendUnavailable, backend_for, override_backend
from tr_engine.backends import npu as npu_mod
from tr_engine.backends.cpu import CpuBackend
from tr_engine.backends.npu import ENV_DEFAULTS, NpuBackend
from world import World

from tr_engine.attention import merge_
from tr_engine.distributed import zigzag

FIA = "npu_fused_infer_attention_score"
FA = "npu_fusion_attention"
UPDATE = "npu_ring_attention_update"
# Out tolerance per dtype: the kernels return out rounded to the input dtype. LSE is float32.
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
LSE_TOL = 1e-4


@contextlib.contextmanager
def hccl_env_restored():
    """The HCCL variables NpuBackend() sets defaults for, as they were before the block."""
    saved = {name: os.environ.get(name) for name in ENV_DEFAULTS}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def npu():
    """(stand-in module, backend); restores the HCCL variables NpuBackend() defaults."""
    with hccl_env_restored(), npu_standin.install() as module:
        yield module, NpuBackend()


def qkv(tq, tk, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, hq, d, generator=g).to(dtype)
    k = torch.randn(tk, hkv, d, generator=g).to(dtype)
    v = torch.randn(tk, hkv, d, generator=g).to(dtype)
    return q, k, v


def compare(label, out, lse, ref_out, ref_lse, dtype):
    """Assert out/lse against float64; rows with ref lse -inf must be out 0, lse -inf."""
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~seen)
    err = (out.double() - ref_out)[seen]
    lse_err = (lse.double() - ref_lse)[seen]
    assert not out[~seen].any()
    record_error(label, err.abs().max().item(), err.abs().mean().item())
    record_error(label + " lse", lse_err.abs().max().item(), lse_err.abs().mean().item())
    assert err.abs().max().item() < TOL[dtype], f"{label}: out error {err.abs().max():.3e}"
    assert lse_err.abs().max().item() < LSE_TOL, f"{label}: lse error {lse_err.abs().max():.3e}"


# Blocks as the engine sends them: square causal (step 0), the TokenRing remote blocks
# (2L x L, L x 2L), bottom-right causal after a prefix, more queries than keys, decode.
SHAPES = [(24, 24, True), (24, 12, False), (12, 24, False), (5, 17, True), (17, 5, True),
          (1, 40, False), (1, 1, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (4, 4, 128), (6, 3, 80)])
def test_block_attention_against_float64(npu, dtype, hq, hkv, d):
    module, backend = npu
    # Documented limits: the inference kernel takes float16/bfloat16 with D % 16 == 0.
    expected = FIA if dtype != torch.float32 and d % 16 == 0 else FA
    other = FA if expected == FIA else FIA
    for seed, (tq, tk, causal) in enumerate(SHAPES):
        q, k, v = qkv(tq, tk, hq, hkv, d, dtype, seed)
        module.calls.clear()
        out, lse = backend.attention(q, k, v, causal, scale=0.7 / d**0.5)
        ref_out, ref_lse = attention64(q, k, v, causal=causal, q_offset=tk - tq if causal else 0,
                                       scale=0.7 / d**0.5)
        compare(f"npu kernel {expected[4:]} {str(dtype)[6:]}", out, lse, ref_out, ref_lse, dtype)
        assert module.calls[expected] >= 1 and module.calls[other] == 0


def test_kernel_choice_follows_documented_limits(npu):
    module, backend = npu
    cases = [  # (hq, hkv, d, dtype, kernel expected to run)
        (128, 1, 64, torch.bfloat16, FA),  # 128 query heads per kv head > 64
        (4, 2, 576, torch.float16, FA),  # D > 512 for the inference kernel, <= 768
        (4, 2, 72, torch.bfloat16, FA),  # D not a multiple of 16
        (4, 2, 1024, torch.float16, None),  # beyond both: the math kernel
        (300, 300, 16, torch.bfloat16, None),  # more than 256 heads
        (128, 16, 512, torch.bfloat16, FA),  # N * D = 65536, not below 65535 (Q_S > 1)
        (127, 127, 512, torch.bfloat16, FIA),  # N * D = 65024
    ]
    for seed, (hq, hkv, d, dtype, kernel) in enumerate(cases):
        q, k, v = qkv(9, 9, hq, hkv, d, dtype, seed)
        module.calls.clear()
        out, lse = backend.attention(q, k, v, True)
        ref_out, ref_lse = attention64(q, k, v, causal=True)
        compare("npu kernel choice", out, lse, ref_out, ref_lse, dtype)
        assert dict(module.calls) == ({kernel: 1} if kernel else {}), (hq, hkv, d, dtype)
    # One query row: the N * D limit does not apply (the documented decode limits do).
    q, k, v = qkv(1, 9, 128, 16, 512, torch.bfloat16, 20)
    module.calls.clear()
    compare("npu kernel choice", *backend.attention(q, k, v, False),
            *attention64(q, k, v, causal=False), torch.bfloat16)
    assert dict(module.calls) == {FIA: 1}


@pytest.mark.parametrize("product", ["Ascend910_9392", "Ascend310P3"])
def test_fusion_attention_only_on_its_documented_products(product):
    """On Atlas A3 (and anything but A2 training / 950DT) what only npu_fusion_attention
    would take goes to the math kernel; the inference kernel is used as on A2."""
    with npu_standin.install(device_name=product) as module:
        backend = NpuBackend()
        for seed, (dtype, d, kernel) in enumerate([(torch.float32, 64, None),
                                                   (torch.bfloat16, 72, None),
                                                   (torch.bfloat16, 64, FIA)]):
            q, k, v = qkv(9, 9, 4, 2, d, dtype, seed)
            module.calls.clear()
            compare("npu kernel choice", *backend.attention(q, k, v, True),
                    *attention64(q, k, v, causal=True), dtype)
            assert dict(module.calls) == ({kernel: 1} if kernel else {})
        q, k, v = (npu_mod.bsnd(t) for t in qkv(8, 8, 4, 2, 64, torch.float32, 3))
        with pytest.raises(RuntimeError, match="not documented for " + product):
            module.npu_fusion_attention(q, k, v, 4, "BSND")
        names = backend.self_check_kernels()[0]
        assert list(names) == [FIA]  # and the self-check leaves it out


def test_decode_over_a_long_shard_goes_in_slices(npu, monkeypatch):
    """A one-row query may see at most FIA_MAX_DECODE_KEYS keys per call (262144 in the
    documentation; lowered here on both sides to keep the test small)."""
    module, backend = npu
    monkeypatch.setattr(npu_mod, "FIA_MAX_DECODE_KEYS", 64)
    monkeypatch.setattr(npu_standin, "FIA_MAX_DECODE_KEYS", 64)
    q, k, v = qkv(1, 200, 8, 2, 64, torch.bfloat16, 11)
    with pytest.raises(RuntimeError, match="Q_S = 1"):
        module.npu_fused_infer_attention_score(
            npu_mod.bsnd(q), npu_mod.bsnd(k), npu_mod.bsnd(v), num_heads=8,
            num_key_value_heads=2, input_layout="BSND", softmax_lse_flag=True)
    module.calls.clear()
    out, lse = backend.attention(q, k, v, False)
    assert module.calls[FIA] == 4  # 64 + 64 + 64 + 8 keys
    compare("npu decode slices", out, lse, *attention64(q, k, v, causal=False), torch.bfloat16)


def test_layout_views_mask_and_statistics():
    x = torch.randn(7, 4, 16)
    assert npu_mod.bsnd(x).shape == (1, 7, 4, 16)
    assert npu_mod.bsnd(x).data_ptr() == x.data_ptr()  # a view, no copy
    mask = npu_mod.causal_mask(torch.device("cpu"))
    i, j = torch.meshgrid(torch.arange(2048), torch.arange(2048), indexing="ij")
    assert mask.dtype == torch.bool and torch.equal(mask, j > i)  # True = masked out


def test_ring_stats_are_positive_and_keep_the_weights():
    """npu_ring_attention_update takes max and sum as 8 equal positive values (CANN); the
    transform keeps each side's weight exp(lse - logaddexp(lse_a, lse_b)) in float32."""
    lse_a, lse_b = torch.randn(6, 3) * 20, torch.randn(6, 3) * 20  # both signs
    lse_a[2, 1] = lse_b[3, 0] = float("-inf")
    lse_a[4, 2] = lse_b[4, 2] = float("-inf")
    max_a, max_b, ones = npu_mod.ring_stats(lse_a, lse_b)
    for t in (max_a, max_b, ones):
        assert t.shape == (1, 3, 6, 8) and t.is_contiguous() and t.dtype == torch.float32
        assert (t > 0).all() and torch.equal(t, t[..., :1].expand_as(t))
    assert torch.equal(ones, torch.ones_like(ones))
    ma, mb = max_a[0, :, :, 0].t(), max_b[0, :, :, 0].t()  # [S, N]
    top = torch.maximum(ma, mb)
    ref = torch.logaddexp(lse_a.double(), lse_b.double())
    for m, lse in ((ma, lse_a), (mb, lse_b)):
        weight = torch.exp(m - top) / (torch.exp(ma - top) + torch.exp(mb - top))
        want = torch.exp(lse.double() - ref).nan_to_num(0.5)  # both empty: any, outs are 0
        assert (weight.double() - want).abs().max() < 1e-6
        assert torch.equal(weight[torch.isneginf(lse) & torch.isfinite(ref)],
                           torch.zeros(1))  # an empty side weighs exactly 0


def test_standin_rejects_what_the_documentation_forbids(npu):
    """The stand-in is strict where the documentation is, so the tests above mean something."""
    module, _ = npu
    q, k, v = (npu_mod.bsnd(t) for t in qkv(8, 8, 4, 2, 64, torch.bfloat16, 3))
    fia = module.npu_fused_infer_attention_score
    kw = dict(num_heads=4, num_key_value_heads=2, input_layout="BSND", softmax_lse_flag=True)
    with pytest.raises(RuntimeError, match="float16 and bfloat16 only"):
        fia(q.float(), k.float(), v.float(), **kw)
    with pytest.raises(RuntimeError, match="not contiguous"):
        fia(q.transpose(1, 2), k, v, **kw)
    with pytest.raises(RuntimeError, match="needs the compressed atten_mask"):
        fia(q, k, v, sparse_mode=3, **kw)
    with pytest.raises(RuntimeError, match="True \\(masked\\) above the diagonal"):
        fia(q, k, v, sparse_mode=3, atten_mask=~npu_mod.causal_mask(q.device), **kw)
    with pytest.raises(RuntimeError, match="num_heads=8"):
        fia(q, k, v, **{**kw, "num_heads": 8, "num_key_value_heads": 2})
    with pytest.raises(TypeError):  # the pre-6.0 keyword name
        fia(q, k, v, scale_value=0.1, **kw)
    with pytest.raises(NotImplementedError):  # in 2.10.0.post4's schema, not in older ones
        module.npu_fusion_attention(q, k, v, 4, "BSND", softmax_layout="TND")
    # N * D < 65535 with more than one query row in BSND (128 heads x 512 = 65536)
    wide = [npu_mod.bsnd(t) for t in qkv(2, 2, 128, 16, 512, torch.bfloat16, 4)]
    with pytest.raises(RuntimeError, match="N \\* D = 65536"):
        fia(*wide, num_heads=128, num_key_value_heads=16, input_layout="BSND")
    fia(*(t[:, :1] for t in wide), num_heads=128, num_key_value_heads=16,
        input_layout="BSND")  # one row: allowed
    # npu_ring_attention_update: max and sum 8 identical positive values
    update = module.npu_ring_attention_update
    out = torch.randn(4, 1, 2 * 16)
    good = torch.rand(1, 2, 4, 1).add(0.5).expand(1, 2, 4, 8).contiguous()
    update(out, good, good, out, good, good)
    for bad in (good - 1, torch.zeros_like(good), good.clone().index_fill_(3, torch.tensor([5]),
                                                                          2.0)):
        with pytest.raises(RuntimeError, match="positive|8 identical"):
            update(out, bad, good, out, good, good)
        with pytest.raises(RuntimeError, match="positive|8 identical"):
            update(out, good, good, out, good, bad)
    fa = module.npu_fusion_attention(q.float(), k.float(), v.float(), 4, "BSND")
    assert len(fa) == 7 and fa[1].shape == (1, 4, 8, 8) and torch.equal(fa[1][..., 0],
                                                                         fa[1][..., 7])


def test_standin_sparse_modes_against_float64(npu):
    """sparse_mode 2 is causal from the top left, 3 from the bottom right (the engine's)."""
    module, _ = npu
    q, k, v = qkv(6, 10, 4, 2, 32, torch.float16, 5)
    mask = npu_mod.causal_mask(q.device)
    for mode, offset in ((2, 0), (3, 10 - 6)):
        out, lse = module.npu_fused_infer_attention_score(
            npu_mod.bsnd(q), npu_mod.bsnd(k), npu_mod.bsnd(v), atten_mask=mask, num_heads=4,
            num_key_value_heads=2, scale=32**-0.5, input_layout="BSND", sparse_mode=mode,
            softmax_lse_flag=True)
        ref_out, ref_lse = attention64(q, k, v, causal=True, q_offset=offset)
        compare("stand-in sparse modes", out[0], lse[0, :, :, 0].t(), ref_out, ref_lse,
                torch.float16)


def merge_cases(seed):
    """Accumulator (out float32, lse) and a partial (out bf16, lse) with empty rows: -inf on
    one side, on the other, and on both."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.randn(9, 4, 32, generator=g)
    acc_lse = torch.randn(9, 4, generator=g) * 3
    part = torch.randn(9, 4, 32, generator=g).bfloat16()
    part_lse = torch.randn(9, 4, generator=g) * 3
    acc[0], acc_lse[0] = 0, float("-inf")
    part[1], part_lse[1] = 0, float("-inf")
    acc[2], acc_lse[2], part[2], part_lse[2] = 0, float("-inf"), 0, float("-inf")
    return acc, acc_lse, part, part_lse


@pytest.mark.parametrize("ring_update", [True, False])
def test_merge_against_float64(ring_update):
    with npu_standin.install(ring_update=ring_update) as module:
        backend = NpuBackend()
        for seed in range(3):
            acc, acc_lse, part, part_lse = merge_cases(seed)
            ref_lse = torch.logaddexp(acc_lse.double(), part_lse.double())
            w_a = torch.exp(acc_lse.double() - ref_lse).nan_to_num(0).unsqueeze(-1)
            w_b = torch.exp(part_lse.double() - ref_lse).nan_to_num(0).unsqueeze(-1)
            ref_out = w_a * acc.double() + w_b * part.double()
            portable = acc.clone(), acc_lse.clone()
            merge_(*portable, part, part_lse)
            backend.merge_(acc, acc_lse, part, part_lse)
            label = f"npu merge {'ring_update' if ring_update else 'portable'}"
            compare(label, acc, acc_lse, ref_out, ref_lse, torch.float32)
            assert torch.equal(acc_lse.isneginf(), portable[1].isneginf())
        assert module.calls[UPDATE] == (3 if ring_update else 0)


def test_refused_kernels_fall_back_and_stay_refused(npu, monkeypatch):
    module, backend = npu

    def refuse(*args, **kwargs):
        module.calls["refused"] += 1
        raise RuntimeError("EZ1001: not supported by this CANN")

    monkeypatch.setattr(module, FIA, refuse)
    monkeypatch.setattr(module, UPDATE, refuse)
    backend._ring_update = module.npu_ring_attention_update
    q, k, v = qkv(16, 16, 4, 2, 64, torch.bfloat16, 9)
    for _ in range(2):
        out, lse = backend.attention(q, k, v, True)
        compare("npu fallback", out, lse, *attention64(q, k, v, causal=True), torch.bfloat16)
    assert module.calls["refused"] == 1 and module.calls[FA] == 2
    acc, acc_lse, part, part_lse = merge_cases(4)
    expected = acc.clone(), acc_lse.clone()
    for _ in range(2):
        backend.merge_(acc, acc_lse, part, part_lse)
        merge_(*expected, part, part_lse)
    assert torch.allclose(acc, expected[0]) and module.calls["refused"] == 2


def test_device_memory_and_streams(npu):
    module, backend = npu
    assert (backend.device_type, backend.dist_backend) == ("npu", "hccl")
    assert backend.set_device(3) == torch.device("npu", 3) and module.npu.current_device() == 3
    assert backend.mem_get_info() == module.npu.mem_get_info() and backend.device_count() == 8
    backend.synchronize()
    assert module.calls["npu.set_device"] == 1 and module.calls["npu.synchronize"] == 1
    stream = backend.new_stream()
    assert isinstance(stream, npu_standin.Stream)
    with backend.stream(stream):
        pass
    assert backend.new_event(timing=True).enable_timing
    with pytest.raises(RuntimeError, match="device 9 of 8"):
        backend.set_device(9)


def test_no_visible_card_is_reported():
    with npu_standin.install(device_count=0), pytest.raises(BackendUnavailable) as e:
        NpuBackend()
    assert "sees no NPU" in e.value.what and "ASCEND_RT_VISIBLE_DEVICES" in e.value.fix


def test_a_pair_outside_the_pinned_ones_is_logged(monkeypatch, caplog):
    for version, torch_version, warned in (("2.10.0.post4", "2.10.0+cpu", False),
                                           ("2.9.0.post2", "2.9.0", False),
                                           ("2.14.0", "2.14.0", True),
                                           ("2.10.0.post4", "2.14.0+cu130", True)):
        monkeypatch.setattr(torch, "__version__", torch_version)
        caplog.clear()
        with npu_standin.install(version=version), caplog.at_level(logging.WARNING):
            NpuBackend()
        assert ("not one of the pairs" in caplog.text) == warned, (version, torch_version)
        if warned:
            assert f"torch-npu {version} with torch {torch_version}" in caplog.text


def test_hccl_environment_defaults_and_bounds():
    env = {"HCCL_BUFFSIZE": "300"}
    applied = npu_mod.init_env(env)
    assert applied == {k: v for k, v in ENV_DEFAULTS.items() if k != "HCCL_BUFFSIZE"}
    assert env == {**ENV_DEFAULTS, "HCCL_BUFFSIZE": "300"}  # the user's value stays
    assert npu_mod.init_env(env) == {}
    for name, bad in (("HCCL_CONNECT_TIMEOUT", "60"), ("HCCL_CONNECT_TIMEOUT", "9000"),
                      ("HCCL_BUFFSIZE", "0"), ("P2P_HCCL_BUFFSIZE", "-1"),
                      ("P2P_HCCL_BUFFSIZE", "lots")):
        with pytest.raises(BackendUnavailable) as e:
            npu_mod.init_env({name: bad})
        assert name in e.value.what and name in e.value.fix


def test_override_backend_is_scoped(npu):
    _, backend = npu
    cpu = torch.device("cpu")
    assert isinstance(backend_for(cpu), CpuBackend)
    with override_backend("cpu", backend):
        assert backend_for(cpu) is backend
        other = CpuBackend()
        with override_backend("cpu", other):
            assert backend_for(cpu) is other
        assert backend_for(cpu) is backend
    assert isinstance(backend_for(cpu), CpuBackend)


# Through the distributed strategies: real gloo ranks, the NPU backend computing every block.
WORLD = 4


@pytest.fixture(scope="module")
def world():
    w = World(WORLD)
    yield w
    w.close()


def check_world(world, p, q, k, v, causal, ring_update, label, prefix=None, splits=None):
    prefixes = None
    if prefix is not None:
        bounds = [0, *itertools.accumulate(splits)]
        prefixes = [(prefix[0][a:b], prefix[1][a:b]) for a, b in zip(bounds, bounds[1:])]
    results = world.run(npu_standin.run_strategy_on_npu_backend,
                        ("tokenring", q, k, v, causal, prefixes, ring_update), ranks=p)
    out = zigzag.unshard([r[0] for r in results], q.shape[0])
    lse = zigzag.unshard([r[1] for r in results], q.shape[0])
    if prefix is None:
        ref = attention64(q, k, v, causal=causal)
    else:
        c = prefix[0].shape[0]
        ref = attention64(q, torch.cat([prefix[0], k]), torch.cat([prefix[1], v]),
                          causal=causal, q_offset=c)
    compare(label, out, lse, *ref, q.dtype)
    calls = [r[2] for r in results]
    assert all(c.get(FIA, 0) > 0 for c in calls)  # every rank's blocks went through the NPU kernel
    merged = sum(c.get(UPDATE, 0) for c in calls)
    assert (merged > 0) == (ring_update and p > 1)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_tokenring_on_npu_backend(world, p):
    combos = itertools.product([(8, 2), (4, 4)], [True, False], [torch.bfloat16, torch.float16])
    for seed, ((hq, hkv), causal, dtype) in enumerate(combos):
        total = 2 * p * 4 + seed % 3  # some lengths need padding
        q, k, v = qkv(total, total, hq, hkv, 64, dtype, 100 * p + seed)
        ring_update = seed % 2 == 0
        label = f"npu tokenring {'causal' if causal else 'full'} {str(dtype)[6:]}"
        check_world(world, p, q, k, v, causal, ring_update, label)


def test_tokenring_partial_prefill_on_npu_backend(world):
    """New tokens after a cached prefix spread unevenly over the ranks (one holds none)."""
    q, k, v = qkv(13, 13, 8, 2, 128, torch.bfloat16, 7)
    _, kp, vp = qkv(1, 30, 2, 2, 128, torch.bfloat16, 8)
    check_world(world, 3, q, k, v, True, True, "npu tokenring prefix", prefix=(kp, vp),
                splits=[10, 0, 20])


def test_standin_leaves_no_trace():
    """After the block, `import torch_npu` fails again as on any machine without it."""
    import importlib.util

    assert importlib.util.find_spec("torch_npu") is None
    with pytest.raises(ImportError):
        import torch_npu  # noqa: F401
    with pytest.raises(BackendUnavailable, match="not installed"):
        NpuBackend()


# Each documented limit, just past it: (label, kernel, q/k/v shapes (Tq, Tk, Hq, Hkv, D),
# dtype, stand-in error, limits lowered on both sides to keep the tensors small).
LIMITS = [
    ("FIA head dim > 512", FIA, (4, 4, 2, 2, 528), torch.bfloat16, "head dim 528", {}),
    ("FIA head dim not a multiple of 16", FIA, (4, 4, 2, 2, 72), torch.bfloat16,
     "not a multiple of 16", {}),
    ("FIA > 64 query heads per KV head", FIA, (4, 4, 130, 2, 16), torch.bfloat16,
     "more than 64 query heads", {}),
    ("FIA > 256 heads", FIA, (4, 4, 264, 264, 16), torch.bfloat16, "more than 256 heads", {}),
    ("FIA N * D >= 65535", FIA, (4, 4, 128, 16, 512), torch.bfloat16, "N \\* D = 65536", {}),
    ("FIA S > 20M", FIA, (4, 40, 2, 2, 16), torch.bfloat16, "sequence too long",
     {"FIA_MAX_SEQ": 32}),
    ("FIA float32", FIA, (4, 4, 2, 2, 16), torch.float32, "float16 and bfloat16 only", {}),
    ("FA head dim > 768", FA, (4, 4, 2, 2, 784), torch.float32, "head dim 784", {}),
    ("FA > 256 heads", FA, (4, 4, 264, 264, 16), torch.float32, "at most 256", {}),
    ("FA S > 1M", FA, (4, 40, 2, 2, 16), torch.float32, "S must be in", {"FA_MAX_SEQ": 32}),
]


@pytest.mark.parametrize("label,kernel,shape,dtype,error,lowered", LIMITS,
                         ids=[c[0] for c in LIMITS])
def test_every_documented_limit_is_refused_and_avoided(npu, monkeypatch, label, kernel,
                                                       shape, dtype, error, lowered):
    module, backend = npu
    for name, value in lowered.items():
        monkeypatch.setattr(npu_mod, name, value)
        monkeypatch.setattr(npu_standin, name, value)
    tq, tk, hq, hkv, d = shape
    q, k, v = qkv(tq, tk, hq, hkv, d, dtype, 1)
    with pytest.raises(RuntimeError, match=error):
        if kernel == FIA:
            module.npu_fused_infer_attention_score(
                npu_mod.bsnd(q), npu_mod.bsnd(k), npu_mod.bsnd(v), num_heads=hq,
                num_key_value_heads=hkv, scale=d**-0.5, input_layout="BSND",
                softmax_lse_flag=True)
        else:
            module.npu_fusion_attention(npu_mod.bsnd(q), npu_mod.bsnd(k), npu_mod.bsnd(v), hq,
                                        "BSND", scale=d**-0.5)
    module.calls.clear()
    out, lse = backend.attention(q, k, v, False)
    compare("npu limits avoided", out, lse, *attention64(q, k, v, causal=False), dtype)
    assert module.calls[kernel] == 0, label  # the backend never offered it the block
