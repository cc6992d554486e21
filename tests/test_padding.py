"""Padding a prefill chunk at its end is exact: the engine's block-aligned (and, for long
chunks, bucketed) layout gives the logits transformers gives, for every prompt length
1..300 on 1, 2 and 3 gloo ranks, and for lengths on both sides of the first bucket edge.
The bucket a length maps to is a pure function, checked at its edges."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoints import make_checkpoint

from tr_engine import LLM
from tr_engine.distributed import zigzag


@pytest.mark.parametrize(("total", "world", "align", "padded"), [
    (1, 1, 1, 2), (2, 1, 1, 2), (3, 2, 1, 4), (5, 2, 1, 8),  # align 1: multiples of 2P
    (1, 1, 16, 32), (32, 1, 16, 32), (33, 1, 16, 64), (97, 3, 16, 192),
    (8192, 1, 16, 8192),  # 256 steps of 32: the last length on the fine grid
    (8193, 1, 16, 8704), (8704, 1, 16, 8704), (8705, 1, 16, 9216),  # steps of 512
    (16384, 1, 16, 16384), (16385, 1, 16, 17408),  # the next octave: steps of 1024
    (16385, 2, 16, 17408), (16383, 2, 16, 16384),
    (10**6, 1, 1, 10**6), (10**6 + 1, 1, 1, 10**6 + 2),  # align 1 is never bucketed
])
def test_padded_len_edges(total, world, align, padded):
    assert zigzag.padded_len(total, world, align) == padded


def test_buckets_are_few_and_waste_little():
    for world in (1, 2, 8):
        lengths = {zigzag.padded_len(n, world, 16) for n in range(8192 * world, 65536 * world,
                                                                 97)}
        assert len(lengths) <= 3 * 16 + 1  # 16 per doubling, three doublings
        for n in range(8192 * world, 65536 * world, 997):
            assert n <= zigzag.padded_len(n, world, 16) <= n * 17 / 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small Llama 3.1 checkpoint whose context allows 1100 tokens (RoPE weights do not
    depend on it)."""
    src = make_checkpoint("llama3.1", tmp_path_factory.mktemp("ckpt"))
    path = tmp_path_factory.mktemp("long") / "llama3.1"
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def hf_logits(ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (1100,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return tokens.tolist(), model(tokens[None]).logits[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_length_to_300_is_exact(ckpt, hf_logits, world):
    tokens, ref = hf_logits
    with LLM(ckpt, device="cpu", world_size=world, dtype="float32", kv_cache_tokens=512,
             max_model_len=1200) as llm:
        for n in range(1, 301):
            err = (llm.prompt_logits(tokens[:n]) - ref[:n]).abs().max().item()
            assert err < 1e-4, f"P={world}, {n} tokens: {err:.2e}"


def test_bucketed_lengths_are_exact(ckpt, hf_logits):
    """Blocks of 2 on one rank: from 1024 tokens on, chunks are padded to steps of 64."""
    tokens, ref = hf_logits
    with LLM(ckpt, device="cpu", world_size=1, dtype="float32", kv_cache_tokens=1400,
             max_model_len=1200, block_size=2, prefill_chunk=2048) as llm:
        for n in (1023, 1024, 1025, 1031, 1087, 1088, 1100):
            assert zigzag.padded_len(n, 1, 2) >= n
            err = (llm.prompt_logits(tokens[:n]) - ref[:n]).abs().max().item()
            assert err < 1e-4, f"{n} tokens: {err:.2e}"
