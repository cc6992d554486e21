"""Turning logits into tokens, per request: logit bias, penalties, temperature, top-k/p, min-p,
seed.

Every value SamplingParams accepts must give a token, never an exception: a repetition
penalty of 1e-38 or a temperature of 1e-30 overflows float32 logits to inf, and a top_p that
rounds to 0 in float32 would drop every token. So logits are kept finite (inf clamped to the
largest float32, NaN to -inf), the first token of the top-p order is always kept, and where
the filters leave no probability mass the row falls back to greedy.

A decode step's batch is sampled with one host synchronisation where it can: the greedy rows
that need no bias or penalty take one argmax over the batch, the logprobs of every row come
from one log-softmax and one top-k, and all of it reaches the host in one transfer. Other
rows are drawn one by one.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..outputs import TokenLogprob
from .sequence import Sequence


class Sampler:
    """Runs on rank 0 only. Each seeded request owns a generator, so the same seed gives the
    same tokens whatever else is in the batch."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._default = torch.Generator(device=device).manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self._default
        g = self._generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self._generators[seq.seq_id] = g
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]
                 ) -> tuple[list[int], list[TokenLogprob | None], dict[int, Exception]]:
        """logits `[B, V]`, one row per sequence (in order). Returns the tokens, their
        logprobs, and the failures by row: a row that raised gets token 0 and its exception,
        so one request's failure never reaches the others."""
        logits = logits.float()
        n = len(seqs)
        tokens: list[int] = [0] * n
        logprobs: list[TokenLogprob | None] = [None] * n
        errors: dict[int, Exception] = {}
        plain = [_plain_greedy(s.params) for s in seqs]
        for i, seq in enumerate(seqs):
            if not plain[i]:
                try:
                    tokens[i] = self._sample_row(logits[i], seq)
                except Exception as e:  # reported to this request alone
                    errors[i] = e
        tops = [None if i in errors else seq.params.logprobs for i, seq in enumerate(seqs)]
        if any(plain) or any(t is not None for t in tops):
            try:
                _batched(logits, plain, tops, tokens, logprobs)
            except Exception:  # then row by row, where a failure is that row's alone
                self._one_by_one(logits, seqs, plain, tops, tokens, logprobs, errors)
        return tokens, logprobs, errors

    def _one_by_one(self, logits, seqs, plain, tops, tokens, logprobs, errors) -> None:
        for i, seq in enumerate(seqs):
            try:
                if plain[i]:
                    tokens[i] = self._sample_row(logits[i], seq)
                if tops[i] is not None:
                    logprobs[i] = _logprobs(logits[i : i + 1], [tokens[i]], tops[i])[0]
            except Exception as e:
                errors[i], tokens[i] = e, 0

    def _sample_row(self, logits: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        logits = _finite(_penalize(_bias(logits, p.logit_bias), seq))
        if p.greedy:
            return int(torch.argmax(logits))
        logits = _finite(logits / p.temperature)
        if p.top_k > 0 and p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p, and always the first token
            # (a top_p below float32's smallest number is 0 here: every token would drop)
            drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= p.top_p
            drop[0] = False
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        total = float(probs.sum())
        if not (total > 0.0 and math.isfinite(total)):
            return int(torch.argmax(logits))  # nothing left to draw from: greedy
        return int(torch.multinomial(probs, 1, generator=self._generator(seq)))


_MAX = torch.finfo(torch.float32).max


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """+inf to the largest float32 (softmax subtracts the maximum, so ties share the mass),
    NaN to -inf (never drawn); -inf stays, as filters use it to drop tokens."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=_MAX, neginf=float("-inf"))


def _bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """OpenAI's logit_bias: added to the logits of the given token ids before anything else."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=logits.device)
    values = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    keep = ids < logits.shape[0]
    return logits.index_add(0, ids[keep], values[keep])


def _penalize(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)),
                            dtype=torch.long, device=logits.device)
        seen = seen[seen < logits.shape[0]]
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                   vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        counts = Counter(seq.output_ids)
        ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.clone()
        logits[ids] -= p.presence_penalty + p.frequency_penalty * n
    return logits


def _plain_greedy(p) -> bool:
    """Greedy with nothing that changes the logits first: the argmax of the batch."""
    return (p.greedy and not p.logit_bias and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty)


def _batched(logits: torch.Tensor, plain: list[bool], tops: list[int | None],
             tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
    """The plain greedy rows' tokens (one argmax over the batch) and the logprobs of the
    rows that ask for them (one log-softmax, one top-k), brought to the host in one
    transfer: a decode step waits for the device once. Fills `tokens` and `logprobs`."""
    n = len(plain)
    picked = torch.argmax(_finite(logits), dim=-1)
    parts = [picked.double()]
    want = [i for i in range(n) if tops[i] is not None]
    k = max((tops[i] for i in want), default=0)
    if want:
        chosen = picked
        if not all(plain):  # the rows sampled on the host bring their tokens
            host = torch.tensor(tokens, dtype=torch.long).to(logits.device, non_blocking=True)
            mask = torch.tensor(plain).to(logits.device, non_blocking=True)
            chosen = torch.where(mask, picked, host)
        lp = torch.log_softmax(logits, dim=-1)
        parts.append(lp.gather(1, chosen[:, None])[:, 0].double())
        if k > 0:
            vals, ids = torch.topk(lp, k, dim=-1)
            parts += [vals.double().flatten(), ids.double().flatten()]
    got = torch.cat(parts).tolist()
    for i in range(n):
        if plain[i]:
            tokens[i] = int(got[i])
    if not want:
        return
    lps, vals, ids = got[n : 2 * n], got[2 * n : 2 * n + n * k], got[2 * n + n * k :]
    for i in want:
        top = tops[i]
        alternatives = {int(t): v for t, v in zip(ids[i * k : i * k + top],
                                                  vals[i * k : i * k + top])}
        logprobs[i] = TokenLogprob(tokens[i], lps[i], alternatives)


def _logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """For each row of `logits` `[n, V]`: the model's own log-probability of its chosen
    token (before penalties and temperature), and of the `top` most likely tokens."""
    lp = torch.log_softmax(logits, dim=-1)
    ids = torch.tensor(tokens, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
    alternatives: list[dict[int, float]] = [{} for _ in tokens]
    if top > 0:
        vals, tops = torch.topk(lp, top, dim=-1)
        alternatives = [dict(zip(t, v)) for t, v in zip(tops.tolist(), vals.tolist())]
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alternatives)]


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], top: int
                    ) -> list[TokenLogprob]:
    """Row i of `logits` `[n, V]` scores `next_ids[i]`: the model's logprob of each prompt
    token given the ones before it, with the `top` most likely alternatives."""
    return _logprobs(logits.float(), next_ids, top)
