"""Which tokens a request may sample next, for the requests that restrict it: a grammar
(structured outputs), min_tokens (no end of sequence yet), bad_words and allowed_token_ids.

Each step, the rows of such requests get a bit per vocabulary entry in one int32 bitmask
`[rows, ceil(V / 32)]` on the host (xgrammar fills the grammar rows of the batch in one call;
min_tokens and bad_words clear bits), which goes to the device in one copy and is applied to
the batch's logits in place, before the sampler: disallowed tokens get -inf, so every
sampling path (greedy argmax, top-k/p, seeds) sees only allowed ones. A batch without such
rows costs nothing. It runs on rank 0, where the sampler runs, while the device still
computes the step (the logits are waited for only by the copy)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .grammar import GrammarCompiler
from .sequence import Sequence

log = logging.getLogger("tr_engine")


@dataclass
class _Rules:
    matcher: object | None = None  # xgrammar GrammarMatcher
    bad_words: list[list[int]] = field(default_factory=list)  # token ids of each bad word
    allowed: np.ndarray | None = None  # uint32 words: the bits of allowed_token_ids


class TokenMasks:
    def __init__(self, compiler: GrammarCompiler, tokenizer, vocab_size: int,
                 eos_ids: set[int], device: torch.device, max_rows: int) -> None:
        self.compiler = compiler
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.device = device
        self.words = (vocab_size + 31) // 32
        # host side, pinned where the device copy can then overlap
        pin = device.type == "cuda"
        self._host = torch.empty((max_rows, self.words), dtype=torch.int32, pin_memory=pin)
        self._rules: dict[int, _Rules] = {}
        self._batch = None  # xgrammar BatchGrammarMatcher, made on first use

    def warm_up(self) -> None:
        """On CUDA, build xgrammar's masking kernel now for each row count it specialises
        on (one, a multiple of 16, any other), not on the first constrained request."""
        if self.device.type != "cuda":
            return
        logits = torch.zeros((16, self.vocab_size), dtype=torch.float32, device=self.device)
        mask = torch.full((16, self.words), -1, dtype=torch.int32, device=self.device)
        for n in (1, 2, 16):
            _xgr().apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size,
                                               indices=list(range(n)))
        torch.cuda.synchronize(self.device)

    def add(self, seq: Sequence) -> None:
        """Set up `seq`'s rules (its grammar compiled, or found compiled in the cache);
        InvalidParameter if its grammar cannot be compiled."""
        p = seq.params
        if (p.structured_outputs is None and not p.bad_words and not p.min_tokens
                and p.allowed_token_ids is None):
            return
        rules = _Rules()
        if p.structured_outputs is not None:
            rules.matcher = self.compiler.matcher(p.structured_outputs)
        rules.bad_words = bad_words_ids(self.tokenizer, p.bad_words)
        if p.allowed_token_ids is not None:
            rules.allowed = np.zeros(self.words, dtype=np.uint32)
            ids = np.asarray([t for t in p.allowed_token_ids if t < self.vocab_size],
                             dtype=np.int64)
            np.bitwise_or.at(rules.allowed, ids >> 5,
                             np.uint32(1) << (ids & 31).astype(np.uint32))
        self._rules[seq.seq_id] = rules

    def forget(self, seq_id: int) -> None:
        self._rules.pop(seq_id, None)

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Mask `logits` `[B, V]` (one row per sequence of `seqs`) in place."""
        if not self._rules:
            return
        rows = [i for i, s in enumerate(seqs) if self.restricts(s)]
        if not rows:
            return
        n = len(seqs)
        if self._host.shape[0] < n:
            self._host = torch.empty((n, self.words), dtype=torch.int32,
                                     pin_memory=self._host.is_pinned())
        host = self._host[:n]  # laid out by batch row; the rows not masked stay all ones
        host.fill_(-1)
        grammar = [(i, self._rules[seqs[i].seq_id].matcher) for i in rows]
        # a finished grammar's request has stopped; xgrammar refuses to fill for it
        grammar = [(i, m) for i, m in grammar if m is not None and not m.is_terminated()]
        if grammar:
            self._fill(host, grammar)
        words = host.numpy().view(np.uint32)
        for i in rows:
            allowed = self._rules[seqs[i].seq_id].allowed
            if allowed is not None:
                words[i] &= allowed
            banned = self._banned(seqs[i])
            if banned:
                ids = np.asarray(banned, dtype=np.int64)
                ids = ids[ids < self.vocab_size]
                np.bitwise_and.at(words[i], ids >> 5,
                                  ~(np.uint32(1) << (ids & 31).astype(np.uint32)))
        mask = host.to(logits.device, non_blocking=True)
        backend = "auto" if logits.device.type in ("cpu", "cuda") else "torch_native"
        _xgr().apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size,
                                           indices=rows, backend=backend)

    def accept(self, seq: Sequence, token: int) -> bool:
        """Advance `seq`'s grammar by its new token; True once the grammar has ended (the
        request then stops). ValueError if the grammar refuses the token."""
        rules = self._rules.get(seq.seq_id)
        if rules is None or rules.matcher is None:
            return False
        m = rules.matcher
        if m.is_terminated():
            return True
        if not m.accept_token(token):
            raise ValueError(f"the grammar refused token {token}")
        return m.is_terminated()

    # ---- internals -----------------------------------------------------------------------
    def restricts(self, seq: Sequence) -> bool:
        rules = self._rules.get(seq.seq_id)
        if rules is None:
            return False
        return (rules.matcher is not None or bool(rules.bad_words)
                or rules.allowed is not None or len(seq.output_ids) < seq.params.min_tokens)

    def _banned(self, seq: Sequence) -> list[int]:
        p, out = seq.params, seq.output_ids
        banned = []
        if len(out) < p.min_tokens:  # vLLM's min_tokens: no EOS nor stop token id yet
            banned += self.eos_ids + list(p.stop_token_ids)
        for word in self._rules[seq.seq_id].bad_words:
            # a word's last token is banned where the output ends with the rest of it
            head = word[:-1]
            if not head or (len(out) >= len(head) and out[len(out) - len(head):] == head):
                banned.append(word[-1])
        return banned

    def _fill(self, host: torch.Tensor, grammar: list[tuple[int, object]]) -> None:
        if len(grammar) == 1:
            k, m = grammar[0]
            m.fill_next_token_bitmask(host, k)
            return
        if self._batch is None:
            self._batch = _xgr().BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask([m for _, m in grammar], host,
                                                  indices=[k for k, _ in grammar])


def _xgr():
    import xgrammar

    return xgrammar


def bad_words_ids(tokenizer, words: tuple[str, ...]) -> list[list[int]]:
    """vLLM's bad_words: each word's token ids as it would appear at the start of the text
    and after a space, without repeats."""
    out: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out
