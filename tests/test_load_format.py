"""load_format dummy: a model from config.json alone, its weights seeded random values made
in place, and load_format auto refusing a folder without weights before any rank starts."""

from __future__ import annotations

import functools
import shutil
import signal

import pytest
import torch
from checkpoints import VOCAB, make_checkpoint

from tr_engine import LLM, SamplingParams
from tr_engine.cli import ConfigError, load_settings, serve_main
from tr_engine.config import EngineConfig
from tr_engine.models.loader import load_model
from tr_engine.worker.cluster import Cluster

CPU = torch.device("cpu")
PROMPTS = [[5, 100, 7], list(range(40, 60))]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("load_format")


def _bare(root, family: str):
    """`family`'s checkpoint folder without its weights: config.json, generation config and
    tokenizer only."""
    path = root / f"{family}-bare"
    if not path.is_dir():
        path.mkdir()
        for f in make_checkpoint(family, root).iterdir():
            if "safetensors" not in f.name:
                shutil.copy(f, path)
    assert (path / "config.json").is_file() and not list(path.glob("*safetensors*"))
    return path


@functools.cache
def _serve(path: str, world: int, seed: int):
    """(prompt logits of PROMPTS[1], greedy tokens of each prompt) from a dummy engine."""
    with LLM(path, device="cpu", world_size=world, dtype="float32", load_format="dummy",
             seed=seed, kv_cache_tokens=512, prefill_chunk=16) as llm:
        logits = llm.prompt_logits(PROMPTS[1])
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return logits, [o.token_ids for o in outs]


@pytest.mark.parametrize("world", [1, 2])
def test_dummy_weights_serve_the_same_on_every_rank(root, world):
    logits, tokens = _serve(str(_bare(root, "qwen2")), world, 0)
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 10  # spread, neither flat nor blown up
    for out in tokens:
        assert len(out) == NEW_TOKENS and all(0 <= t < VOCAB for t in out)
    if world == 2:  # rank 1 computes half the prompt's tokens with its own copy
        ref_logits, ref_tokens = _serve(str(_bare(root, "qwen2")), 1, 0)
        err = (logits - ref_logits).abs().max().item()
        assert err < 1e-4, f"P=2 against P=1: {err:.2e}"
        assert tokens == ref_tokens


def test_another_seed_gives_other_weights(root):
    logits0, tokens0 = _serve(str(_bare(root, "qwen2")), 1, 0)
    logits1, tokens1 = _serve(str(_bare(root, "qwen2")), 1, 1)
    assert (logits0 - logits1).abs().max().item() > 0.1
    assert tokens0 != tokens1


@pytest.mark.parametrize("family", ["llama3.2", "qwen2", "qwen3"])
def test_dummy_weights_match_the_checkpoint_shapes(root, family):
    """Tied (llama3.2, qwen2), biased (qwen2), q/k norms (qwen3), bfloat16 (llama3.2)."""
    real, config = load_model(make_checkpoint(family, root), CPU)
    dummy, dummy_config = load_model(_bare(root, family), CPU, load_format="dummy")
    assert dummy_config == config
    shapes = {n: (t.shape, t.dtype) for n, t in real.state_dict().items()}
    assert {n: (t.shape, t.dtype) for n, t in dummy.state_dict().items()} == shapes
    params = dict(dummy.named_parameters())
    assert len(params) == len(dict(real.named_parameters()))
    if config.tie_word_embeddings:
        assert dummy.lm_head.weight is dummy.model.embed_tokens.weight
    for name, p in params.items():
        assert p.device == CPU and torch.isfinite(p).all(), name
        if p.dim() == 1 and name.endswith("weight"):  # norms near 1
            assert abs(p.float().mean().item() - 1) < 0.1 and p.float().std().item() < 0.2
        else:
            assert abs(p.float().mean().item()) < 0.1 and p.float().std().item() > 0.01, name
    # each parameter has its own values, even where two have the same shape
    first, second = (dummy.model.layers[i].self_attn.o_proj.weight for i in (0, 1))
    assert not torch.equal(first, second)


def test_dummy_weights_depend_on_the_seed_only(root):
    path = _bare(root, "qwen3")
    a = load_model(path, CPU, "float32", load_format="dummy", seed=3)[0].state_dict()
    b = load_model(path, CPU, "float32", load_format="dummy", seed=3)[0].state_dict()
    c = load_model(path, CPU, "float32", load_format="dummy", seed=4)[0].state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a if a[n].numel() > 1)


def test_auto_refuses_a_folder_without_weights_before_any_rank_starts(root, monkeypatch):
    path = _bare(root, "qwen2")

    def spawn(self, *args):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(Cluster, "_spawn", spawn)
    with pytest.raises(FileNotFoundError, match=r"no weight files.*model\.safetensors") as e:
        LLM(str(path), device="cpu", world_size=2, dtype="float32")
    assert str(path) in str(e.value) and "load_format dummy" in str(e.value)


def test_tr_serve_without_weights_exits_2_with_one_line(root, capsys):
    handler = signal.getsignal(signal.SIGTERM)  # tr-serve sets its own during start-up
    try:
        code = serve_main(["--model", str(_bare(root, "qwen2")), "--device", "cpu"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tr-serve: ")]
    assert len(lines) == 1 and "model.safetensors" in lines[0]


def test_load_format_setting(tmp_path):
    assert EngineConfig().load_format == "auto"
    assert load_settings(["--load-format", "dummy"])[0].load_format == "dummy"
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("load_format: dummy\n")
    assert load_settings(["--config", str(yaml)])[0].load_format == "dummy"
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy; got 'bogus'"):
        EngineConfig(load_format="bogus")
    yaml.write_text("load-format: bogus\n")
    with pytest.raises(ConfigError, match="load_format must be one of auto, dummy"):
        load_settings(["--config", str(yaml)])
    assert serve_main(["--config", str(yaml)]) == 2
    with pytest.raises(SystemExit) as e:
        serve_main(["--load-format", "bogus"])
    assert e.value.code == 2


def test_dummy_weights_split_for_tensor_parallel_ranks(root):
    """Each rank of T = 2 makes its share: the parameters every rank holds whole are the
    same on both, the split ones differ, and a row-parallel matrix keeps the whole model's
    scale (its partial products add up over the ranks)."""
    from tr_engine.backends import SOLO, Communicator

    from tr_engine.distributed.tensor_parallel import Split, is_split

    path = _bare(root, "qwen2")  # biases on q/k/v: split with their rows
    whole = load_model(path, CPU, "float32", load_format="dummy", seed=3)[0].state_dict()
    ranks = [load_model(path, CPU, "float32", load_format="dummy", seed=3,
                        split=Split(2, r, Communicator(SOLO)))[0].state_dict() for r in (0, 1)]
    assert set(ranks[0]) == set(whole)
    for name, p in ranks[0].items():
        q = ranks[1][name]
        if is_split(name):
            assert p.shape != whole[name].shape and not torch.equal(p, q), name
        else:
            assert torch.equal(p, q) and torch.equal(p, whole[name]), name
    o = "model.layers.0.self_attn.o_proj.weight"
    assert ranks[0][o].shape[1] * 2 == whole[o].shape[1]
    ratio = ranks[0][o].std().item() / whole[o].std().item()
    assert 0.85 < ratio < 1.15, ratio
