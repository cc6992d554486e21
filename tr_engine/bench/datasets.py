"""The prompts a benchmark sends: random token ids of given lengths, or the first turns of a
ShareGPT-style conversation file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One request to send. `prompt` is text, or token ids (completions only); `prompt_len`
    counts its tokens with the benchmark's tokenizer; `output_len` is the max_tokens asked."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


def load_tokenizer(name: str | None):
    """The tokenizer of `name` (a local folder or a Hugging Face name); None: the embedded
    model's, so that a benchmark of the default `tr-serve` needs no flag."""
    from transformers import AutoTokenizer

    if name is None:
        from tr_engine.models.loader import resolve_model_path

        name = resolve_model_path(None)
    return AutoTokenizer.from_pretrained(name)


def random_samples(tokenizer, num: int, input_len: int, output_len: int, *,
                   range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0,
                   as_text: bool = True) -> list[Sample]:
    """`num` prompts of `prefix_len` shared tokens then about `input_len` random ones
    (uniform in [input_len * (1 - range_ratio), input_len * (1 + range_ratio)], and the same
    for output lengths), drawn from the vocabulary without its special tokens.

    As text (chat takes nothing else) the ids are decoded, and the text's own tokens are
    cut or topped up to the length, a few rounds, since decoding then encoding rarely gives
    the same ids back; as token ids the lengths are exact."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random range ratio must be in [0, 1); got {range_ratio}")
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    prefix = [rng.choice(vocab) for _ in range(prefix_len)]

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    samples = []
    for _ in range(num):
        n_in, n_out = length(input_len), length(output_len)
        ids = prefix + [rng.choice(vocab) for _ in range(n_in)]
        if not as_text:
            samples.append(Sample(ids, len(ids), n_out))
            continue
        target = len(ids)
        text = tokenizer.decode(ids)
        for _ in range(4):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == target:
                break
            ids = ids[:target] + [rng.choice(vocab) for _ in range(target - len(ids))]
            text = tokenizer.decode(ids)
        samples.append(Sample(text, len(tokenizer.encode(text, add_special_tokens=False)),
                              n_out))
    return samples


def sharegpt_samples(path: str | Path, tokenizer, num: int, *, output_len: int | None = None,
                     seed: int = 0, max_len: int = 2048) -> list[Sample]:
    """`num` samples of a ShareGPT file (a JSON list, or JSON Lines): each entry's first
    turn is the prompt and the second's length in tokens the output length (or
    `output_len`). Entries may also be {"prompt": ..., "output_len": N} or {"prompt": ...,
    "completion": ...}. As vLLM does, pairs with a prompt or reply of under 4 tokens, or
    longer than `max_len` together, are skipped; the rest are shuffled with `seed`."""
    entries = _read_entries(Path(path))
    rng = random.Random(seed)
    rng.shuffle(entries)
    samples: list[Sample] = []
    for entry in entries:
        if len(samples) == num:
            break
        pair = _pair(entry)
        if pair is None:
            continue
        prompt, reply, n_out = pair
        n_in = len(tokenizer.encode(prompt, add_special_tokens=False))
        if output_len is not None:
            n_out = output_len
        elif n_out is None:
            n_out = len(tokenizer.encode(reply, add_special_tokens=False))
        if output_len is None and (n_in < 4 or n_out < 4 or n_in + n_out > max_len):
            continue
        samples.append(Sample(prompt, n_in, n_out))
    if len(samples) < num:
        raise ValueError(f"{path} holds {len(samples)} usable prompts; {num} were asked for")
    return samples


def _read_entries(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read data set {path}: {e.strerror}") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            data = json.loads(text)
        else:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is neither a JSON list nor JSON Lines: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of conversations")
    return data


def _pair(entry) -> tuple[str, str, int | None] | None:
    """(prompt, reply, output length or None) of one entry, or None if it has no pair."""
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("prompt"), str):
        n_out = entry.get("output_len")
        reply = entry.get("completion", "")
        if isinstance(n_out, int) and n_out > 0:
            return entry["prompt"], "", n_out
        return (entry["prompt"], reply, None) if isinstance(reply, str) and reply else None
    turns = entry.get("conversations") or entry.get("conversation") or []
    if len(turns) < 2:
        return None
    texts = [t.get("value", t.get("content")) if isinstance(t, dict) else None
             for t in turns[:2]]
    if not all(isinstance(t, str) and t for t in texts):
        return None
    return texts[0], texts[1], None
