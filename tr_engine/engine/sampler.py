"""Turning logits into tokens, for the whole batch at once on the device: an allowed-token
mask, logit bias, penalties, temperature, top-k, min-p, top-p, seeds, logprobs.

Every value SamplingParams accepts must give a token, never an exception: a repetition
penalty of 1e-38 or a temperature of 1e-30 overflows float32 logits to inf, and a top_p that
rounds to 0 in float32 would drop every token. So logits are kept finite (inf clamped to the
largest float32, NaN to -inf), the first token of the top-p order is always kept, and where
the filters leave no probability mass the row falls back to greedy.

One pass over the batch: each step's per-row settings go to the device as one small tensor,
every filter is a tensor operation over all the rows that sample, and the tokens with the
logprobs come back in one transfer (the step's only wait for the device). The rows that
sample, in this order:

    logits (+ bias, penalties) / temperature
    top_k: keep the logits >= the k-th largest        (one sort of the rows, if any asks)
    softmax
    min_p: keep p >= min_p x the largest p
    top_p: keep the most likely tokens until the mass before the next reaches top_p,
           measured on the min_p-filtered p (the first token always kept)
    draw:  argmax(p / E), E ~ Exp(1) for each token (an exponential race: a draw from p
           normalised)

Each filter is a threshold on values, found in the sorted order and applied in the
vocabulary's order, so ties at a threshold are all kept and a row's kept set never depends
on the order of a sort or on the other rows. E for a seeded row comes from that request's
own generator (one [V] draw a step), for the other rows from one draw of the sampler's
generator: a seeded request gets the same tokens alone or in any batch, on any number of
ranks (rank 0 samples), eager or from graphs.

A row whose own work on the host raises (its generator, say) gets token 0 and its
exception; if the batch's device work raises, the rows are sampled one by one, so a
failure is the row's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..outputs import TokenLogprob
from ..sampling_params import SamplingParams
from . import penalties
from .penalties import PenaltyState
from .sequence import Sequence

_MAX = torch.finfo(torch.float32).max
_TINY = torch.finfo(torch.float32).tiny
_NO_TOP_P = 2.0  # above any mass: keeps every token
# the per-row settings, in the columns of the tensor that carries them to the device
_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _REPETITION, _PRESENCE, _FREQUENCY = range(7)


@dataclass
class _Batch:
    """What the host knows of a batch before any device work: the rows that sample, the
    penalised rows, the biases, the logprobs asked for."""

    settings: list[tuple[float, ...]]  # one per row, in the columns above
    sampled: list[int]  # rows with temperature > 0
    sort: bool  # a sampled row has top_k or top_p
    min_p: bool
    top_p: bool
    penalized: list[int]
    bias: list[tuple[int, int, float]]  # (row, token id, bias)
    want: list[int]  # rows that ask for logprobs
    top: int  # the most alternatives a row asks for


class Sampler:
    """Runs on rank 0 only. Each seeded request owns a generator, so the same seed gives the
    same tokens whatever else is in the batch."""

    def __init__(self, device: torch.device, seed: int = 0, fused: bool | None = None) -> None:
        """fused: the filters and the draw in one kernel (tr_engine/backends/cuda_sample.py)
        instead of tensor operations; the default where it is compiled, on CUDA."""
        self.device = device
        self.fused = _fused_default(device) if fused is None else fused
        self._default = torch.Generator(device=device).manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}
        self.penalties = PenaltyState(device)

    def warm_up(self, vocab: int) -> None:
        """Build the fused kernel's variants (with and without penalties) for this
        vocabulary now, at start-up, not on the first sampled request: two calls of the
        sampler itself, so the launches are the ones requests make. Seeded, so the shared
        generator's draws stay as they were."""
        if not self.fused:
            return
        g = torch.Generator(device=self.device).manual_seed(0)
        logits = torch.randn(2, vocab, device=self.device, generator=g)
        for i, extra in enumerate(({"repetition_penalty": 1.1}, {})):
            seqs = [Sequence(-1 - 2 * i - j, "warm-up", [0], SamplingParams(
                temperature=0.8, top_k=50, top_p=0.95, seed=j, **extra)) for j in range(2)]
            self(logits, seqs)
            for seq in seqs:
                self.forget(seq.seq_id)

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)
        self.penalties.forget(seq_id)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self._default
        g = self._generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self._generators[seq.seq_id] = g
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 allowed: torch.Tensor | None = None
                 ) -> tuple[list[int], list[TokenLogprob | None], dict[int, Exception]]:
        """logits `[B, V]`, one row per sequence (in order). `allowed`: which tokens each row
        may take, None for all; an int32 bitmask `[B, ceil(V / 32)]` (bit j of word i allows
        token 32 i + j; a row of -1 allows every token), applied before anything else.
        Returns the tokens, their logprobs (the model's own, before the mask, bias,
        penalties and temperature), and the failures by row: a row that raised gets token 0
        and its exception, so one request's failure never reaches the others."""
        n = len(seqs)
        errors: dict[int, Exception] = {}
        batch = _describe(seqs)
        # the fused kernel reads the model's dtype itself
        raw = logits if self._uses_kernel(batch) else logits.float()
        noise = self._noise(raw, seqs, batch.sampled, errors)
        try:
            picked = self._tokens(raw, seqs, batch, noise, allowed)
        except Exception:  # then row by row, where a failure is that row's alone
            picked = self._one_by_one(raw, seqs, batch, noise, allowed, errors)
        got = _fetch(raw, picked, batch)
        tokens = [0 if i in errors else int(t) for i, t in enumerate(got[:n])]
        logprobs: list[TokenLogprob | None] = [None] * n
        k = batch.top
        lps, vals, ids = got[n : n + len(batch.want)], got[n + len(batch.want) :][::2], \
            got[n + len(batch.want) :][1::2]
        for j, i in enumerate(batch.want):
            if i in errors:
                continue
            top = seqs[i].params.logprobs
            alternatives = {int(t): v for t, v in zip(ids[j * k : j * k + top],
                                                      vals[j * k : j * k + top])}
            logprobs[i] = TokenLogprob(tokens[i], lps[j], alternatives)
        return tokens, logprobs, errors

    def _sample_row(self, logits: torch.Tensor, seq: Sequence) -> int:
        """One row `[V]` alone, through the same batched path."""
        tokens, _, errors = self(logits[None], [seq])
        if errors:
            raise errors[0]
        return tokens[0]

    def _noise(self, raw: torch.Tensor, seqs: list[Sequence], sampled: list[int],
               errors: dict[int, Exception]) -> torch.Tensor | None:
        """E ~ Exp(1) `[len(sampled), V]`: a seeded row's from its own generator, the others'
        from one draw of the sampler's. Drawn before any other work, so that sampling row by
        row after a failure uses the same draws."""
        if not sampled:
            return None
        noise = torch.empty(len(sampled), raw.shape[1], device=raw.device)
        shared = [j for j, i in enumerate(sampled) if seqs[i].params.seed is None]
        if len(shared) == len(sampled):
            return noise.exponential_(generator=self._default)
        if shared:
            rows = torch.tensor(shared, dtype=torch.long).to(raw.device, non_blocking=True)
            drawn = torch.empty(len(shared), raw.shape[1], device=raw.device)
            noise.index_copy_(0, rows, drawn.exponential_(generator=self._default))
        for j, i in enumerate(sampled):
            if seqs[i].params.seed is not None:
                try:
                    noise[j].exponential_(generator=self._generator(seqs[i]))
                except Exception as e:  # reported to this request alone
                    errors[i] = e
                    noise[j].fill_(1.0)
        return noise

    def _tokens(self, raw: torch.Tensor, seqs: list[Sequence], batch: _Batch,
                noise: torch.Tensor | None, allowed: torch.Tensor | None) -> torch.Tensor:
        """The batch's tokens `[B]` (long, on the device); counts them for the penalties."""
        dev, vocab = raw.device, raw.shape[1]
        settings = torch.tensor(batch.settings, dtype=torch.float32).to(dev, non_blocking=True)
        x = raw if allowed is None else apply_token_bitmask(raw, allowed)
        bias = [(r, t, b) for r, t, b in batch.bias if t < vocab]
        if bias:
            x = x.float()
            flat = torch.tensor([r * vocab + t for r, t, _ in bias], dtype=torch.long)
            values = torch.tensor([b for _, _, b in bias], dtype=torch.float32)
            x = x.flatten().index_add(0, flat.to(dev, non_blocking=True),
                                      values.to(dev, non_blocking=True)).view_as(x)
        if self._uses_kernel(batch):
            return self._fused(x, seqs, batch, settings, noise)
        x = x.float()  # a no-op but for a row sampled alone after the kernel's batch failed
        rows = pen_idx = None
        if batch.penalized:
            pen = [seqs[i] for i in batch.penalized]
            rows = _index(self.penalties.rows(pen, vocab), dev)
            whole = len(pen) == len(seqs)
            pen_idx = None if whole else _index(batch.penalized, dev)
            s = settings if whole else settings[pen_idx]
            y = penalties.apply(x if whole else x[pen_idx], self.penalties.table[rows],
                                s[:, _REPETITION], s[:, _PRESENCE], s[:, _FREQUENCY])
            x = y if whole else x.index_copy(0, pen_idx, y)
        x = _finite(x)
        tokens = torch.argmax(x, dim=-1)
        if batch.sampled:
            whole = len(batch.sampled) == len(seqs)
            idx = None if whole else _index(batch.sampled, dev)
            s = settings if whole else settings[idx]
            drawn = _draw(x if whole else x[idx], s, batch, noise)
            tokens = drawn if whole else tokens.index_copy(0, idx, drawn)
        if rows is not None:
            self.penalties.record(pen, rows, tokens if pen_idx is None else tokens[pen_idx])
        return tokens

    def _uses_kernel(self, batch: _Batch) -> bool:
        return self.fused and bool(batch.sampled or batch.penalized)

    def _fused(self, x: torch.Tensor, seqs: list[Sequence], batch: _Batch,
               settings: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """_tokens in one kernel: each row's penalty-table row and noise row (-1: none)."""
        from ..backends import cuda_sample

        which = [[-1, -1] for _ in seqs]
        pen = [seqs[i] for i in batch.penalized]
        for i, row in zip(batch.penalized, self.penalties.rows(pen, x.shape[1])):
            which[i][0] = row
        for j, i in enumerate(batch.sampled):
            which[i][1] = j
        rows = torch.tensor(which, dtype=torch.long).to(x.device, non_blocking=True)
        tokens = cuda_sample.sample(x, settings, rows, noise,
                                    self.penalties.table if pen else None)
        if pen:
            idx = _index(batch.penalized, x.device)
            self.penalties.record(pen, rows[idx, 0], tokens[idx])
        return tokens

    def _one_by_one(self, raw, seqs, batch, noise, allowed, errors) -> torch.Tensor:
        tokens = torch.zeros(len(seqs), dtype=torch.long, device=raw.device)
        for i, seq in enumerate(seqs):
            if i in errors:
                continue
            try:
                one = _describe([seq])
                own = None
                if one.sampled:
                    own = noise[batch.sampled.index(i)][None]
                mask = None if allowed is None else allowed[i : i + 1]
                tokens[i] = self._tokens(raw[i : i + 1], [seq], one, own, mask)[0]
            except Exception as e:  # reported to this request alone
                errors[i] = e
        return tokens


def _fused_default(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from ..backends import cuda_sample  # noqa: F401  (Triton, compiled for this device)
    except ImportError:
        return False
    return True


def _describe(seqs: list[Sequence]) -> _Batch:
    settings, sampled, penalized, bias, want = [], [], [], [], []
    sort = min_p = top_p = False
    top = 0
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.greedy:
            sampled.append(i)
            sort = sort or p.top_k > 0 or p.top_p < 1.0
            min_p = min_p or p.min_p > 0.0
            top_p = top_p or p.top_p < 1.0
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            penalized.append(i)
        if p.logit_bias:
            bias += [(i, t, b) for t, b in p.logit_bias]
        if p.logprobs is not None:
            want.append(i)
            top = max(top, p.logprobs)
        settings.append((
            max(p.temperature, _TINY) if not p.greedy else 1.0,
            float(p.top_k), p.top_p if p.top_p < 1.0 else _NO_TOP_P, p.min_p,
            p.repetition_penalty, p.presence_penalty, p.frequency_penalty))
    return _Batch(settings, sampled, sort, min_p, top_p, penalized, bias, want, top)


def _draw(x: torch.Tensor, s: torch.Tensor, batch: _Batch, noise: torch.Tensor
          ) -> torch.Tensor:
    """The sampled rows' tokens `[n]`: x `[n, V]` finite logits, s `[n, 7]` their settings."""
    vocab = x.shape[1]
    x = _finite(x / s[:, _TEMPERATURE : _TEMPERATURE + 1])
    order = None
    if batch.sort:
        ranked, order = torch.sort(x, dim=-1, descending=True)
        k = s[:, _TOP_K].long()
        k = torch.where((k <= 0) | (k > vocab), vocab, k)
        kth = ranked.gather(1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if batch.min_p:
        p = p.masked_fill(p < s[:, _MIN_P : _MIN_P + 1] * p.amax(-1, keepdim=True), 0.0)
    if batch.top_p:
        # the logits' order is the probabilities' (softmax is monotone): no second sort
        ranked = p.gather(1, order)
        before = torch.cumsum(ranked, dim=-1) - ranked
        keep = (before < s[:, _TOP_P : _TOP_P + 1]) & (ranked > 0)
        keep[:, 0] = True
        last = keep.sum(-1, keepdim=True) - 1
        p = p.masked_fill(p < ranked.gather(1, last), 0.0)
    drawn = torch.argmax(p / noise.clamp_min(_TINY), dim=-1)
    total = p.sum(-1)
    usable = (total > 0) & torch.isfinite(total)  # else nothing left to draw from: greedy
    return torch.where(usable, drawn, torch.argmax(x, dim=-1))


def _fetch(raw: torch.Tensor, tokens: torch.Tensor, batch: _Batch) -> list[float]:
    """The tokens, and each logprobs row's chosen logprob and (value, id) alternatives,
    brought to the host in one transfer."""
    parts = [tokens.double()]
    if batch.want:
        whole = len(batch.want) == len(tokens)
        idx = None if whole else _index(batch.want, raw.device)
        lp = torch.log_softmax(raw if whole else raw[idx], dim=-1, dtype=torch.float32)
        chosen = tokens if whole else tokens[idx]
        parts.append(lp.gather(1, chosen[:, None])[:, 0].double())
        if batch.top > 0:
            vals, ids = torch.topk(lp, batch.top, dim=-1)
            parts.append(torch.stack([vals.double(), ids.double()], dim=-1).flatten())
    return torch.cat(parts).tolist()


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """+inf to the largest float32 (softmax subtracts the maximum, so ties share the mass),
    NaN to -inf (never drawn); -inf stays, as filters use it to drop tokens."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=_MAX, neginf=float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits `[B, V]` with the tokens a bitmask `[B, ceil(V / 32)]` int32 leaves out set to
    -inf (bit j of word i: token 32 i + j allowed)."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    ok = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[1]]
    return logits.masked_fill(~ok, float("-inf"))


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
