"""Tensor parallelism against transformers: greedy generation and prefill logits of every
supported family with the weights split over 2 and 4 gloo ranks, alone (T = world) and
with the sequence sharded over the tensor-parallel groups (T = 2 of 4), float32 on the CPU.
Also: the mesh and the slices each rank reads, the refusals, and a rank's host memory
while it loads its slices.

World 3 with T = 1 (no tensor parallelism) is test_engine.py's P3 case, unchanged.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import subprocess
import sys
import textwrap

import pytest
import torch
from checkpoints import (
    FAMILIES,
    PROMPT_LENS,
    Recorder,
    greedy_reference,
    make_checkpoint,
    matches_transformers,
    sample_prompts,
)

from tr_engine import LLM, SamplingParams
from tr_engine.distributed.tensor_parallel import (
    Mesh,
    check,
    fit_error,
    shard_config,
    slice_of,
    valid_sizes,
    weight_bytes,
)
from tr_engine.models import ModelConfig, UnsupportedModel

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@functools.cache
def reference(path: str):
    """transformers' greedy continuations and the longest prompt's logits."""
    greedy = greedy_reference(path)
    with torch.no_grad():
        logits = greedy.model(torch.tensor([sample_prompts()[-1]])).logits[0]
    return greedy, logits


# (family, world, T, shard_min_tokens): every family on T = world = 2; TP x sequence on 4
# ranks, with short prompts on single tensor-parallel groups; T = 4 over 2 KV heads
# (each replicated twice), tied embeddings among them; a vocabulary T does not divide. On
# 4 ranks a follow-up turn also reuses the first turn's cached KV.
CASES = [(f, 2, 2, 0) for f in FAMILIES] + [
    ("llama3.1", 4, 2, 0),
    ("qwen3", 4, 2, 20),
    ("qwen3", 4, 4, 0),
    ("llama3.2", 4, 4, 0),
    ("llama-oddvocab", 2, 2, 0),
]


@pytest.mark.parametrize("family,world,tp,short", CASES,
                         ids=[f"{f}-W{w}-T{t}" + ("-short" if s else "")
                              for f, w, t, s in CASES])
def test_matches_transformers(ckpt_root, family, world, tp, short):
    path = str(make_checkpoint(family, ckpt_root))
    greedy, ref_logits = reference(path)
    with LLM(path, device="cpu", world_size=world, tensor_parallel_size=tp, dtype="float32",
             prefill_chunk=16, kv_cache_tokens=1024, shard_min_tokens=short) as llm:
        engine = llm.engine
        assert engine.world == world // tp
        logits = llm.prompt_logits(sample_prompts()[-1])
        assert logits.shape == ref_logits.shape  # padded vocabulary rows dropped
        err = (logits - ref_logits).abs().max().item()
        assert err < 1e-4, f"{family} W={world} T={tp}: prefill logits off by {err:.2e}"
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                                logprobs=0)
        rec = Recorder(engine.scheduler)
        outs = llm.generate([{"prompt_token_ids": p} for p in sample_prompts()], params)
        rec.close()
        for n, p, out in zip(PROMPT_LENS, sample_prompts(), outs):
            tokens = greedy(tuple(p), NEW_TOKENS)
            assert matches_transformers(greedy.model, out, p, tokens), \
                f"{family} W={world} T={tp}, prompt of {n} tokens"
        # short prompts lived on single tensor-parallel groups, both of them used, and
        # the 40-token prompt on both
        homes = {lp.home for plan in rec.plans for lp in plan.local}
        sharded = [plan.prefill for plan in rec.plans if plan.prefill is not None]
        assert homes == ({0, 1} if short else set())
        assert len({p.seq_id for p in sharded}) == (1 if short else len(PROMPT_LENS))
        if world == 4:  # a follow-up reuses the cached KV of the longest prompt's turn
            p = sample_prompts()[-1]
            follow = p + outs[-1].token_ids + [5, 6, 7]
            out = llm.generate([{"prompt_token_ids": follow}], params)[0]
            assert out.num_cached_tokens >= 48
            assert matches_transformers(greedy.model, out, follow,
                                        greedy(tuple(follow), NEW_TOKENS))
        assert engine.scheduler.kv_used() == [0] * (world // tp)
        assert engine.scheduler.blocks.reserved() == [0] * (world // tp)
        workers = list(engine.cluster.procs)
    assert [p.exitcode for p in workers] == [0] * (world - 1)


def test_mesh_groups():
    m = Mesh(5, 8, 2)
    assert (m.tp_rank, m.sp_rank, m.sp_size) == (1, 2, 4)
    assert m.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert m.sp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert Mesh(3, 4, 4).sp_groups() == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="does not divide"):
        Mesh(0, 6, 4)


def _config(**overrides) -> ModelConfig:
    raw = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1001,
               hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=64, rms_norm_eps=1e-5)
    return ModelConfig.from_dict({**raw, **overrides})


def _shape(config: ModelConfig, module: str) -> tuple[int, ...]:
    c, h, d = config, config.hidden_size, config.head_dim
    return {"q_proj": (c.num_heads * d, h), "k_proj": (c.num_kv_heads * d, h),
            "v_proj": (c.num_kv_heads * d, h), "o_proj": (h, c.num_heads * d),
            "gate_proj": (c.intermediate_size, h), "up_proj": (c.intermediate_size, h),
            "down_proj": (h, c.intermediate_size), "embed_tokens": (c.vocab_size, h),
            "lm_head": (c.vocab_size, h)}[module]


@pytest.mark.parametrize("size", [2, 4, 8])
def test_slices_cover_every_tensor(size):
    """Split tensors' slices tile them (padding apart); K/V heads are split or replicated so
    that every query head a rank holds finds, locally, the key/value head it uses."""
    config = _config()
    local = shard_config(config, size)
    for module in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                   "lm_head"):
        shape = _shape(config, module)
        cuts = [slice_of(f"model.x.{module}.weight", shape, config, size, r)
                for r in range(size)]
        dim = cuts[0][0]
        covered = [i for _, a, b, _ in cuts for i in range(a, b)]
        assert covered == list(range(shape[dim])), module
        assert len({n for *_, n in cuts}) == 1
    assert slice_of("model.layers.0.self_attn.o_proj.bias", (64,), config, size, 1) is None
    assert slice_of("model.norm.weight", (64,), config, size, 1) is None
    group = config.num_heads // config.num_kv_heads  # query heads per key/value head
    held = [0] * config.num_kv_heads
    for r in range(size):
        _, a, b, n = slice_of("model.layers.0.self_attn.k_proj.weight",
                              _shape(config, "k_proj"), config, size, r)
        assert b - a == n == local.num_kv_heads * config.head_dim
        kv_heads = range(a // config.head_dim, b // config.head_dim)
        for h in kv_heads:
            held[h] += 1
        local_group = local.num_heads // local.num_kv_heads
        for j in range(local.num_heads):  # this rank's query heads, globally numbered
            q_head = r * local.num_heads + j
            assert kv_heads[j // local_group] == q_head // group
    assert held == [max(1, size // config.num_kv_heads)] * config.num_kv_heads


def test_sizes_that_cannot_split_are_refused():
    config = _config()
    assert valid_sizes(config, 16) == [1, 2, 4, 8]
    with pytest.raises(UnsupportedModel) as e:
        check(config, 3)
    assert "8 query heads" in str(e.value) and "sizes that work: 1, 2, 4, 8" in str(e.value)
    with pytest.raises(UnsupportedModel, match="MLP width 100"):
        check(_config(intermediate_size=100), 8)
    with pytest.raises(UnsupportedModel, match="neither split nor replicated"):
        check(_config(num_attention_heads=12, num_key_value_heads=3), 4)


def test_engine_refuses_before_any_rank_starts(ckpt_root):
    path = str(make_checkpoint("qwen3", ckpt_root))  # 4 query heads
    with pytest.raises(UnsupportedModel, match="4 query heads.*sizes that work: 1, 2, 4"):
        LLM(path, device="cpu", world_size=3, tensor_parallel_size=3)
    assert mp.active_children() == []
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide world_size 3"):
        LLM(path, device="cpu", world_size=3, tensor_parallel_size=2)


def test_weights_that_do_not_fit_name_the_size_that_does():
    # the 70B shape in bf16 on a card of 64 GB (Atlas 800 A2)
    config = _config(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                     num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                     head_dim=128)
    assert 70.0e9 < weight_bytes(config, 1) < 71.0e9  # parameters, 1 byte each
    free = 64 * 2**30
    assert fit_error(config, 2, 8, free) is None
    error = fit_error(config, 2, 1, free)
    assert "131.4 GiB per card at tensor_parallel_size 1" in error
    assert "tensor_parallel_size 4 fits" in error
    assert "tensor_parallel_size 4 fits" in fit_error(config, 2, 2, free)


# A rank's anonymous memory (what it holds; the checkpoint's mapped pages are page cache)
# at its peak while it loads, sampled by a thread, in a process of its own: after a load of
# a tiny checkpoint, whose imports and set-up stay and are not counted.
_MEASURE = textwrap.dedent("""
    import sys, threading, time, torch
    from tr_engine.backends import SOLO, Communicator
    from tr_engine.models.loader import load_model
    from tr_engine.distributed.tensor_parallel import Split

    def anon():
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    tiny, big, size, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    split = Split(size, rank, Communicator(SOLO))
    load_model(tiny, torch.device("cpu"), split=split)
    base, top, done = anon(), [0], threading.Event()

    def watch():
        while not done.is_set():
            top[0] = max(top[0], anon())
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    model = load_model(big, torch.device("cpu"), split=split)[0]
    done.set()
    t.join()
    print(max(top[0], anon()) - base)
""")


def _write_llama(path, h: int, inter: int, layers: int, vocab: int) -> int:
    """A float32 Llama checkpoint of random weights; returns its weights' bytes."""
    from safetensors.torch import save_file

    path.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 8, "head_dim": h // 8, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-5, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g),
               "lm_head.weight": torch.randn(vocab, h, generator=g),
               "model.norm.weight": torch.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)),
                            ("self_attn.v_proj", (h, h)), ("self_attn.o_proj", (h, h)),
                            ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))):
            tensors[p + name + ".weight"] = torch.randn(shape, generator=g)
        tensors[p + "input_layernorm.weight"] = torch.ones(h)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h)
    save_file(tensors, str(path / "model.safetensors"))
    return sum(t.numel() * 4 for t in tensors.values())


def test_loading_reads_only_this_ranks_slices(tmp_path):
    """A rank of T = 2 holds about half the checkpoint while it loads; the whole model's
    load holds all of it (so the measure can tell)."""
    tiny = tmp_path / "tiny"
    _write_llama(tiny, 64, 128, 1, 64)
    big = tmp_path / "big"
    size = _write_llama(big, 1024, 4096, 6, 16384)

    def peak(t: int, rank: int) -> int:
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(tiny), str(big), str(t),
                              str(rank)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return int(out.stdout)

    half, whole = peak(2, 1), peak(1, 0)
    print(f"checkpoint {size / 2**20:.0f} MiB; peak held while loading: T=2 rank "
          f"{half / 2**20:.0f} MiB, whole model {whole / 2**20:.0f} MiB")
    assert whole > 0.95 * size
    assert half < 0.6 * size
