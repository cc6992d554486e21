"""How closely an engine follows a reference run of the same model (another KV cache dtype):
greedy agreement and teacher-forced measures, both through decode (each step reads the
whole cache as stored).

    ref = greedy(llm_auto, prompts, new)            # the reference continuations
    row = agreement(ref, greedy(llm, prompts, new), forced(llm, prompts, ref))

    found = pass_keys(llm)                           # the pass-key test, haystack cached

Used by tests/test_kv_quant_embedded.py and benchmarks/kv_quant.py.
"""

from __future__ import annotations

import torch

from tr_engine import SamplingParams
from tr_engine.outputs import TokenLogprob

# fixed chat prompts (benchmarks/kv_quant.py, tests/test_kv_quant_embedded.py)
PROMPTS = (
    "What is the capital of France, and what is it known for?",
    "Write a short poem about the sea.",
    "Explain in two sentences how a refrigerator keeps food cold.",
    "List three uses of a paperclip.",
    "What is 17 times 23? Show your working.",
    "Translate 'good morning, how are you?' into Spanish and German.",
)


# the pass-key test: a key hidden in filler text at a depth; (filler sentences, key, depth)
# on which the embedded model finds the key with `auto` (it loses keys past ~1,500 tokens)
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
PASS_KEYS = ((20, 68157, 0.3), (40, 41923, 0.6), (30, 52896, 0.9))


def haystack(sentences: int, key: int, depth: float) -> str:
    parts = [FILLER] * sentences
    parts.insert(int(sentences * depth), f"The pass key is {key}. Remember it. {key} is the "
                 "pass key. ")
    return ("There is important info hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the important information there.\n\n"
            + "".join(parts))


def pass_keys(llm) -> list[tuple[bool, int, int]]:
    """For each of PASS_KEYS: a first question on the haystack puts it in the prefix cache,
    then the pass-key question reads it from there. (key found in the greedy answer, cached
    tokens of the second prompt, its length)."""
    params = SamplingParams(max_tokens=12, temperature=0)
    found = []
    for sentences, key, depth in PASS_KEYS:
        text = haystack(sentences, key, depth)
        first, ask = (llm.engine.encode_chat([{"role": "user", "content": f"{text}\n\n{q}"}])
                      for q in ("What color is the sky?", "What is the pass key?"))
        llm.generate([{"prompt_token_ids": first}], params)
        out = llm.generate([{"prompt_token_ids": ask}], params)[0]
        found.append((str(key) in out.outputs[0].text, out.num_cached_tokens, len(ask)))
    return found


def chat_prompts(llm) -> list[list[int]]:
    return [llm.engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


def greedy(llm, prompts: list[list[int]], new: int) -> list:
    """Each prompt's greedy continuation of `new` tokens, with the chosen logprobs."""
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=1)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


class _Forced:
    """Stands in for the engine's sampler: every sequence gets its reference's next token
    (teacher forcing), with the model's logprob of it and of its own most likely token."""

    def __init__(self, sampler, refs: dict[tuple[int, ...], list[int]]) -> None:
        self.sampler, self.refs = sampler, refs

    def __call__(self, logits, seqs):
        tokens, logprobs, errors = self.sampler(logits, seqs)  # the model's own choice
        lp = torch.log_softmax(logits.float(), dim=-1)
        for i, seq in enumerate(seqs):
            want = self.refs[tuple(seq.prompt_ids)][len(seq.output_ids)]
            own = tokens[i]
            tokens[i] = want
            logprobs[i] = TokenLogprob(want, float(lp[i, want]), {own: float(lp[i, own])})
        return tokens, logprobs, errors

    def __getattr__(self, name):  # forget() and the rest: the sampler's
        return getattr(self.sampler, name)


def forced(llm, prompts: list[list[int]], refs: list) -> list:
    """The engine's logprobs along each reference continuation (`refs`: outputs of
    `greedy`), as outputs whose logprobs' `top` names the engine's own choice."""
    engine = llm.engine
    table = {tuple(p): list(r.token_ids) for p, r in zip(prompts, refs)}
    engine.sampler = _Forced(engine.sampler, table)
    try:
        return greedy(llm, prompts, len(refs[0].token_ids))
    finally:
        engine.sampler = engine.sampler.sampler


def agreement(refs: list, outs: list, teacher: list) -> dict[str, float]:
    """first_divergence: mean index of the first greedy token that differs from the
    reference (the whole length where none does); dlogprob: mean |Δ logprob| of the
    reference tokens, teacher-forced; top1: share of teacher-forced steps whose most likely
    token is the reference's."""
    first, deltas, same = [], [], []
    for ref, out, tf in zip(refs, outs, teacher):
        a, b = list(ref.token_ids), list(out.token_ids)
        first.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
        for r, t in zip(ref.outputs[0].logprobs, tf.outputs[0].logprobs):
            deltas.append(abs(t.logprob - r.logprob))
            same.append(next(iter(t.top)) == r.token_id)
    return {"first_divergence": sum(first) / len(first),
            "dlogprob": sum(deltas) / len(deltas),
            "top1": sum(same) / len(same)}
