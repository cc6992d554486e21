"""Turning logits into tokens, per request: penalties, temperature, top-k/p, min-p, seed."""

from __future__ import annotations

from collections import Counter

import torch

from .outputs import TokenLogprob
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
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits `[B, V]` float32, one row per sequence (in order)."""
        tokens, logprobs = [], []
        for row, seq in zip(logits.float(), seqs):
            token = self._sample_row(row, seq)
            tokens.append(token)
            logprobs.append(_logprob(row, token, seq.params.logprobs))
        return tokens, logprobs

    def _sample_row(self, logits: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        logits = _penalize(logits, seq)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self._generator(seq)))


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


def _logprob(logits: torch.Tensor, token: int, top: int | None) -> TokenLogprob | None:
    """The model's own log-probability of the chosen token (before penalties and
    temperature), and of the `top` most likely tokens."""
    if top is None:
        return None
    lp = torch.log_softmax(logits, dim=-1)
    alternatives = {}
    if top > 0:
        vals, ids = torch.topk(lp, top)
        alternatives = dict(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, float(lp[token]), alternatives)
