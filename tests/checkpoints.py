"""Small random Hugging Face checkpoints of every supported family, written by transformers.

    from checkpoints import FAMILIES, make_checkpoint
    path = make_checkpoint("qwen3", tmp_path)   # -> tmp_path / "qwen3", a checkpoint folder

`sample_prompts()` and `hf_greedy()` give the generation cases the engine is checked with
against transformers, on the CPU (tests/test_engine.py) and on GPUs (benchmarks/gpu_checks.py).

Each folder holds what a real one does: config.json, generation_config.json, safetensors
weights (qwen3's are sharded with an index; llama3.2's are bfloat16) and a byte-level
tokenizer with a chat template. Weights are seeded, so a family's checkpoint is the same on
every call, and drawn wider than transformers' initialisation (norm weights and biases
included), so that logits spread and a wrong weight shows.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

PROMPT_LENS = (1, 3, 7, 13, 40)  # lengths not a multiple of 2P, and shorter than 2P


def sample_prompts() -> list[list[int]]:
    """One prompt of byte tokens for each of PROMPT_LENS (seeded)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, EOS not stopping it (the engine's
    ignore_eos); `model` is a loaded causal LM."""
    from transformers import GenerationConfig

    model.generation_config.eos_token_id = None  # else it overrides ours and stops at EOS
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=None, bos_token_id=None)
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), generation_config=gen)[0, len(p):].tolist()
                for p in prompts]


def byte_ids(n: int, seed: int) -> list[int]:
    """n random byte tokens, the same for the same seed."""
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_reference(path: str):
    """transformers' model of `path` (float32) and its greedy continuations, cached:
    `greedy(prompt_tuple, new_tokens)`; the model is `greedy.model`."""
    import functools

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @functools.cache
    def greedy(prompt: tuple[int, ...], new: int) -> list[int]:
        return hf_greedy(model, [list(prompt)], new)[0]

    greedy.model = model
    return greedy


def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """float64 log-probabilities of `tokens` after `prompt` from `model`'s forward over the
    whole sequence, one per token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].double()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def matches_transformers(model, out, prompt: list[int], tokens: list[int]) -> bool:
    """An engine RequestOutput against transformers: its tokens equal `tokens` (the
    reference greedy continuation of `prompt`) and, where it gave logprobs, each chosen
    token's logprob is within 1e-4 of `model`'s forward over the whole sequence."""
    if out.token_ids != tokens:
        return False
    if out.outputs[0].logprobs is None:
        return True
    ref = reference_logprobs(model, prompt, tokens)
    got = torch.tensor([e.logprob for e in out.outputs[0].logprobs], dtype=torch.float64)
    return bool((got - ref).abs().max() < 1e-4)


# The families, as the checkpoints of each look; EXTRA_FAMILIES add RoPE scalings and a
# vocabulary of odd size.
FAMILIES = ("llama2", "llama3.1", "llama3.2", "qwen2", "qwen3", "mistral")
EXTRA_FAMILIES = ("llama-linear", "qwen2-yarn", "llama-oddvocab")

VOCAB = 320  # 256 byte tokens, 3 special tokens, the rest unused
BOS, EOS, PAD = 256, 257, 258
_SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=BOS,
              eos_token_id=EOS, pad_token_id=PAD)


def _config(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
              "rope_theta": 500000.0}  # original 64: head_dim 16 has all three bands
    if family == "llama2":
        return LlamaConfig(**{**_SMALL, "num_key_value_heads": 4, "num_hidden_layers": 3},
                           head_dim=16)
    if family == "llama3.1":
        return LlamaConfig(**_SMALL, head_dim=16, rope_parameters=llama3)
    if family == "llama3.2":
        return LlamaConfig(**_SMALL, head_dim=16, rope_parameters=llama3,
                           tie_word_embeddings=True)
    if family == "llama-linear":
        return LlamaConfig(**_SMALL, head_dim=16,
                           rope_parameters={"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 10000.0})
    if family == "llama-oddvocab":  # a vocabulary no tensor-parallel size above 1 divides
        return LlamaConfig(**{**_SMALL, "vocab_size": VOCAB + 1}, head_dim=16)
    if family == "qwen2":  # real Qwen2.5 configs name a window but leave it off
        return Qwen2Config(**_SMALL, sliding_window=32, use_sliding_window=False,
                           max_window_layers=1, tie_word_embeddings=True)
    if family == "qwen2-yarn":
        return Qwen2Config(**_SMALL, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "rope_theta": 1000000.0})
    if family == "qwen3":  # head_dim * heads != hidden_size, as in the real ones
        return Qwen3Config(**{**_SMALL, "num_hidden_layers": 3}, head_dim=32)
    if family == "mistral":
        return MistralConfig(**_SMALL, head_dim=16, sliding_window=None)
    raise ValueError(f"unknown family {family!r}; choose one of "
                     f"{', '.join(FAMILIES + EXTRA_FAMILIES)}")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:  # projections: unit-variance outputs; lm_head a little wider
                gain = 3.0 if name.startswith("lm_head") else 1.0
                p.copy_(gain * noise / math.sqrt(p.shape[1]))


def make_tokenizer():
    """A byte-level tokenizer: ids 0-255 are bytes, then <s>, </s>, <pad>; a ChatML-like
    chat template that needs no special tokens of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=template)


def _byte_of(char: str) -> int:
    # GPT-2's byte-level map: printable Latin-1 bytes map to themselves, the rest to 256+.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def make_checkpoint(family: str, root: str | Path, seed: int = 0) -> Path:
    """Write `family`'s checkpoint to `root / family` (if not already there; a folder that
    exists is returned as it is, whatever its seed); return it.

    The folder is written under a temporary name and renamed, so processes that share `root`
    never read half of one."""
    path = Path(root) / family
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}.", dir=path.parent))
    try:
        _write(family, tmp, seed)
        try:
            tmp.rename(path)
        except OSError:  # written meanwhile by another process
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write(family: str, path: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    config = _config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed + sum(map(ord, family)))
    if family == "llama3.2":
        model = model.to(torch.bfloat16)
    shard = "200KB" if family == "qwen3" else "1GB"
    model.save_pretrained(path, max_shard_size=shard)
    make_tokenizer().save_pretrained(path)


class Recorder:
    """Every plan the engine's scheduler makes, in order."""

    def __init__(self, scheduler) -> None:
        self.plans, self._schedule = [], scheduler.schedule

        def schedule():
            plan = self._schedule()
            if plan is not None:
                self.plans.append(plan)
            return plan

        scheduler.schedule = schedule
        self.scheduler = scheduler

    def close(self) -> None:
        del self.scheduler.schedule
