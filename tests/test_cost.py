"""The strategy cost model picks what the byte counts say it should."""

from __future__ import annotations

import pytest

from tr_engine.attention import Rates, choose, estimate

LLAMA8B = dict(hq=32, hkv=8, d=128, elem=2)
NVLINK = Rates(flops=400e12, link=300e9, latency=10e-6)
SLOW_LINK = Rates(flops=400e12, link=10e9, latency=20e-6)


def test_single_rank_is_local():
    assert choose(new=1000, cached=0, world=1, **LLAMA8B) == "local"


def test_partial_prefill_passes_queries():
    # 512 new tokens after a 256K cache: pass-KV would move the whole cache every step.
    assert choose(new=512, cached=256_000, world=8, rates=NVLINK, **LLAMA8B) == "tokenring"
    t_q = estimate("tokenring", new=512, cached=256_000, world=8, rates=NVLINK, **LLAMA8B)
    t_kv = estimate("ring", new=512, cached=256_000, world=8, rates=NVLINK, **LLAMA8B)
    assert t_kv > 3 * t_q


def test_full_prefill_gqa4_on_slow_link_passes_kv():
    # GQA-4: K+V are half the bytes of Q; when the link cannot hide either, pass-KV wins.
    assert choose(new=32_000, cached=0, world=8, rates=SLOW_LINK, **LLAMA8B) == "ring"


def test_mha_prefers_tokenring_when_exposed():
    mha = dict(hq=32, hkv=32, d=128, elem=2)
    assert choose(new=32_000, cached=0, world=8, rates=SLOW_LINK, **mha) == "tokenring"


def test_bad_inputs():
    with pytest.raises(ValueError):
        Rates(flops=0)
    with pytest.raises(ValueError, match="unknown strategy"):
        estimate("ulysses", new=1, cached=0, world=2, rates=NVLINK, **LLAMA8B)
