"""The repetition, presence and frequency penalties' state on the device: one row of token
counts per running sequence that asks for a penalty, updated with each sampled token.

A row holds, for every token id, 2 x (times it was generated) + (1 if it is in the prompt):
the presence and frequency penalties read the generated count (OpenAI counts the output
only), the repetition penalty whether the value is non-zero (prompt or output, as
transformers' RepetitionPenaltyLogitsProcessor sees the whole input). The prompt's part is
built once, when the sequence is first sampled, on the device and in chunks (a 1M-token
prompt is never one host list turned into one tensor); after that a step costs one
scatter-add for the whole batch, nothing on the host in the prompt's or the output's length.

Rows are taken only by sequences with a penalty, and given back when they end. A row that
no longer matches its sequence (a count of generated tokens other than the one recorded)
is rebuilt from the sequence, so the state can never drift from the tokens.
"""

from __future__ import annotations

import torch

from .sequence import Sequence

PROMPT_CHUNK = 65536  # prompt tokens turned into one tensor at a time


class PenaltyState:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.table = torch.zeros(0, 0, dtype=torch.int32, device=device)  # [rows, V]
        self._rows: dict[int, int] = {}  # seq_id -> row
        self._counted: dict[int, int] = {}  # seq_id -> generated tokens in its row
        self._free: list[int] = []

    def rows(self, seqs: list[Sequence], vocab: int) -> list[int]:
        """Each sequence's row (taken and built if it has none yet, rebuilt if stale)."""
        if self.table.shape[1] != vocab:  # the first use (or another vocabulary)
            self.table = torch.zeros(0, vocab, dtype=torch.int32, device=self.device)
            self._rows.clear()
            self._counted.clear()
            self._free.clear()
        out = []
        for seq in seqs:
            row = self._rows.get(seq.seq_id)
            if row is None:
                row = self._take()
                self._rows[seq.seq_id] = row
                self._build(seq, row)
            elif self._counted[seq.seq_id] != len(seq.output_ids):
                self._build(seq, row)
            out.append(row)
        return out

    def record(self, seqs: list[Sequence], rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The tokens just sampled for `seqs` (their `rows`, device tensors): counted."""
        self.table.index_put_((rows, tokens), torch.tensor(2, dtype=torch.int32,
                                                           device=self.device),
                              accumulate=True)
        for seq in seqs:
            self._counted[seq.seq_id] += 1

    def forget(self, seq_id: int) -> None:
        row = self._rows.pop(seq_id, None)
        if row is not None:
            self._counted.pop(seq_id, None)
            self._free.append(row)

    def _take(self) -> int:
        if not self._free:
            n, vocab = self.table.shape
            grow = max(8, n)  # doubling: a burst of new sequences copies the table rarely
            more = torch.zeros(grow, vocab, dtype=torch.int32, device=self.device)
            self.table = torch.cat([self.table, more])
            self._free = list(range(n + grow - 1, n - 1, -1))
        return self._free.pop()

    def _build(self, seq: Sequence, row: int) -> None:
        line, vocab = self.table[row], self.table.shape[1]
        line.zero_()
        if seq.params.repetition_penalty != 1.0:  # only it reads the prompt's part
            for i in range(0, len(seq.prompt_ids), PROMPT_CHUNK):
                ids = _ids(seq.prompt_ids[i : i + PROMPT_CHUNK], vocab)
                line.index_fill_(0, ids.to(self.device, non_blocking=True), 1)
        for i in range(0, len(seq.output_ids), PROMPT_CHUNK):
            ids = _ids(seq.output_ids[i : i + PROMPT_CHUNK], vocab).to(self.device)
            line.index_add_(0, ids, torch.full_like(ids, 2, dtype=torch.int32))
        self._counted[seq.seq_id] = len(seq.output_ids)


def _ids(ids: list[int], vocab: int) -> torch.Tensor:
    t = torch.tensor(ids, dtype=torch.long)
    return t[(t >= 0) & (t < vocab)]  # on the host: no device sync


def apply(logits: torch.Tensor, counts: torch.Tensor, repetition: torch.Tensor,
          presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits `[n, V]` float32, counts `[n, V]` (rows of the table), the penalties `[n]`.
    Repetition (CTRL, transformers): a seen token's logit divided by the penalty if positive,
    multiplied if not. Presence and frequency (OpenAI): a generated token's logit less
    presence + frequency x count."""
    seen = counts > 0
    generated = (counts >> 1).to(logits.dtype)
    rp = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - (presence[:, None] * (generated > 0) + frequency[:, None] * generated)
